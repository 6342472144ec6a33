"""Core of the ``training_latents`` stage: encode every training image and caption once.

What is stored, and why
-----------------------
For each (image, caption) of ``{dataset}/train`` we store three float32 tensors:

* ``mean`` and ``std`` of the VAE's ``latent_dist`` (a diagonal Gaussian), **unscaled** — exactly what
  ``vae.encode(pixels).latent_dist`` returns;
* ``text``: the CLIP text embedding ``text_encoder(input_ids)[0]`` (padding to the tokenizer's
  ``model_max_length``, truncated), shape ``[77, D]``. For SDXL (``SDComponents.family``) it is both text
  encoders' penultimate hidden states side by side, ``[77, D1 + D2]``, and a fourth tensor ``pooled`` holds
  the second encoder's pooled (projected) embedding ``[P]`` — what ``StableDiffusionXLPipeline.encode_prompt``
  computes.

SDXL's size conditioning (``time_ids``: original size, crop top-left, target size) is not cached: it is
read from captions.json (``metadata.original_size``) each time the cache is loaded (:func:`size_time_ids`).
The SDXL VAE overflows in fp16, so it encodes in fp32 unless the base model was loaded with a fixed VAE
(``training.vae``); the report's notes say which.

Training then draws ``latents = scaling_factor * (mean + std * eps)`` with ``eps`` from the training run's own
seeded generator (see ``training.sample_latents``). That keeps the VAE *sampling* the reference trainer does
(it calls ``latent_dist.sample()`` every step, a mild augmentation) instead of freezing one sample into the
cache, and it makes cached and uncached training draw the very same numbers: the uncached path encodes on
the fly, takes the same mean/std and samples with the same generator. The scaling factor
(``vae.config.scaling_factor``) is recorded in ``index.json`` and applied at sampling time.

Layout of ``cache_dir``
-----------------------
``shard-00000.safetensors`` … (at most :data:`SHARD_SIZE` items each; tensors named ``<key>/mean``,
``<key>/std``, ``<key>/text``) and ``index.json``::

    {"version": 1, "resolution": 512, "scaling_factor": 0.18215, "base_model": {...identity...},
     "latent_shape": [4, 64, 64], "embedding_shape": [77, 768], ("pooled_shape": [1280] for SDXL)
     "items": {"<key>": {"shard": "shard-00000.safetensors", "image_file": "10001.png",
                         "caption": "...", "image_sha256": "..."}}}

The item key is sha256 of (base model fingerprint, image file sha256, caption, resolution), so a re-run
with nothing changed computes nothing, a new or edited image or caption computes exactly that item, and a
new base model or resolution recomputes everything. Shards are immutable: new items go into new shards;
items no longer in the train set leave the index, and a shard with no live item left is deleted. Every file
is written to a temporary name, fsynced and ``os.replace``-d, and the index is written after the shards it
names, so a crash leaves either the old or the new index, never one that points at missing data (orphan
shards from a crash are deleted by the next run).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.fsutil import atomic_write_file, atomic_write_text, fsync_dir
from shoe_lora_pipeline.core.manifest import file_sha256
from shoe_lora_pipeline.core.normalise import crop_offset

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.models import SDComponents

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SHARD_SIZE = 256
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"


class LatentCacheError(RuntimeError):
    """The latent cache is missing, stale or unreadable; the message says what to re-materialise."""


@dataclass
class LatentCacheReport:
    """What :func:`cache_latents` did."""

    cache_dir: Path
    index_path: Path
    total: int  # items of the current train set
    computed: int  # encoded in this call
    reused: int  # found in the cache
    removed: int  # dropped from the index (no longer in the train set)
    shards: list[str]  # shards the index uses now
    shards_deleted: list[str]
    seconds: float
    latent_shape: list[int]
    embedding_shape: list[int]
    scaling_factor: float
    bytes_on_disk: int
    notes: list[str] = field(default_factory=list)


@dataclass
class LatentDataset:
    """The cached items of the current train set, in captions.json order, held in memory (float32, CPU)."""

    image_files: list[str]
    captions: list[str]
    mean: torch.Tensor  # [N, 4, h, w], unscaled
    std: torch.Tensor  # [N, 4, h, w], unscaled
    text_embeddings: torch.Tensor  # [N, 77, D]
    scaling_factor: float
    pooled_embeddings: torch.Tensor | None = None  # [N, P]: SDXL's pooled text embedding
    metadata: list[dict[str, Any]] = field(default_factory=list)  # captions.json metadata, same order

    def __len__(self) -> int:
        return len(self.image_files)


# ----------------------------------------------------------------------------------------------
# encoding helpers (also used by the uncached training path, so both paths run the same code)
# ----------------------------------------------------------------------------------------------


def latent_item_key(base_fingerprint: str, image_sha256: str, caption: str, resolution: int) -> str:
    """Cache key of one training item: anything that changes its latents or embedding changes the key."""
    payload = json.dumps([base_fingerprint, image_sha256, caption, int(resolution)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image as a float32 tensor [3, R, R] in [-1, 1] (the VAE's input range).

    Upstream images are already R×R; anything else is resized (shorter side to R, bilinear) and
    centre-cropped like the reference trainer's transform, so a stray file cannot crash encoding.
    """
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            w, h = img.size
            scale = resolution / min(w, h)
            img = img.resize(
                (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR
            )
            left = (img.width - resolution) // 2
            top = (img.height - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def move_module(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, passing the dtype only when it changes (diffusers warns on every cast)."""
    if next(module.parameters()).dtype == dtype:
        module.to(device)
    else:
        module.to(device, dtype=dtype)


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of ``vae.encode(pixels).latent_dist``, float32, unscaled, on the VAE's device."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, dtype=param.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids [B, model_max_length]: padded to the tokenizer's context, longer captions truncated."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_captions(tokenizer: Any, text_encoder: Any, captions: list[str]) -> torch.Tensor:
    """CLIP text embeddings ``text_encoder(input_ids)[0]`` [B, 77, D], float32, on the encoder's device."""
    ids = token_ids(tokenizer, captions)
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device), return_dict=False)[0].float()


@torch.no_grad()
def encode_text(components: SDComponents, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text input for ``captions`` as the family defines it: (hidden states [B, 77, D], pooled
    [B, P] or None), float32, on the (first) text encoder's device.

    SD1.5: the text encoder's last hidden state (:func:`encode_captions`), no pooled embedding. SDXL: each
    encoder's penultimate hidden state, concatenated, and the pooled (projected) output of the second — as
    ``StableDiffusionXLPipeline.encode_prompt`` computes them without clip skip.
    """
    if not components.family.uses_added_conditions:
        return encode_captions(components.tokenizer, components.text_encoder, captions), None
    hidden, pooled = [], None
    device = next(components.text_encoder.parameters()).device
    for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        ids = token_ids(tokenizer, captions)
        out = text_encoder(ids.to(next(text_encoder.parameters()).device), output_hidden_states=True)
        pooled = out[0].float().to(device)  # the last encoder's (the one with projection) is kept
        hidden.append(out.hidden_states[-2].float().to(device))
    return torch.cat(hidden, dim=-1), pooled


def size_time_ids(metadata: dict[str, Any], resolution: int, resize_policy: str) -> list[int]:
    """SDXL's size conditioning of one training image: original (height, width), crop (top, left), target
    (height, width) — diffusers' ``compute_time_ids`` order.

    The original size is captions.json's ``metadata.original_size`` ([w, h]); the crop top-left is
    ``metadata.crop_top_left`` ([top, left]) when an entry states it, else the offset the cleaning stage's
    ``resize_policy`` took: (0, 0) for pad, the centre crop's for crop (``normalise.crop_offset``).
    """
    width, height = (int(v) for v in metadata["original_size"])
    stated = metadata.get("crop_top_left")
    if stated is not None:
        top, left = (int(v) for v in stated)
    else:
        top, left = crop_offset((width, height), resolution, resize_policy)
    return [height, width, top, left, int(resolution), int(resolution)]


def check_resolution(resolution: int, components: SDComponents) -> None:
    """The image side must be a multiple of the VAE's downsampling factor (latents are 1/f of it)."""
    factor = components.vae_scale_factor
    if resolution % factor:
        raise ValueError(
            f"dataset.resolution = {resolution} is not divisible by {factor}, the VAE factor of this "
            f"{components.family.title} model (latents are 1/{factor} of the image side): use "
            f"{resolution // factor * factor} or {(resolution // factor + 1) * factor}"
        )


def vae_encoding_dtype(components: SDComponents, dtype: torch.dtype) -> tuple[torch.dtype, str | None]:
    """The dtype the VAE encodes in, and a note saying why when it is not ``dtype``/is forced to fp32.

    The SDXL VAE overflows in fp16 (NaN latents): it encodes in fp32 unless a fixed VAE was configured
    (``training.vae``, recorded in the base model identity)."""
    if components.family.vae_needs_fp32 and not components.identity.get("vae"):
        return torch.float32, (
            f"VAE encodes in fp32: the {components.family.title} VAE overflows in fp16 "
            "(set training.vae to an fp16-fixed VAE, e.g. madebyollin/sdxl-vae-fp16-fix, to encode in half precision)"
        )
    return dtype, None


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LatentCacheError(f"{path} is not valid JSON ({exc}); delete {cache_dir} and re-run") from exc
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or "items" not in index:
        raise LatentCacheError(f"{path} has an unknown format; delete {cache_dir} and re-run")
    return index


def _train_items(train_dir: Path) -> list[dict[str, Any]]:
    """captions.json entries with the image path and its sha256."""
    entries = read_captions_json(train_dir / "captions.json")
    items = []
    for e in entries:
        path = train_dir / "images" / e["image_file"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{train_dir / 'captions.json'} lists {e['image_file']!r} but {path} is missing"
            )
        items.append(
            {
                "image_file": e["image_file"],
                "caption": e["caption"],
                "metadata": e["metadata"],
                "path": path,
                "sha256": file_sha256(path),
            }
        )
    return items


def _shard_number(name: str) -> int | None:
    if name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX):
        core = name[len(SHARD_PREFIX) : -len(SHARD_SUFFIX)]
        if core.isdigit():
            return int(core)
    return None


def _encode_shard(
    components: SDComponents, items: list[dict[str, Any]], path: Path, resolution: int, batch_size: int
) -> tuple[dict[str, dict[str, Any]], tuple[list[int], list[int], list[int] | None]]:
    """Encode ``items`` (VAE mean/std, text embedding, SDXL's pooled embedding) into one safetensors shard
    at ``path``, written atomically; returns their index entries and the (latent, embedding, pooled) shapes."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: tuple[list[int], list[int], list[int] | None] = ([], [], None)
    for b in range(0, len(items), batch_size):
        batch = items[b : b + batch_size]
        pixels = torch.stack([load_image_tensor(it["path"], resolution) for it in batch])
        mean, std = encode_images(components.vae, pixels)
        text, pooled = encode_text(components, [it["caption"] for it in batch])
        for i, it in enumerate(batch):
            tensors[f"{it['key']}/mean"] = mean[i].cpu().contiguous()
            tensors[f"{it['key']}/std"] = std[i].cpu().contiguous()
            tensors[f"{it['key']}/text"] = text[i].cpu().contiguous()
            if pooled is not None:
                tensors[f"{it['key']}/pooled"] = pooled[i].cpu().contiguous()
        shapes = (list(mean.shape[1:]), list(text.shape[1:]), None if pooled is None else list(pooled.shape[1:]))
    meta = {"format": "pt", "version": str(INDEX_VERSION)}
    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    entries = {
        it["key"]: {
            "shard": path.name,
            "image_file": it["image_file"],
            "caption": it["caption"],
            "image_sha256": it["sha256"],
        }
        for it in items
    }
    return entries, shapes


def has_images(split_dir: Path) -> bool:
    """Whether a split folder lists at least one image in its captions.json."""
    path = Path(split_dir) / "captions.json"
    return path.is_file() and bool(read_captions_json(path))


def cache_latents(
    components: SDComponents,
    train_dir: Path,
    cache_dir: Path,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> LatentCacheReport:
    """Encode the train set's images (VAE mean/std) and captions (CLIP) into ``cache_dir``; incremental.

    ``components`` is an :class:`~shoe_lora_pipeline.core.models.SDComponents`. The VAE and text encoder(s)
    are moved to ``device``/``dtype`` only while encoding and put back where they were afterwards (the
    SDXL VAE to fp32: :func:`vae_encoding_dtype`).
    """
    check_resolution(resolution, components)
    start = time.perf_counter()
    train_dir, cache_dir = Path(train_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = components.identity["fingerprint"]
    scaling_factor = float(components.vae.config.scaling_factor)

    items = _train_items(train_dir)
    for it in items:
        it["key"] = latent_item_key(fingerprint, it["sha256"], it["caption"], resolution)

    old = _read_index(cache_dir) or {"items": {}}
    old_items: dict[str, dict[str, Any]] = old["items"]
    # A present index entry counts only if its shard still exists (a hand-deleted shard is recomputed).
    live_shards = {p.name for p in cache_dir.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")}
    wanted = {it["key"] for it in items}
    todo = [
        it for it in items if not (it["key"] in old_items and old_items[it["key"]]["shard"] in live_shards)
    ]
    # The same (image, caption) listed twice is encoded once.
    todo = list({it["key"]: it for it in todo}.values())

    new_entries: dict[str, dict[str, Any]] = {}
    latent_shape = old.get("latent_shape")
    embedding_shape = old.get("embedding_shape")
    pooled_shape = old.get("pooled_shape")
    vae_dtype, vae_note = vae_encoding_dtype(components, dtype)
    notes = [vae_note] if vae_note else []
    if todo:
        used_numbers = [n for n in (_shard_number(s) for s in live_shards) if n is not None]
        next_shard = max(used_numbers, default=-1) + 1
        modules = [components.vae, *components.text_encoders]
        # Remember (device, dtype) as values: module.to() changes parameters in place.
        homes = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m in modules]
        for module, _, _ in homes:
            move_module(module, device, vae_dtype if module is components.vae else dtype)
        try:
            for shard_start in range(0, len(todo), SHARD_SIZE):
                shard_name = f"{SHARD_PREFIX}{next_shard:05d}{SHARD_SUFFIX}"
                next_shard += 1
                entries, shapes = _encode_shard(
                    components,
                    todo[shard_start : shard_start + SHARD_SIZE],
                    cache_dir / shard_name,
                    resolution,
                    batch_size,
                )
                new_entries.update(entries)
                latent_shape, embedding_shape, pooled_shape = shapes
        finally:
            for module, home_device, home_dtype in homes:
                move_module(module, home_device, home_dtype)

    kept = {
        k: v
        for k, v in old_items.items()
        if k in wanted and k not in new_entries and v["shard"] in live_shards
    }
    index_items = {**kept, **new_entries}
    removed = len([k for k in old_items if k not in wanted])
    index = {
        "version": INDEX_VERSION,
        "resolution": int(resolution),
        "scaling_factor": scaling_factor,
        "base_model": components.identity,
        "latent_shape": latent_shape,
        "embedding_shape": embedding_shape,
        # SDXL only, so an SD1.5 index stays byte for byte what it was before families existed.
        **({"pooled_shape": pooled_shape} if components.family.uses_added_conditions else {}),
        "items": dict(sorted(index_items.items())),
    }
    index_path = cache_dir / INDEX_NAME
    atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=False) + "\n")
    fsync_dir(cache_dir)

    # Only after the new index is durable: drop shards nothing points at (dead items, crash leftovers).
    used = {v["shard"] for v in index_items.values()}
    deleted = []
    for p in sorted(cache_dir.iterdir()):
        if (_shard_number(p.name) is not None and p.name not in used) or (
            p.name.startswith(".") and p.name.endswith(".tmp")
        ):
            p.unlink()
            if not p.name.startswith("."):
                deleted.append(p.name)

    size = sum((cache_dir / s).stat().st_size for s in used) + index_path.stat().st_size
    return LatentCacheReport(
        cache_dir=cache_dir,
        index_path=index_path,
        total=len(items),
        computed=len(todo),
        reused=len(items) - len([it for it in items if it["key"] in new_entries]),
        removed=removed,
        shards=sorted(used),
        shards_deleted=deleted,
        seconds=time.perf_counter() - start,
        latent_shape=list(latent_shape or []),
        embedding_shape=list(embedding_shape or []),
        scaling_factor=scaling_factor,
        bytes_on_disk=size,
        notes=notes,
    )


def load_latent_dataset(
    cache_dir: Path,
    train_dir: Path,
    *,
    base_fingerprint: str | None = None,
    resolution: int | None = None,
) -> LatentDataset:
    """Load the cached items of the current train set (captions.json order) into memory.

    ``base_fingerprint``/``resolution`` default to the ones the cache was built with; the training loop
    passes its own so a cache built for another base model or resolution is refused, not used.
    """
    cache_dir, train_dir = Path(cache_dir), Path(train_dir)
    rerun = "re-materialise the training_latents asset (or set training.cache_latents: false)"
    index = _read_index(cache_dir)
    if index is None:
        raise LatentCacheError(f"no latent cache at {cache_dir} ({INDEX_NAME} missing): {rerun}")
    fingerprint = base_fingerprint or index["base_model"]["fingerprint"]
    res = int(resolution or index["resolution"])
    items = _train_items(train_dir)

    by_shard: dict[str, list[tuple[int, str]]] = {}
    for pos, it in enumerate(items):
        key = latent_item_key(fingerprint, it["sha256"], it["caption"], res)
        entry = index["items"].get(key)
        if entry is None:
            why = []
            if fingerprint != index["base_model"].get("fingerprint"):
                why.append("the cache was built for another base model")
            if res != index.get("resolution"):
                why.append(
                    f"the cache was built at resolution {index.get('resolution')}, training uses {res}"
                )
            raise LatentCacheError(
                f"image {it['image_file']!r} (caption {it['caption'][:60]!r}) has no cached latents in "
                f"{cache_dir}{' (' + '; '.join(why) + ')' if why else ''}: {rerun}"
            )
        by_shard.setdefault(entry["shard"], []).append((pos, key))

    n = len(items)
    mean = std = text = None
    with_pooled = "pooled_shape" in index
    pooled = torch.empty((n, *index["pooled_shape"]), dtype=torch.float32) if with_pooled else None
    for shard, wanted in by_shard.items():
        path = cache_dir / shard
        if not path.is_file():
            raise LatentCacheError(f"latent shard {path} is missing: {rerun}")
        with safe_open(str(path), framework="pt") as f:
            for pos, key in wanted:
                m, s, t = f.get_tensor(f"{key}/mean"), f.get_tensor(f"{key}/std"), f.get_tensor(f"{key}/text")
                if mean is None:
                    mean = torch.empty((n, *m.shape), dtype=torch.float32)
                    std = torch.empty((n, *s.shape), dtype=torch.float32)
                    text = torch.empty((n, *t.shape), dtype=torch.float32)
                mean[pos], std[pos], text[pos] = m, s, t
                if pooled is not None:
                    pooled[pos] = f.get_tensor(f"{key}/pooled")
    if mean is None or std is None or text is None:
        raise LatentCacheError(f"the train set in {train_dir} is empty; nothing to train on")
    return LatentDataset(
        image_files=[it["image_file"] for it in items],
        captions=[it["caption"] for it in items],
        mean=mean,
        std=std,
        text_embeddings=text,
        scaling_factor=float(index["scaling_factor"]),
        pooled_embeddings=pooled,
        metadata=[it["metadata"] for it in items],
    )
