"""Files and folders written through the atomic helpers get the mode a plain ``open()`` / ``mkdir`` gives
(0666 / 0777 less the umask), not mkstemp's 0600 / mkdtemp's 0700: a merchandiser's account or a web server
must be able to read ``published/``, ``reviews.csv`` and the LoRA files."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoe_lora_pipeline.core.fsutil import (
    atomic_directory,
    atomic_write_file,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
)


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_helpers_follow_the_umask(tmp_path: Path, umask: int) -> None:
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()

    written = [
        atomic_write_text(tmp_path / "reviews.csv", "sku,file\n"),
        atomic_write_json(tmp_path / "index.json", {"a": 1}),
        atomic_write_file(tmp_path / "weights.bin", lambda p: Path(p).write_bytes(b"w")),
        # safetensors (>= 0.8) replaces the file it is given with one of its own, mode 0600
        atomic_write_file(
            tmp_path / "latents.safetensors", lambda p: save_file({"x": torch.ones(2)}, str(p))
        ),
    ]
    with atomic_writer(tmp_path / "manifest.csv") as fh:
        fh.write("sku\n")
    written.append(tmp_path / "manifest.csv")
    with atomic_directory(tmp_path / "published") as tmp:
        (tmp / "CS-1").mkdir()
        atomic_write_text(tmp / "CS-1" / "a.txt", "a")
        save_file({"x": torch.ones(2)}, str(tmp / "CS-1" / "b.safetensors"))

    for path in [*written, *(tmp_path / "published" / "CS-1").iterdir()]:
        assert mode(path) == 0o666 & ~umask == mode(plain_file), path
    for folder in (tmp_path / "published", tmp_path / "published" / "CS-1"):
        assert mode(folder) == 0o777 & ~umask == mode(plain_dir), folder
    if umask == 0o022:
        assert mode(tmp_path / "reviews.csv") == 0o644 and mode(tmp_path / "published") == 0o755

    # Replacing an existing file or folder (as every re-run does) gives the same modes.
    atomic_write_text(tmp_path / "reviews.csv", "sku,file,decision\n")
    with atomic_directory(tmp_path / "published"):
        pass
    assert mode(tmp_path / "reviews.csv") == 0o666 & ~umask
    assert mode(tmp_path / "published") == 0o777 & ~umask


def test_tiny_model_folder_follows_the_umask(tmp_path: Path, umask: int) -> None:
    from shoe_lora_pipeline.core.models import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "tiny-sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert mode(folder) == mode(folder / "unet") == 0o777 & ~umask
    assert mode(weights) == mode(folder / "model_index.json") == 0o666 & ~umask
