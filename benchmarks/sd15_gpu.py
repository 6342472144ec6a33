"""SD1.5-scale throughput of the training stage on a CUDA GPU: images/s, TFLOP/s, MFU, peak memory.

Uses randomly initialised weights in the exact SD1.5 architecture (speed does not depend on trained
weights) and runs this project's own ``cache_latents`` + ``train_lora`` with the recipe (LoRA r=8/α=16 on
to_k,to_q,to_v,to_out.0, effective batch 16 = 2 × 8, 512 px), sweeping precision × micro-batch × compile ×
gradient checkpointing, then switching each CUDA lever off alone. The first row is the recipe exactly (fp32,
micro-batch 2, checkpointing, no fast path). MFU counts the UNet's model FLOPs (forward + backward, from
``torch.utils.flop_counter``) against the device's dense peak for the precision. Writes ``sd15_gpu.md`` and
``sd15_gpu.json`` to ``--out`` after every variant (a time-out keeps what was measured).

The SDXL sweep (``--sweep sdxl``) runs the same stage on the exact SDXL architecture (UNet 2.57 G, both
text encoders, random init) at 1024 px: bf16, micro-batch auto, with and without ``torch.compile``, and after
each of our rows a plain diffusers SDXL LoRA step with the same settings (the loop of diffusers'
``train_text_to_image_lora_sdxl.py``: frozen bf16 UNet with fp32 LoRA parameters under bf16 autocast, AdamW,
DDPM noise, the same micro-batch, accumulation, checkpointing and compile, on precomputed latents and
embeddings), so the ratio of the two is measured in one run on one GPU. Writes ``sdxl_gpu.md`` /
``sdxl_gpu.json``.

    python benchmarks/sd15_gpu.py --out DIR [--tokenizer-dir DIR] [--only NAME ...]   # CUDA, < 8 min
    python benchmarks/sd15_gpu.py --sweep sdxl --out DIR [--tokenizer-dir DIR]         # CUDA
    python benchmarks/sd15_gpu.py --smoke --out /tmp/x [--sweep sdxl]                  # CPU, tiny widths
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def random_sdxl(
    tokenizer_dir: Path, device: str, dtype: torch.dtype, smoke: bool = False
) -> models.SDComponents:
    """SDXL's architecture with random weights (tiny-sdxl's widths with ``smoke``): UNet, VAE, CLIP ViT-L
    and the projected second text encoder, as :func:`random_sd15` for SD1.5."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shoe_lora_pipeline.core.families import SDXL

    if not (tokenizer_dir / "vocab.json").exists():
        models.clip_tokenizer_files(tokenizer_dir)
    files = (tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    torch.manual_seed(0)
    unet_cfg, vae_cfg, te_cfg, te2_cfg = (
        (models.TINY_SDXL_UNET_CONFIG, models.TINY_SDXL_VAE_CONFIG, models.TINY_SDXL_TEXT_ENCODER_CONFIG,
         models.TINY_SDXL_TEXT_ENCODER_2_CONFIG)
        if smoke
        else (models.SDXL_UNET_CONFIG, models.SDXL_VAE_CONFIG, models.SD15_TEXT_ENCODER_CONFIG,
              models.SDXL_TEXT_ENCODER_2_CONFIG)
    )  # fmt: skip
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    for m in (unet, text_encoder, text_encoder_2):
        m.requires_grad_(False).eval().to(dtype)
    vae.requires_grad_(False).eval()  # fp32: the SDXL VAE overflows in half precision
    return models.SDComponents(
        tokenizer=models.clip_tokenizer(*files),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(models.SDXL_SCHEDULER_CONFIG),
        identity={
            "base_model": "sdxl-architecture-random-init",
            "revision": None,
            "fingerprint": "random-sdxl",
        },
        family=SDXL,
        tokenizer_2=models.clip_tokenizer(*files, pad_token="!"),  # SDXL's second tokenizer pads with "!"
        text_encoder_2=text_encoder_2,
    )


def make_train_dir(root: Path, n: int, size: int = 512) -> Path:
    """n synthetic ``size``-px product-like images + captions.json in the data stage's layout."""
    images = root / "train" / "images"
    images.mkdir(parents=True)
    entries = []
    colours = [(20, 20, 20), (120, 70, 30), (235, 235, 235), (30, 60, 160)]
    k = size / 512
    for i in range(n):
        im = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(im)
        box = (60 + i % 7 * 5, 200, 450, 330)
        d.rounded_rectangle(
            tuple(round(v * k) for v in box), radius=round(50 * k), fill=colours[i % 4], outline=(90, 90, 90)
        )
        name = f"{i:05d}.png"
        im.save(images / name)
        entries.append(
            {
                "image_file": name,
                "caption": f"A professional product photo of casual shoes number {i} on white background",
                "metadata": {"original_size": [size, size], "processed": True, "source_sha256": f"{i:064x}"},
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


# SDXL at 1024 px: bf16, micro-batch auto (and checkpointing only where needed to fit), with and without
# compile; each row is followed by the plain diffusers step with the same settings (run_plain_diffusers).
SDXL_BF16 = ["training.mixed_precision=bf16", "training.micro_batch_size=auto", "training.gradient_checkpointing=auto", *FAST]  # fmt: skip
SDXL_VARIANTS: list[tuple[str, list[str]]] = [
    ("sdxl_bf16_auto_compile", [*SDXL_BF16, "training.speed.compile=true"]),
    ("sdxl_bf16_auto", [*SDXL_BF16, "training.speed.compile=false"]),
]
# --smoke runs the SDXL rows on the CPU: fp32, micro-batch 2, no compile (auto probes CUDA memory).
SDXL_SMOKE = ["training.mixed_precision=no", "training.micro_batch_size=2", "training.gradient_checkpointing=false",
              "training.speed.compile=false"]  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    config: str  # under configs/
    components: Callable[[Path, str, torch.dtype, bool], models.SDComponents]
    variants: list[tuple[str, list[str]]]
    resolution: int
    out_name: str  # <out_name>.md / .json
    description: str


SWEEPS = {
    "sd15": Sweep("casual_shoes_sd15.yaml", random_sd15, VARIANTS, 512, "sd15_gpu", "SD1.5 architecture, random init"),
    "sdxl": Sweep("casual_shoes_sdxl.yaml", random_sdxl, SDXL_VARIANTS, 1024, "sdxl_gpu",
                  "SDXL architecture (UNet 2.57 G, two text encoders), random init"),
}  # fmt: skip


def run_variant(
    name: str, overrides: list[str], args: argparse.Namespace, work: Path, sweep: Sweep = SWEEPS["sd15"]
) -> dict:
    from shoe_lora_pipeline.core.latents import cache_latents
    from shoe_lora_pipeline.core.train_data import dataset_fingerprint
    from shoe_lora_pipeline.core.training import train_lora

    if args.smoke and sweep is not SWEEPS["sd15"]:
        overrides = [*overrides, *SDXL_SMOKE]
    cfg = load_config(
        REPO / "configs" / sweep.config,
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
    comps = sweep.components(args.tokenizer_dir, kind, device_info.weight_dtype, args.smoke)
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


def run_plain_diffusers(ours: dict, cfg_overrides: list[str], args: argparse.Namespace, sweep: Sweep) -> dict:
    """The plain diffusers SDXL LoRA step with ``ours``' settings (micro-batch, accumulation, precision,
    checkpointing, compile), as diffusers' ``train_text_to_image_lora_sdxl.py`` runs it: frozen UNet in the
    weight dtype, LoRA parameters in fp32, autocast, AdamW, DDPM noise and timesteps, on precomputed latents
    and embeddings (no VAE or text encoder in the step: the same work as our cached path)."""
    from diffusers import DDPMScheduler

    from shoe_lora_pipeline.core.models import lora_config
    from shoe_lora_pipeline.core.train_speed import (
        dummy_added_conditions,
        mfu,
        peak_precision,
        set_gradient_checkpointing,
        training_flops_per_image,
    )

    if args.smoke:
        cfg_overrides = [*cfg_overrides, *SDXL_SMOKE, "dataset.resolution=128"]
    cfg = load_config(REPO / "configs" / sweep.config, check_paths=False, overrides=cfg_overrides)
    t = cfg.training
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and t.mixed_precision == "bf16"
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    comps = sweep.components(args.tokenizer_dir, device.type, weight_dtype, args.smoke)
    unet = comps.unet
    unet.add_adapter(lora_config(t.lora_rank, t.lora_alpha, t.lora_dropout, list(t.lora_target_modules)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
        p.data = p.data.float()
    set_gradient_checkpointing(unet, bool(ours["gradient_checkpointing"]))
    unet.train()
    if cuda and t.speed.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = torch.compile(unet) if ours["compile"] else unet
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=cuda)
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    micro, accumulation = int(ours["micro_batch"]), int(ours["accumulation"])
    side = cfg.dataset.resolution // comps.vae_scale_factor
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn((micro, 4, side, side), generator=gen, device=device, dtype=weight_dtype)
    text = torch.randn(
        (micro, 77, unet.config.cross_attention_dim), generator=gen, device=device, dtype=weight_dtype
    )
    added = dummy_added_conditions(unet.config, micro, device, weight_dtype)

    def optimizer_step() -> float:
        for _ in range(accumulation):
            noise = torch.randn(latents.shape, generator=gen, device=device, dtype=weight_dtype)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (micro,), device=device, generator=gen
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = model(noisy, timesteps, encoder_hidden_states=text, return_dict=False, **added)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float()) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        optimizer_step()
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(args.steps):
        last = optimizer_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t1) / args.steps
    images_per_second = micro * accumulation / seconds
    lora = {
        "rank": t.lora_rank,
        "alpha": t.lora_alpha,
        "dropout": t.lora_dropout,
        "target_modules": list(t.lora_target_modules),
    }
    flops = training_flops_per_image(unet, lora, tuple(latents.shape[1:]))
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    through = mfu(
        images_per_second,
        flops,
        device_name,
        peak_precision(t.mixed_precision if cuda else "no", t.speed.tf32),
    )
    row = {
        "variant": f"{ours['variant']}__plain_diffusers",
        "mixed_precision": t.mixed_precision if cuda else "no",
        "micro_batch": micro,
        "accumulation": accumulation,
        "gradient_checkpointing": ours["gradient_checkpointing"],
        "compile": ours["compile"],
        "seconds_per_optimizer_step": round(seconds, 4),
        "images_per_second": round(images_per_second, 2),
        "tflops_per_second": round(through.tflops_per_second, 1) if through.tflops_per_second else None,
        "mfu": round(through.mfu, 4) if through.mfu is not None else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loss_last": round(last, 4),
    }  # fmt: skip
    if ours.get("images_per_second"):
        ratio = ours["images_per_second"] / images_per_second
        ours["vs_plain_diffusers"] = f"{ratio:.2f}× (ours / plain)"
    print(json.dumps(row), flush=True)
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
SDXL_COLUMNS = [*COLUMNS, "vs_plain_diffusers"]


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
    ap.add_argument(
        "--sweep", choices=sorted(SWEEPS), default="sd15", help="sd15 (default) or sdxl at 1024 px"
    )
    args = ap.parse_args()
    sweep = SWEEPS[args.sweep]
    if args.smoke:
        args.warmup, args.steps, args.images = 1, 1, 4
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke)"
    WARM_AND_MEASURED[0] = args.warmup + args.steps
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"{args.sweep}-bench-"))
    # --smoke trains at 128 px (dataset.resolution below); SD1.5's smoke keeps its 512 px photos.
    photo_size = 128 if args.smoke and sweep is not SWEEPS["sd15"] else sweep.resolution
    make_train_dir(work / "data", args.images, photo_size)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def attempt(name: str, run: Callable[..., dict], *run_args: object) -> dict | None:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"variant": name, "error": f"not run: the {args.budget_s:.0f} s budget was spent"})
            return None
        try:
            rows.append(run(*run_args))
        except Exception as exc:  # one failing variant must not lose the others' numbers
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
        write_outputs(rows, args, start, sweep)
        return rows[-1]

    for name, overrides in sweep.variants:
        if args.only and name not in args.only:
            continue
        ours = attempt(name, run_variant, name, overrides, args, work, sweep)
        if sweep is SWEEPS["sdxl"] and ours is not None and "error" not in ours:
            # The baseline of this row, with its resolved micro-batch and checkpointing, in the same run.
            attempt(f"{name}__plain_diffusers", run_plain_diffusers, ours, overrides, args, sweep)
    print((args.out / f"{sweep.out_name}.md").read_text())


def write_outputs(
    rows: list[dict], args: argparse.Namespace, start: float, sweep: Sweep = SWEEPS["sd15"]
) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (--smoke on CPU)"
    columns = SDXL_COLUMNS if sweep is SWEEPS["sdxl"] else COLUMNS
    resolution = 128 if args.smoke and sweep is SWEEPS["sdxl"] else sweep.resolution
    header = (
        f"GPU: {gpu}; torch {torch.__version__}; python {platform.python_version()}; "
        f"{'tiny widths (--smoke)' if args.smoke else sweep.description}; effective batch "
        f"16 at {resolution} px; {args.warmup} warm-up + {args.steps} measured optimizer steps per variant; "
        f"{time.perf_counter() - start:.0f} s in all\n\n"
    )
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    for r in rows:
        if "error" in r:
            cells = [r["variant"], r["error"]] + [""] * (len(columns) - 2)
        else:
            cells = [str(r.get(c, "")) for c in columns]
        table += "| " + " | ".join(cells) + " |\n"
    text = header + table + ("\n" + payback(rows) + "\n" if sweep is SWEEPS["sd15"] else "")
    (args.out / f"{sweep.out_name}.md").write_text(text)
    (args.out / f"{sweep.out_name}.json").write_text(
        json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
