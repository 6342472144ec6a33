"""The latent cache: incremental, atomic, content-keyed; loads in captions.json order; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from shoe_lora_pipeline.core.latents import (
    LatentCacheError,
    cache_latents,
    encode_captions,
    encode_images,
    load_image_tensor,
    load_latent_dataset,
)
from shoe_lora_pipeline_tests.support.training import RESOLUTION, add_image, make_train_set


def test_cache_is_incremental_and_drops_removed_items(tmp_path, tiny_sd_cache, load_components):
    components = load_components()
    train = make_train_set(tmp_path, n=4)
    cache = tmp_path / "latents"

    def run():
        return cache_latents(components, train, cache, RESOLUTION, batch_size=3, device="cpu")

    first = run()
    assert (first.total, first.computed, first.reused, first.removed) == (4, 4, 0, 0)
    assert first.shards == ["shard-00000.safetensors"]
    assert first.latent_shape == [4, RESOLUTION // 8, RESOLUTION // 8] and first.embedding_shape == [77, 64]

    again = run()
    assert (again.computed, again.reused, again.removed) == (0, 4, 0)  # nothing changed: nothing computed

    add_image(train, 4, RESOLUTION)
    added = run()
    assert (added.total, added.computed, added.reused) == (5, 1, 4)
    assert added.shards == ["shard-00000.safetensors", "shard-00001.safetensors"]

    # remove the new image and edit one caption: one recomputed, two index entries dropped, and the
    # shard whose only item was the removed image is deleted
    entries = json.loads((train / "captions.json").read_text())[:4]
    entries[0]["caption"] = "A professional product photo of red casual shoes on white background"
    (train / "captions.json").write_text(json.dumps(entries))
    edited = run()
    assert (edited.total, edited.computed, edited.reused, edited.removed) == (4, 1, 3, 2)
    assert edited.shards_deleted == ["shard-00001.safetensors"]
    assert sorted(p.name for p in cache.iterdir()) == [
        "index.json",
        "shard-00000.safetensors",
        "shard-00002.safetensors",
    ]
    index = json.loads((cache / "index.json").read_text())
    assert len(index["items"]) == 4 and index["scaling_factor"] == components.vae.config.scaling_factor

    # loaded in captions.json order, equal to encoding the image and caption directly
    ds = load_latent_dataset(cache, train)
    assert ds.image_files == [e["image_file"] for e in entries]
    assert (
        ds.mean.shape == (4, 4, 16, 16)
        and ds.std.shape == (4, 4, 16, 16)
        and ds.text_embeddings.shape == (4, 77, 64)
    )
    mean, std = encode_images(
        components.vae, load_image_tensor(train / "images" / entries[2]["image_file"], RESOLUTION)[None]
    )
    text = encode_captions(components.tokenizer, components.text_encoder, [entries[0]["caption"]])
    torch.testing.assert_close(ds.mean[2], mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.std[2], std[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.text_embeddings[0], text[0], rtol=1e-5, atol=1e-6)
    assert (ds.std > 0).all()


def test_missing_item_error_names_the_image_and_the_fix(tmp_path, load_components):
    components = load_components()
    train = make_train_set(tmp_path, n=2)
    cache = tmp_path / "latents"
    cache_latents(components, train, cache, RESOLUTION, batch_size=2, device="cpu")
    name = add_image(train, 7, RESOLUTION)
    with pytest.raises(LatentCacheError, match=rf"{name}.*re-materialise the training_latents asset"):
        load_latent_dataset(cache, train)
    with pytest.raises(LatentCacheError, match="another base model"):
        load_latent_dataset(cache, train, base_fingerprint="0" * 64)


def test_crash_leftovers_are_removed_and_index_is_the_truth(tmp_path, load_components):
    components = load_components()
    train = make_train_set(tmp_path, n=2)
    cache = tmp_path / "latents"
    cache_latents(components, train, cache, RESOLUTION, batch_size=2, device="cpu")
    (cache / "shard-00007.safetensors").write_bytes(b"orphan from a crashed run")
    (cache / ".shard-00008.safetensors.123.tmp").write_bytes(b"half written")
    report = cache_latents(components, train, cache, RESOLUTION, batch_size=2, device="cpu")
    assert report.computed == 0 and report.shards_deleted == ["shard-00007.safetensors"]
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "shard-00000.safetensors"]

    # a shard deleted by hand: its items are recomputed rather than trusted
    (cache / "shard-00000.safetensors").unlink()
    assert cache_latents(components, train, cache, RESOLUTION, batch_size=2, device="cpu").computed == 2
    assert len(load_latent_dataset(cache, train)) == 2


def test_modules_are_put_back_where_they_were(tmp_path, load_components):
    components = load_components()
    train = make_train_set(tmp_path, n=1)
    cache_latents(
        components, train, tmp_path / "latents", RESOLUTION, batch_size=1, device="cpu", dtype=torch.bfloat16
    )
    assert next(components.vae.parameters()).dtype == torch.float32
    assert next(components.text_encoder.parameters()).dtype == torch.float32
    ds = load_latent_dataset(tmp_path / "latents", train)
    assert ds.mean.dtype == torch.float32  # stored as float32 whatever the encoding dtype
