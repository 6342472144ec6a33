"""SD1.5-scale throughput of the training stage on a CUDA GPU: images/s, TFLOP/s, MFU, peak memory.

Uses randomly initialised weights in the exact SD1.5 architecture (speed does not depend on trained
weights) and runs this project's own ``cache_latents`` + ``train_lora`` with the recipe (LoRA r=8/α=16 on
to_k,to_q,to_v,to_out.0, effective batch 16 = 2 × 8, 512 px), sweeping precision × micro-batch × compile ×
gradient checkpointing, then switching each CUDA lever off alone. The first row is the recipe exactly (fp32,
micro-batch 2, checkpointing, no fast path). MFU counts the UNet's model FLOPs (forward + backward, from
``torch.utils.flop_counter``) against the device's dense peak for the precision. Writes ``sd15_gpu.md`` and
``sd15_gpu.json`` to ``--out`` after every variant (a time-out keeps what was measured).

    python benchmarks/sd15_gpu.py --out DIR [--tokenizer-dir DIR] [--only NAME ...]   # CUDA, < 8 min
    python benchmarks/sd15_gpu.py --smoke --out /tmp/x                                 # CPU, tiny widths
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


# The sweep: precision × micro-batch × compile × checkpointing, then each CUDA lever switched off alone from
# the best plain row (its "measured default"). Every row has the recipe's effective batch of 16 images.
FAST = ["training.speed.tf32=true", "training.speed.channels_last=true", "training.speed.fused_optimizer=true",
        "training.speed.data_on_device=true", "training.speed.sdpa=true"]  # fmt: skip
SLOW = ["training.speed.tf32=false", "training.speed.channels_last=false", "training.speed.fused_optimizer=false",
        "training.speed.data_on_device=false", "training.speed.compile=false"]  # fmt: skip
VARIANTS: list[tuple[str, list[str]]] = [
    ("recipe_fp32_micro2_ckpt", ["training.micro_batch_size=2", "training.gradient_checkpointing=true", *SLOW]),
    ("bf16_micro16", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST]),
    ("bf16_micro16_compile", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.compile=true"]),
    ("fp32_tf32_micro16", ["training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST]),
    ("bf16_micro8", ["training.mixed_precision=bf16", "training.micro_batch_size=8", "training.gradient_checkpointing=false", *FAST]),
    ("bf16_micro4", ["training.mixed_precision=bf16", "training.micro_batch_size=4", "training.gradient_checkpointing=false", *FAST]),
    ("bf16_micro2", ["training.mixed_precision=bf16", "training.micro_batch_size=2", "training.gradient_checkpointing=false", *FAST]),
    ("bf16_micro16_ckpt", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=true", *FAST]),
    ("bf16_auto", ["training.mixed_precision=bf16", "training.micro_batch_size=auto", "training.gradient_checkpointing=auto", *FAST]),
    ("bf16_micro16_no_channels_last", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.channels_last=false"]),
    ("bf16_micro16_no_fused_adamw", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.fused_optimizer=false"]),
    ("bf16_micro16_no_sdpa", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.sdpa=false"]),
    ("bf16_micro16_data_on_host", ["training.mixed_precision=bf16", "training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.data_on_device=false"]),
    ("fp32_strict_micro16", ["training.micro_batch_size=16", "training.gradient_checkpointing=false", *FAST, "training.speed.tf32=false"]),
]  # fmt: skip


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
            # one host sync per `warmup` steps: the first window (compilation, allocator growth) is left
            # out of the measured throughput, the later windows are the measurement
            f"training.log_every_steps={args.warmup}",
            # --smoke checks the script, not the speed: 128 px keeps it to about a minute on 2 CPU cores
            *(["dataset.resolution=128"] if args.smoke else []),
            *overrides,
        ],
    )
    kind = "cpu" if args.smoke else "cuda"
    device_info = choose_device(kind, cfg.training.mixed_precision)
    if args.smoke and cfg.training.mixed_precision != "no":
        return {"variant": name, "error": "skipped in --smoke (mixed precision is CUDA only)"}
    if args.smoke and cfg.training.micro_batch_size == "auto":
        return {"variant": name, "error": "skipped in --smoke (auto probes CUDA memory)"}
    cuda = kind == "cuda"
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    comps = random_sd15(args.tokenizer_dir, kind, device_info.weight_dtype, smoke=args.smoke)
    train_dir = work / "data" / "train"
    latents_dir = work / "latents" / f"{device_info.mixed_precision}-{cfg.dataset.resolution}"
    if cfg.training.cache_latents:
        res = cfg.dataset.resolution
        cache_latents(
            comps, train_dir, latents_dir, res, 8, device_info.torch_device, device_info.weight_dtype
        )
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
        max_steps_this_run=args.warmup + args.steps,
    )
    row = {
        "variant": name,
        "mixed_precision": cfg.training.mixed_precision,
        "micro_batch": result.micro_batch_size,
        "accumulation": result.accumulation_steps,
        "gradient_checkpointing": result.gradient_checkpointing,
        "compile": cfg.training.speed.compile,
        "seconds_per_optimizer_step": round(result.seconds_per_step, 4),
        "images_per_second": round(result.images_per_second, 2),
        "tflops_per_second": round(result.tflops_per_second, 1) if result.tflops_per_second else None,
        "mfu": round(result.mfu, 4) if result.mfu is not None else None,
        "mfu_peak": result.mfu_peak,
        "peak_memory_gib": round(result.peak_memory_mb / 1024, 2) if result.peak_memory_mb else None,
        "wall_s": round(time.perf_counter() - t0, 1),
        "unet_tflop_per_image": round(result.flops_per_image / 1e12, 3) if result.flops_per_image else None,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "loss_last": round(result.losses[-1]["loss"], 4),
        "log_notes": [ln.strip() for ln in result.log_path.read_text().splitlines() if "attention processors" in ln or "torch.compile" in ln or "fits" in ln][-3:],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    del comps, result
    return row


def payback(rows: list[dict]) -> str:
    """When the compile row's extra warm-up is paid back by its faster steps (same steps in both rows)."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    plain, compiled = by.get("bf16_micro16"), by.get("bf16_micro16_compile")
    if not plain or not compiled:
        return "compile: not measured"
    saved = plain["seconds_per_optimizer_step"] - compiled["seconds_per_optimizer_step"]
    extra = compiled["wall_s"] - plain["wall_s"] + saved * WARM_AND_MEASURED[0]
    if saved <= 0:
        return f"compile: no faster per step ({compiled['seconds_per_optimizer_step']} vs {plain['seconds_per_optimizer_step']} s); warm-up ≈ {extra:.0f} s more"
    return f"compile: ≈ {extra:.0f} s more warm-up, {saved * 1000:.1f} ms saved per optimizer step → pays back after ≈ {extra / saved:.0f} steps (the recipe has 3000)"  # fmt: skip


