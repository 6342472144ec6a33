"""Training-step cost on the tiny SD-shaped model: this project against the reference trainer's step.

Runs this project's own ``cache_latents`` + ``train_lora`` (the reference recipe: LoRA r=8/α=16 on
to_k,to_q,to_v,to_out.0) at 512 px, batch 2 × accumulation 2, with cached and uncached latents, and beside
them the baseline: the per-step work of diffusers' ``train_text_to_image_lora.py`` on the same model and
images (each micro-batch read from disk and transformed, VAE-encoded and ``latent_dist.sample()``-d, the
captions tokenized and run through the text encoder, the UNet forward/backward under
``accelerator.accumulate``, the loss gathered to the host every micro-batch). Per variant it measures:

* seconds per optimizer step (mean ± sd over the measured steps; the first ``--warmup`` steps excluded),
* training images per second (= batch × accumulation / seconds per step),
* peak memory: the process's peak RSS on the CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA.

Each variant runs in a fresh subprocess, so peak RSS is that variant's alone. The one-off cost of
encoding the latent cache is reported separately. Prints a markdown table (and writes it to ``--out``).

    python benchmarks/train_step.py [--device cpu|cuda] [--mixed-precision no|fp16|bf16] [--steps 6]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A "--before" child imports the package from another checkout (the code before a change) instead.
sys.path.insert(0, os.environ.get("SHOE_LORA_TREE") or str(REPO))


def make_dataset(root: Path, n: int, resolution: int) -> Path:
    """n synthetic 'shoe' photos + captions.json in the data stage's layout."""
    from PIL import Image, ImageDraw

    train = root / "train"
    (train / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        img = Image.new("RGB", (resolution, resolution), "white")
        s = resolution / 128
        ImageDraw.Draw(img).ellipse((10 * s + i, 50 * s, 110 * s, 90 * s + i), fill=(30 * i % 256, 90, 160))
        name = f"{10001 + i}.png"
        img.save(train / "images" / name)
        entries.append(
            {
                "image_file": name,
                "caption": f"A professional product photo of shoe number {i} on white background",
                "metadata": {"original_size": [resolution, resolution], "processed": True},
            }
        )
    (train / "captions.json").write_text(json.dumps(entries))
    return train


def make_cfg(args: argparse.Namespace, out: Path, cached: bool):
    from shoe_lora_pipeline.core.config import PipelineConfig

    return PipelineConfig(
        dataset={"raw_dir": out, "output_dir": out, "resolution": args.resolution},
        training={
            "output_dir": out / "lora",
            "train_batch_size": args.batch,
            "gradient_accumulation_steps": args.accum,
            # The loop is stopped by max_steps_this_run before the end: no final checkpoint or validation
            # inside the measurement, and peak memory is the training loop's.
            "max_train_steps": 10_000,
            "checkpointing_steps": 10_000,
            "validation_steps": 10_000,
            "lr_warmup_steps": 1,
            "gradient_checkpointing": args.gradient_checkpointing,
            "mixed_precision": args.mixed_precision,
            "cache_latents": cached,
            "log_every_steps": 1,
        },
    )


def reference_child(args: argparse.Namespace) -> dict:
    """The baseline: diffusers' train_text_to_image_lora.py training step, written out for this benchmark
    (its data pipeline, encoders every step, accelerate accumulation, one host read of the loss per
    micro-batch), on the same tiny model, images, LoRA and optimizer settings."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from PIL import Image
    from torchvision import transforms

    from shoe_lora_pipeline.core.models import load_base_model, lora_config

    work = Path(args.work)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accum, mixed_precision=args.mixed_precision, cpu=args.device == "cpu"
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    c = load_base_model("tiny-sd", cache_dir=work / "model")
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    c.unet.add_adapter(lora_config(8, 16, 0.0, ["to_k", "to_q", "to_v", "to_out.0"]))
    if args.mixed_precision != "no":
        cast_training_params(c.unet, dtype=torch.float32)
    for m in (c.unet, c.vae, c.text_encoder):
        m.to(accelerator.device, dtype=weight_dtype if m is not c.unet else None)
    if args.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
    lora_layers = [p for p in c.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    entries = json.loads((work / "data" / "train" / "captions.json").read_text())
    tf = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip

    def collate(batch: list[dict]) -> dict:
        pixels = torch.stack(
            [
                tf(Image.open(work / "data" / "train" / "images" / e["image_file"]).convert("RGB"))
                for e in batch
            ]
        )
        ids = c.tokenizer(
            [e["caption"] for e in batch],
            max_length=c.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(entries, shuffle=True, collate_fn=collate, batch_size=args.batch)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10_000)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(c.unet, optimizer, loader, lr_scheduler)
    seconds, step_start = [], time.perf_counter()
    while len(seconds) < args.warmup + args.steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = c.vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * c.vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = c.text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.gather(loss.repeat(args.batch)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                now = time.perf_counter()
                seconds.append(now - step_start)
                step_start = now
                if len(seconds) >= args.warmup + args.steps:
                    break
    peak = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.device == "cpu"
        else torch.cuda.max_memory_allocated() / 2**20
    )
    return {
        "variant": "reference",
        "seconds": seconds[args.warmup :],
        "peak_memory_mb": peak,
        "device": str(accelerator.device),
        "trainable_params": sum(p.numel() for p in lora_layers),
    }


def child(args: argparse.Namespace) -> None:
    """One variant in this fresh process; prints a JSON line."""
    import torch

    from shoe_lora_pipeline.core.device import choose_device
    from shoe_lora_pipeline.core.models import load_base_model
    from shoe_lora_pipeline.core.training import train_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "reference":
        print("RESULT " + json.dumps(reference_child(args)), flush=True)
        return
    work = Path(args.work)
    cached = args.child in ("cached", "before")
    device_info = choose_device(args.device, args.mixed_precision)
    components = load_base_model("tiny-sd", cache_dir=work / "model", dtype=device_info.weight_dtype)
    cfg = make_cfg(args, work / f"run-{args.child}", cached)
    result = train_lora(
        cfg,
        components,
        device_info,
        train_dir=work / "data" / "train",
        latents_dir=work / "latents" if cached else None,
        output_dir=cfg.training.output_dir,
        dataset_fingerprint="benchmark",
        max_steps_this_run=args.warmup + args.steps,
    )
    measured = [r["seconds"] for r in result.losses[args.warmup :]]  # log_every_steps 1: each step's own time
    print(
        "RESULT "
        + json.dumps(
            {
                "variant": args.child,
                "seconds": measured,
                "peak_memory_mb": result.peak_memory_mb,
                "device": result.device,
                "trainable_params": result.trainable_params,
            }
        ),
        flush=True,
    )


def run_child(variant: str, args: argparse.Namespace, work: Path) -> dict:
    """One variant in a fresh process (its own peak memory); returns its RESULT line. The ``before``
    variant runs the cached path with the package of another checkout (``--before DIR``)."""
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work)]
    for flag in ("device", "mixed_precision", "resolution", "batch", "accum", "warmup", "steps", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if variant == "before":
        env["SHOE_LORA_TREE"] = str(args.before.resolve())
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    if device == "cuda" and torch.cuda.is_available():
        parts.insert(0, f"GPU {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from the timing")
    p.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="rounds of all variants; ratios are per round")
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a checkout of the code before a change: adds its cached step",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model-cache", type=Path, default=None, help="folder holding (or to build) tiny-sd")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from shoe_lora_pipeline.core.device import choose_device
    from shoe_lora_pipeline.core.latents import cache_latents
    from shoe_lora_pipeline.core.models import load_base_model, tiny_sd_path

    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        source = tiny_sd_path(args.model_cache).resolve()  # builds it once if the cache lacks it
        os.symlink(source, model_dir / source.name)
        make_dataset(work / "data", args.images, args.resolution)

        device_info = choose_device(args.device, args.mixed_precision)
        components = load_base_model("tiny-sd", cache_dir=model_dir)
        start = time.perf_counter()
        report = cache_latents(
            components,
            work / "data" / "train",
            work / "latents",
            args.resolution,
            batch_size=8,
            device=device_info.torch_device,
            dtype=device_info.weight_dtype,
        )
        cache_seconds = time.perf_counter() - start
        del components

        # Rounds of reference → cached → uncached: on a shared machine the load drifts, so each round's
        # ratio compares runs minutes apart, and the median over rounds is the number reported.
        runs: dict[str, list[dict]] = {"reference": [], "cached": [], "uncached": []}
        if args.before:
            runs["before"] = []  # cached latents, with the package of the --before checkout
        for _ in range(args.rounds):
            for variant in runs:
                runs[variant].append(run_child(variant, args, work))
        rows = {v: {**r[0], "seconds": [statistics.mean(x["seconds"]) for x in r]} for v, r in runs.items()}

    images_per_step = args.batch * args.accum
    mem_label = "peak GPU memory allocated (MB)" if args.device == "cuda" else "peak RSS (MB)"
    ratios = {
        v: [o / ref for o, ref in zip(r["seconds"], rows["reference"]["seconds"], strict=True)]
        for v, r in rows.items()
    }
    out = [
        f"Tiny SD-shaped model, {args.resolution} px, batch {args.batch} × accumulation {args.accum}, "
        f"LoRA r=8 ({rows['cached']['trainable_params']:,} trainable params), device {args.device}, "
        f"mixed precision {args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}; "
        f"{args.steps} measured optimizer steps after {args.warmup} warm-up steps, each variant in a fresh process, {args.rounds} rounds of all variants.",
        "",
        f"| variant | s / optimizer step: median (per round) | images / s | {mem_label} | step time vs reference: median (per round) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, row in rows.items():
        median = statistics.median(row["seconds"])
        per_round = ", ".join(f"{x:.3f}" for x in row["seconds"])
        ratio = statistics.median(ratios[variant])
        out.append(
            f"| {variant} | {median:.3f} ({per_round}) | {images_per_step / median:.2f} | "
            f"{row['peak_memory_mb']:.0f} | {ratio:.2f}× ({', '.join(f'{x:.2f}' for x in ratios[variant])}) |"
        )
    out += [
        "",
        f"One-off latent caching of {report.total} images: {cache_seconds:.2f} s "
        f"({report.bytes_on_disk / 1e6:.2f} MB on disk).",
        "",
        f"Machine: {machine_description(args.device)}. Run {datetime.date.today().isoformat()}.",
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
