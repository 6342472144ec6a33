"""SD1.5-scale timing and memory of the training stage on a CUDA GPU.

Uses randomly initialised weights in the exact SD1.5 architecture (timing does not need trained weights)
and runs this project's own code: ``cache_latents`` and ``train_lora`` with the reference recipe
(LoRA r=8/α=16 on to_k,to_q,to_v,to_out.0, batch 2 × accumulation 8, 512 px), varying one thing at a
time: precision, gradient checkpointing, latent caching. Prints a markdown table and writes it (plus JSON)
to ``--out``.

    python benchmarks/sd15_gpu.py --out /tmp/bench [--tokenizer-dir DIR] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoe_lora_pipeline.core import models  # noqa: E402
from shoe_lora_pipeline.core.config import load_config  # noqa: E402
from shoe_lora_pipeline.core.device import choose_device  # noqa: E402


def random_sd15(
    tokenizer_dir: Path, device: str, dtype: torch.dtype, smoke: bool = False
) -> models.SDComponents:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # The GPU machine has no open_clip: the vocab files are prepared here and carried (--tokenizer-dir).
    if (tokenizer_dir / "vocab.json").exists():
        tokenizer = models.clip_tokenizer(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    else:
        tokenizer = models.clip_tokenizer(*models.clip_tokenizer_files(tokenizer_dir))
    torch.manual_seed(0)
    # --smoke: the tiny widths on the CPU, to check this script before spending GPU time on it.
    unet_cfg, vae_cfg, te_cfg = (
        (models.TINY_UNET_CONFIG, models.TINY_VAE_CONFIG, models.TINY_TEXT_ENCODER_CONFIG)
        if smoke
        else (models.SD15_UNET_CONFIG, models.SD15_VAE_CONFIG, models.SD15_TEXT_ENCODER_CONFIG)
    )
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval().to(dtype)
    return models.SDComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=PNDMScheduler.from_config(models.SD15_SCHEDULER_CONFIG),
        identity={
            "base_model": "sd15-architecture-random-init",
            "revision": None,
            "fingerprint": "random-sd15",
        },
    )


def make_train_dir(root: Path, n: int) -> Path:
    """n synthetic 512px product-like images + captions.json in the data stage's layout."""
    images = root / "train" / "images"
    images.mkdir(parents=True)
    entries = []
    colours = [(20, 20, 20), (120, 70, 30), (235, 235, 235), (30, 60, 160)]
    for i in range(n):
        im = Image.new("RGB", (512, 512), "white")
        d = ImageDraw.Draw(im)
        d.rounded_rectangle(
            (60 + i % 7 * 5, 200, 450, 330), radius=50, fill=colours[i % 4], outline=(90, 90, 90)
        )
        name = f"{i:05d}.png"
        im.save(images / name)
        entries.append(
            {
                "image_file": name,
                "caption": f"A professional product photo of casual shoes number {i} on white background",
                "metadata": {"original_size": [512, 512], "processed": True, "source_sha256": f"{i:064x}"},
            }
        )
    (root / "train" / "captions.json").write_text(json.dumps(entries))
    return root / "train"


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, work: Path) -> dict:
    from shoe_lora_pipeline.core.latents import cache_latents
    from shoe_lora_pipeline.core.train_data import dataset_fingerprint
    from shoe_lora_pipeline.core.training import train_lora

    cfg = load_config(
        REPO / "configs" / "casual_shoes_sd15.yaml",
        check_paths=False,
        overrides=[
            f"training.output_dir={work / name}",
            "training.checkpointing_steps=100000",
            "training.validation_steps=100000",
            "training.log_every_steps=1",
            *(["training.gradient_accumulation_steps=2"] if args.smoke else []),
            *overrides,
        ],
    )
    kind = "cpu" if args.smoke else "cuda"
    device_info = choose_device(kind, cfg.training.mixed_precision)
    if args.smoke and cfg.training.mixed_precision != "no":
        return {"variant": name, "error": "skipped in --smoke (mixed precision is CUDA only)"}
    cuda = kind == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    comps = random_sd15(args.tokenizer_dir, kind, device_info.weight_dtype, smoke=args.smoke)
    train_dir = work / "data" / "train"
    latents_dir = work / "latents" / device_info.mixed_precision
    cache_s = None
    if cfg.training.cache_latents:
        t0 = time.perf_counter()
        report = cache_latents(
            comps, train_dir, latents_dir, 512, 8, device_info.torch_device, device_info.weight_dtype
        )
        cache_s = time.perf_counter() - t0
        assert report.computed in (0, args.images)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_lora(
        cfg,
        comps,
        device_info,
        train_dir=train_dir,
        latents_dir=latents_dir if cfg.training.cache_latents else None,
        output_dir=work / name,
        dataset_fingerprint=dataset_fingerprint(train_dir),
        max_steps_this_run=args.steps,
    )
    wall = time.perf_counter() - t0
    step_s = [r["seconds"] for r in result.losses[1:]]  # first step pays kernel selection / allocator warm-up
    sec = sum(step_s) / len(step_s)
    imgs_per_step = cfg.training.train_batch_size * cfg.training.gradient_accumulation_steps
    row = {
        "variant": name,
        "mixed_precision": cfg.training.mixed_precision,
        "gradient_checkpointing": cfg.training.gradient_checkpointing,
        "cache_latents": cfg.training.cache_latents,
        "sec_per_optimizer_step": round(sec, 3),
        "images_per_s": round(imgs_per_step / sec, 2),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "latent_cache_s": round(cache_s, 1) if cache_s is not None else None,
        "wall_s": round(wall, 1),
        "loss_last": round(result.losses[-1]["loss"], 4),
    }
    print(json.dumps(row), flush=True)
    del comps, result
    return row


VARIANTS = [
    ("recipe_fp32_ckpt_cached", []),
    ("fp32_nockpt_cached", ["training.gradient_checkpointing=false"]),
    ("bf16_ckpt_cached", ["training.mixed_precision=bf16"]),
    ("bf16_nockpt_cached", ["training.mixed_precision=bf16", "training.gradient_checkpointing=false"]),
    ("fp16_nockpt_cached", ["training.mixed_precision=fp16", "training.gradient_checkpointing=false"]),
    ("recipe_fp32_ckpt_uncached", ["training.cache_latents=false"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--tokenizer-dir", type=Path, default=Path(tempfile.mkdtemp()))
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (first one excluded)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.images = 2, 4
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke)"
    work = Path(tempfile.mkdtemp(prefix="sd15-bench-"))
    make_train_dir(work / "data", args.images)
    rows = []
    for name, overrides in VARIANTS:
        if args.only and name not in args.only:
            continue
        try:
            rows.append(run_variant(name, overrides, args, work))
        except Exception as exc:  # one failing variant must not lose the others' numbers
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (--smoke on CPU)"
    header = (
        f"GPU: {gpu}; torch {torch.__version__}; python {platform.python_version()}; "
        f"SD1.5 architecture, random init; batch 2 × accumulation 8 at 512 px; "
        f"{args.steps} optimizer steps per variant, first excluded\n\n"
    )
    cols = [
        "variant",
        "sec_per_optimizer_step",
        "images_per_s",
        "peak_gpu_mem_gib",
        "latent_cache_s",
        "trainable_params",
    ]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        table += "| " + " | ".join(str(r.get(c, r.get("error", ""))) for c in cols) + " |\n"
    print(header + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sd15_gpu.md").write_text(header + table)
    (args.out / "sd15_gpu.json").write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
