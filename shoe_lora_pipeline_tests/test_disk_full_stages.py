"""A full disk in the later stages: latents, validation images, export, renders, publishing; an injected
``OSError(ENOSPC)`` at the lowest write each stage makes, and a real small tmpfs where the tests run as
root. The step fails with a DiskFullError that names the folder; the previous output stays as it was and
no temporary folder is left. Cleaning, captions, checkpoints and losses.csv are
in test_disk_full.py and training/test_disk_full.py."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.fsutil import DiskFullError
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline_tests.support.disk import FILLER, enospc, fill, small_tmpfs
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or ".staging" in p.name)


def assert_disk_full(err: DiskFullError, folder: Path) -> None:
    assert err.errno == errno.ENOSPC and err.folder == folder
    assert f"the disk is full writing in {folder} (" in str(err) and " free)" in str(err)


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_export_on_a_full_disk_keeps_the_previous_lora_weights(disk, tmp_path, tiny_sd_cache, monkeypatch):
    """Injected: the kohya file's safetensors write fails. tmpfs (root only): a real small disk left full,
    where the first write that does not fit fails, as safetensors' own Rust error ("os error 28") too."""
    import safetensors.torch
    from safetensors.torch import load_file

    base = tiny_sd_path(tiny_sd_cache)
    with contextlib.ExitStack() as stack:
        folder = tmp_path / "disk"
        if disk == "tmpfs":
            stack.enter_context(small_tmpfs(folder, 2))
        else:
            folder.mkdir()
        out = folder / "lora_weights"
        stack.enter_context(one_torch_thread())
        ckpt, _ = make_training_checkpoint(tmp_path / "train", base, rank=4, alpha=4, step=4)
        export = lambda: lora_io.export_lora(  # noqa: E731
            ckpt,
            out,
            dataset_name="casual_shoes",
            provenance={"dagster_run_id": "r1"},
            training_output_dir=tmp_path / "train",
        )
        first = export()
        before = snapshot(out)
        if disk == "tmpfs":
            fill(folder, leave=4096)
        else:
            monkeypatch.setattr(safetensors.torch, "save_file", enospc)
        with pytest.raises(DiskFullError) as err:
            export()
        assert_disk_full(err.value, folder)
        assert snapshot(out) == before
        assert temporaries(folder) == []
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["lora_weights", *[FILLER] * (disk == "tmpfs")]
        )
        assert sorted(load_file(first.kohya_weights))  # the previous set still loads
        assert lora_io.read_provenance(first.kohya_weights)


# ------------------------------------------------------------------------------------------------
# Renders and publishing: one render of the tiny LoRA (test_renders.py's fixtures), copied per test.
# ------------------------------------------------------------------------------------------------

from shoe_lora_pipeline_tests.renders.test_renders import GOOD, exported, pipe, project, render  # noqa: E402

__all__ = ["exported", "pipe"]  # fixtures used by name


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, exported: Path, pipe: object) -> Path:
    """A project whose renders/ holds the candidates of GOOD, approved automatically, with drawn white
    shoes in place of the noise (so that they publish) and one published set."""
    from shoe_lora_pipeline.core.renders.review import review_renders
    from shoe_lora_pipeline.core.renders.store import RenderPaths
    from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker

    root = tmp_path_factory.mktemp("rendered")
    cfg = project(root, exported, GOOD)
    renders = root / "out" / "lora" / "renders"
    render(cfg, renders, lambda: (pipe, []))
    for png in (renders / "candidates").rglob("*.png"):
        white_sneaker(1024, (250, 450, 800, 700)).save(png)
    paths = RenderPaths(renders)
    review_renders(paths, auto_approve=True, require_qa_pass=False)
    publish_once(paths)
    assert list((paths.published_dir / "amazon_main").rglob("*.jpg"))
    assert list((paths.published_dir / "shopify").rglob("*.*"))
    return root


def publish_once(paths: object, version: str | None = None) -> object:
    from shoe_lora_pipeline.core.marketplace import BUILTIN_PROFILES
    from shoe_lora_pipeline.core.renders.publish import PublishOptions, publish_renders

    options = PublishOptions((BUILTIN_PROFILES["amazon_main"], BUILTIN_PROFILES["shopify"]))
    return publish_renders(
        paths, options=options, config_hash="c", run_id="r", version=version, log=lambda _: None
    )


def copy_project(rendered: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    root = tmp_path / "project"
    shutil.copytree(rendered, root)
    return root, root / "out" / "lora" / "renders"


def test_publishing_on_a_full_disk_keeps_the_previous_published_set(rendered, tmp_path, monkeypatch):
    from shoe_lora_pipeline.core.renders.store import RenderPaths

    _, renders = copy_project(rendered, tmp_path)
    paths = RenderPaths(renders)
    before = snapshot(paths.published_dir)
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:  # the second profile's staged file finds the disk full
        return enospc() if ".partial" in self.name and "shopify" in str(self) else real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError) as err:
        publish_once(paths, version="v2")  # other files than the published ones (their EXIF names it)
    assert_disk_full(err.value, paths.published_dir)
    assert snapshot(paths.published_dir) == before
    assert temporaries(renders) == [] and not list(renders.rglob("*.partial*"))