WARM_AND_MEASURED = [0]
COLUMNS = ["variant", "mixed_precision", "micro_batch", "accumulation", "gradient_checkpointing", "compile",
           "seconds_per_optimizer_step", "images_per_second", "tflops_per_second", "mfu", "peak_memory_gib", "wall_s"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--tokenizer-dir", type=Path, default=Path(tempfile.mkdtemp()))
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the measurement")
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per variant")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining variants after this")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    args = ap.parse_args()
    if args.smoke:
        args.warmup, args.steps, args.images = 1, 1, 4
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke)"
    WARM_AND_MEASURED[0] = args.warmup + args.steps
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sd15-bench-"))
    make_train_dir(work / "data", args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in VARIANTS:
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - start > args.budget_s:
            rows.append({"variant": name, "error": f"not run: the {args.budget_s:.0f} s budget was spent"})
            continue
        try:
            rows.append(run_variant(name, overrides, args, work))
        except Exception as exc:  # one failing variant must not lose the others' numbers
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
        write_outputs(rows, args, start)
    print((args.out / "sd15_gpu.md").read_text())


def write_outputs(rows: list[dict], args: argparse.Namespace, start: float) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (--smoke on CPU)"
    header = (
        f"GPU: {gpu}; torch {torch.__version__}; python {platform.python_version()}; "
        f"{'tiny widths (--smoke)' if args.smoke else 'SD1.5 architecture, random init'}; effective batch "
        f"16 at 512 px; {args.warmup} warm-up + {args.steps} measured optimizer steps per variant; "
        f"{time.perf_counter() - start:.0f} s in all\n\n"
    )
    table = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    for r in rows:
        if "error" in r:
            cells = [r["variant"], r["error"]] + [""] * (len(COLUMNS) - 2)
        else:
            cells = [str(r.get(c, "")) for c in COLUMNS]
        table += "| " + " | ".join(cells) + " |\n"
    text = header + table + "\n" + payback(rows) + "\n"
    (args.out / "sd15_gpu.md").write_text(text)
    (args.out / "sd15_gpu.json").write_text(
        json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