def test_publishing_keeps_the_previous_set_when_the_manifest_does_not_fit(rendered, tmp_path, monkeypatch):
    from shoe_lora_pipeline.core import fsutil
    from shoe_lora_pipeline.core.renders.store import RenderPaths

    _, renders = copy_project(rendered, tmp_path)
    paths = RenderPaths(renders)
    before = snapshot(paths.published_dir)
    real = fsutil.fsync_file
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: enospc() if "manifest.csv" in p.name else real(p))
    with pytest.raises(DiskFullError) as err:
        publish_once(paths, version="v2")
    assert_disk_full(err.value, paths.published_dir)
    assert snapshot(paths.published_dir) == before  # the images and manifest.csv of one publish
    assert temporaries(renders) == []
    monkeypatch.undo()
    publish_once(paths, version="v2")
    assert snapshot(paths.published_dir) != before


def test_publishing_on_a_real_full_disk_keeps_the_previous_published_set(rendered, tmp_path):
    """The renders folder on a small tmpfs (root only), left full: the first write that does not fit."""
    import shutil

    from shoe_lora_pipeline.core.renders.store import RenderPaths

    with small_tmpfs(tmp_path / "disk", 64) as disk:
        renders = disk / "renders"
        shutil.copytree(rendered / "out" / "lora" / "renders", renders)
        paths = RenderPaths(renders)
        before = snapshot(paths.published_dir)
        fill(disk, leave=4096)
        with pytest.raises(DiskFullError) as err:
            publish_once(paths, version="v2")
        assert_disk_full(err.value, paths.published_dir)
        assert snapshot(paths.published_dir) == before
        assert temporaries(renders) == [] and not list(renders.rglob("*.partial*"))


def test_renders_on_a_full_disk_keep_the_previous_candidates(rendered, pipe, tmp_path, monkeypatch):
    from PIL import Image

    root, renders = copy_project(rendered, tmp_path)
    before = snapshot(renders)
    (root / "specs.csv").write_text(GOOD.replace("CS-1,black", "CS-1,brown"), encoding="utf-8")
    monkeypatch.setattr(Image.Image, "save", enospc)  # the new candidate PNG's write finds the disk full
    with pytest.raises(DiskFullError) as err:
        render(root / "renders.yaml", renders, lambda: (pipe, []))
    assert_disk_full(err.value, renders)
    assert snapshot(renders) == before
    assert temporaries(renders) == []


def test_validation_images_on_a_full_disk_keep_the_earlier_ones(load_components, tmp_path, monkeypatch):
    import torch
    from PIL import Image

    from shoe_lora_pipeline.core.validation import encode_validation_prompts, run_validation

    components = load_components()
    prompts = encode_validation_prompts(components, ["a black casual shoe"], torch.device("cpu"))
    out = tmp_path / "validation"

    def validate(step: int) -> object:
        return run_validation(
            components.unet, components, prompts, out_dir=out, step=step, epoch=0, seed=1, num_images=1,
            num_inference_steps=1, guidance_scale=1.0, resolution=32, device=torch.device("cpu"),
        )  # fmt: skip

    validate(1)
    before = snapshot(out)
    assert len(before) == 2  # one image and the grid
    monkeypatch.setattr(Image.Image, "save", enospc)  # the next image's write finds the disk full
    with pytest.raises(DiskFullError) as err:
        validate(2)
    assert_disk_full(err.value, out)
    assert snapshot(out) == before and temporaries(out) == []


def test_latent_cache_on_a_full_disk_keeps_the_previous_shards(load_components, tmp_path, monkeypatch):
    from shoe_lora_pipeline.core import latents
    from shoe_lora_pipeline_tests.support.training import make_train_set

    components = load_components()
    cache = tmp_path / "latents"
    latents.cache_latents(components, make_train_set(tmp_path / "a", n=2, resolution=64), cache, 64, 2, "cpu")
    before = snapshot(cache)
    # Two more images: a new shard to write, whose safetensors write finds the disk full.
    monkeypatch.setattr(latents, "save_file", enospc)
    with pytest.raises(DiskFullError) as err:
        latents.cache_latents(
            components, make_train_set(tmp_path / "b", n=4, resolution=64), cache, 64, 2, "cpu"
        )
    assert_disk_full(err.value, cache)
    assert snapshot(cache) == before and temporaries(cache) == []
    monkeypatch.undo()  # space freed: the cache completes and loads
    report = latents.cache_latents(components, tmp_path / "b" / "train", cache, 64, 2, "cpu")
    assert report.total == 4
    assert len(latents.load_latent_dataset(cache, tmp_path / "b" / "train")) == 4


def test_renders_on_a_real_full_disk_keep_the_previous_candidates(rendered, pipe, tmp_path):
    """The renders folder on a small tmpfs (root only), left full while new candidates are drawn."""
    import shutil

    root, _ = copy_project(rendered, tmp_path)
    with small_tmpfs(tmp_path / "disk", 64) as disk:
        renders = disk / "renders"
        shutil.copytree(root / "out" / "lora" / "renders", renders)
        before = snapshot(renders)
        (root / "specs.csv").write_text(GOOD.replace("CS-1,black", "CS-1,brown"), encoding="utf-8")
        fill(disk, leave=4096)
        with pytest.raises(DiskFullError) as err:
            render(root / "renders.yaml", renders, lambda: (pipe, []))
        assert_disk_full(err.value, renders)
        assert snapshot(renders) == before
        assert temporaries(renders) == []
