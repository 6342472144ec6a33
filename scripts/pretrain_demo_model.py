#!/usr/bin/env python
"""Pretrain ``tiny-shoes``: the demo base model, trained from scratch on drawn shoes.

Usage (the committed model; see data/models/tiny-shoes/README.md for the exact run)::

    python scripts/pretrain_demo_model.py --out data/models/tiny-shoes [--force]
    python scripts/pretrain_demo_model.py --smoke --out /tmp/tiny-shoes-smoke   # the machinery, seconds
    # continue a model's UNet (its VAE and text encoder kept) with zero-terminal-SNR betas and v-prediction
    python scripts/pretrain_demo_model.py --from data/models/tiny-shoes --out data/models/tiny-shoes --force \
        --zero-terminal-snr --prediction-type v_prediction --unet-steps 5000

The classes are Stable Diffusion 1.5's at the widths of ``tiny-sd`` (core/models.py): AutoencoderKL with
four levels (latents 1/8 of the side), CLIPTextModel with the real CLIP BPE vocabulary, UNet2DConditionModel
with cross-attention. Training data comes from ``shoe_drawing.pretraining_shot`` (many colours, types,
views, backdrops; captions in the recipe's template). Stages, all from one ``--seed``:

1. draw the images (and a held-out validation set);
2. train the VAE alone (L1 + 10 x squared error + 10 x squared error of 4x4-pooled colours + a small KL
   term, random crops: it is fully convolutional);
   the latent scaling factor is then measured (1 / std of the latents), as SD's 0.18215 was;
3. cache latents and text embeddings, and train the UNet with the DDPM epsilon objective, 10 % empty
   captions (so classifier-free guidance works) and an EMA of the weights. The text encoder stays as
   initialised: its token embeddings already differ per colour word, and the UNet learns to read them
   through cross-attention (the model card reports how often the colour is respected).

``--from FOLDER`` continues from a model folder instead of starting from scratch: its tokenizer, text encoder
and VAE are kept (no VAE stage) and its UNet's weights are trained further. ``--zero-terminal-snr`` and
``--prediction-type v_prediction`` change the noise schedule the UNet is trained for (Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed"): with SD1.5's scaled_linear betas the last timestep
keeps some signal (alpha_bar_T = 0.0047), so the initial noise's mean brightness fixes the backdrop's and the
model cannot move it -- the base model drew grey-ish backdrops whatever the prompt said. The rescaled betas
(diffusers' ``rescale_zero_terminal_snr``, alpha_bar_T then set to 2**-24 as diffusers' samplers do so that
every sampler stays finite) are written to the scheduler config as ``trained_betas``, with
``prediction_type`` and ``timestep_spacing: trailing`` (sampling starts at the last timestep, the pure-noise
one), so every scheduler built from the folder -- training's DDPM, PNDM, DPM++, Euler, DDIM -- uses them.

The folder is written (atomically replaced) at every checkpoint, so a run stopped early still leaves a
loadable model; ``--unet-minutes`` caps the UNet stage's wall time. An existing model folder is never
overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from shoe_drawing import pretraining_shot
except ModuleNotFoundError:  # imported as scripts.pretrain_demo_model from the repo root (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shoe_drawing import pretraining_shot

from shoe_lora_pipeline.core import models

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "models" / models.TINY_SHOES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing model folder at --out")
    p.add_argument("--seed", type=int, default=20261203)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=20000)
    p.add_argument("--unet-minutes", type=float, default=None, help="stop the UNet stage after this long")
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny scale: a few images and steps (tests)")
    p.add_argument(
        "--from",
        dest="from_model",
        type=Path,
        default=None,
        help="continue from this model folder: keep its tokenizer, text encoder and VAE, train its UNet further",
    )
    p.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="rescale the betas to zero terminal SNR (trained_betas)",
    )
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def draw_set(seed: int, n: int, side: int) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """n drawn shots as a uint8 tensor (n, 3, side, side), their captions and the backdrop counts."""
    rng = random.Random(seed)
    images = torch.empty((n, 3, side, side), dtype=torch.uint8)
    captions: list[str] = []
    kinds: dict[str, int] = {}
    for i in range(n):
        shot = pretraining_shot(rng, side)
        images[i] = torch.from_numpy(np.array(shot.image)).permute(2, 0, 1)
        captions.append(shot.caption)
        kinds[shot.background] = kinds.get(shot.background, 0) + 1
    return images, captions, kinds


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def build_components(seed: int, tmp: Path) -> dict[str, object]:
    """Freshly initialised tiny-sd-shaped components (same configs and component seeds as tiny-sd)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = models.clip_tokenizer(*models.clip_tokenizer_files(tmp))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**models.TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**models.TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**models.TINY_TEXT_ENCODER_CONFIG))
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "unet": unet,
        "scheduler": PNDMScheduler.from_config(models.SD15_SCHEDULER_CONFIG),
    }


def scheduler_config(zero_terminal_snr: bool, prediction_type: str) -> dict[str, object]:
    """SD1.5's scheduler config, with the prediction type and, if asked, zero-terminal-SNR betas."""
    config: dict[str, object] = {**models.SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    if zero_terminal_snr:
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        n = int(config["num_train_timesteps"])
        start, end = float(config["beta_start"]), float(config["beta_end"])
        betas = rescale_zero_terminal_snr(torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2)
        # alpha_bar_T = 0 exactly makes Euler's sigma_max and PNDM's step ratio infinite; diffusers' own
        # rescale_betas_zero_snr samplers use 2**-24 instead (SNR 6e-8: still no signal left).
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        betas[-1] = 1.0 - 2.0**-24 / alphas_cumprod[-2]
        config.update(trained_betas=[float(b) for b in betas], timestep_spacing="trailing")
    return config


def save_model(parts: dict[str, object], out: Path, card: dict[str, object]) -> None:
    """Write the diffusers folder next to ``out`` and swap it in (never half a model at ``out``)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary shared folder
        pipe.save_pretrained(tmp, safe_serialization=True)
        drop_loaded_from(tmp)
        (tmp / "training.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card_markdown(card))
        old = out.with_name(f".{out.name}-old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_loaded_from(folder: Path) -> None:
    """Remove ``_name_or_path`` (where a --from component was loaded from) from the component configs."""
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card_markdown(card: dict[str, object]) -> str:
    how = "trained from scratch on this machine"
    if "continued from" in card:
        how = "trained on this machine (from scratch, then its UNet continued: see the table)"
    lines = [
        "# tiny-shoes: the offline demo base model",
        "",
        "Stable Diffusion 1.5's classes (AutoencoderKL, CLIPTextModel with the real CLIP BPE vocabulary,",
        f"UNet2DConditionModel) at the widths of `tiny-sd`, {how} on shoes drawn",
        "by `scripts/shoe_drawing.py` (`pretraining_shot`): 14 colours, 3 types, side views facing left/right,",
        "tilted and pairs, on white, grey, beige, dark and gradient backdrops with and without a contact",
        'shadow. Captions use the recipe\'s template and always say "on white background", whatever the',
        "backdrop, so this base model's white background is unreliable: the demo LoRA (trained on the",
        "white-background demo photos) is what makes it white. It draws only blurry, small-resolution shoes.",
        "Captions also name the characteristics the specs sheets use (lace-up for the laced shoes, slip-on",
        "for the loafers), as the render prompts do.",
        "",
        "| | |",
        "|---|---|",
    ]
    for key, value in card.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def train_vae(vae: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace) -> float:
    """Train the VAE on random crops; returns the mean L1 of the last 50 steps."""
    gen = torch.Generator().manual_seed(args.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    warmup = max(1, args.vae_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.vae_steps)))))
        ),
    )
    crop = min(args.vae_crop, images.shape[-1])
    recent: list[float] = []
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, images.shape[0], (args.vae_batch,), generator=gen)
        x0, y0 = (torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen) // 8 * 8).tolist()
        x = to_unit(images[idx, :, y0 : y0 + crop, x0 : x0 + crop])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        # L1 alone settles on the median (a grey, colourless shoe: most pixels are backdrop); the squared
        # error weighs the few strongly coloured pixels enough to learn the colours in a short run.
        # The 4x4-pooled term weighs region colours (a shoe's upper, the backdrop) once more.
        mse = torch.nn.functional.mse_loss(rec, x)
        pooled = torch.nn.functional.mse_loss(
            torch.nn.functional.avg_pool2d(rec, 4), torch.nn.functional.avg_pool2d(x, 4)
        )
        loss = l1 + 10 * mse + 10 * pooled + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [l1.item()])[-50:]
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} l1 {np.mean(recent):.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return float(np.mean(recent)) if recent else float("nan")


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, images.shape[0], 32):
        d = vae.encode(to_unit(images[i : i + 32])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(tokenizer: object, text_encoder: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    unique = sorted(set(captions))
    ids = tokenizer(
        unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    emb = torch.cat([text_encoder(ids[i : i + 64])[0] for i in range(0, len(unique), 64)])
    index = {c: i for i, c in enumerate(unique)}
    return emb[torch.tensor([index[c] for c in captions])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.resolution, args.n_images, args.n_val = 64, 8, 4
        args.vae_steps, args.unet_steps, args.vae_batch, args.unet_batch = 2, 3, 2, 4
        args.checkpoint_every = 2
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        print(
            f"error: {out} already holds a model; pass --force to replace it (it is committed: "
            "a new one must be retrained and re-measured)",
            file=sys.stderr,
        )
        return 2
    if args.resolution % 8:
        print(f"error: --resolution must be a multiple of 8, got {args.resolution}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    command = "python scripts/pretrain_demo_model.py " + " ".join(argv if argv is not None else sys.argv[1:])

    log(f"drawing {args.n_images} + {args.n_val} shots at {args.resolution}px")
    images, captions, kinds = draw_set(args.seed, args.n_images, args.resolution)
    val_images, val_captions, _ = draw_set(args.seed + 1, args.n_val, args.resolution)
    log(f"drawn in {time.time() - started:.0f}s; backdrops {kinds}")

    from diffusers import DDPMScheduler, PNDMScheduler

    sched_config = scheduler_config(args.zero_terminal_snr, args.prediction_type)
    base_card: dict[str, object] = {}
    if args.from_model is not None:
        loaded = models.load_base_model(str(args.from_model))
        with tempfile.TemporaryDirectory() as tmp:  # the same tokenizer files as a fresh model's
            tokenizer = models.clip_tokenizer(*models.clip_tokenizer_files(Path(tmp)))
        parts = {
            "tokenizer": tokenizer,
            "text_encoder": loaded.text_encoder,
            "vae": loaded.vae,
            "unet": loaded.unet,
        }
        parts["unet"].requires_grad_(True)
        card_file = args.from_model / "training.json"
        base_card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        log(f"continuing from {args.from_model} (VAE and text encoder kept, UNet trained further)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            parts = build_components(args.seed, Path(tmp))
    parts["scheduler"] = PNDMScheduler.from_config(sched_config)
    vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
    text_encoder.requires_grad_(False).eval()

    t_vae = time.time()
    if args.from_model is None:
        vae_l1 = train_vae(vae, images, args)
    vae_minutes = (time.time() - t_vae) / 60
    vae.requires_grad_(False).eval()
    mean, std = encode_latents(vae, images)
    if args.from_model is None:
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=round(scaling, 5))
    else:
        scaling = float(vae.config.scaling_factor)
    val_mean, _ = encode_latents(vae, val_images)
    with torch.no_grad():
        val_rec = vae.decode(val_mean).sample
    vae_val_l1 = float((val_rec - to_unit(val_images)).abs().mean())
    if args.from_model is not None:
        vae_l1 = float("nan")
    log(f"vae: train l1 {vae_l1:.4f}, val l1 {vae_val_l1:.4f}, scaling_factor {scaling:.4f}")

    emb = encode_captions(parts["tokenizer"], text_encoder, captions)
    val_emb = encode_captions(parts["tokenizer"], text_encoder, val_captions)
    empty = encode_captions(parts["tokenizer"], text_encoder, [""])
    from diffusers.training_utils import EMAModel

    noise_scheduler = DDPMScheduler.from_config(sched_config)

    def target(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if args.prediction_type == "v_prediction":
            return noise_scheduler.get_velocity(latents, noise, t)
        return noise

    gen = torch.Generator().manual_seed(args.seed + 20)
    # Fixed noise and timesteps for the validation loss, so its curve is comparable across steps.
    val_gen = torch.Generator().manual_seed(args.seed + 30)
    val_latents = val_mean * scaling
    val_noise = torch.randn(val_latents.shape, generator=val_gen)
    val_t = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (len(val_latents),), generator=val_gen
    )
    val_target = target(val_latents, val_noise, val_t)

    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    warmup = max(1, min(200, args.unet_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=2 / 3)

    def val_loss(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            noisy = noise_scheduler.add_noise(val_latents, val_noise, val_t)
            losses = [
                torch.nn.functional.mse_loss(
                    model(noisy[i : i + 32], val_t[i : i + 32], val_emb[i : i + 32]).sample,
                    val_target[i : i + 32],
                ).item()
                * len(noisy[i : i + 32])
                for i in range(0, len(noisy), 32)
            ]
        model.train()
        return sum(losses) / len(noisy)

    def checkpoint(step: int, train_loss: float, final: bool) -> dict[str, object]:
        ema_unet = type(unet).from_config(unet.config)
        ema.copy_to(ema_unet.parameters())
        v = val_loss(ema_unet)
        objective = "v-prediction" if args.prediction_type == "v_prediction" else "epsilon"
        schedule = (
            "zero-terminal-SNR rescaled betas" if args.zero_terminal_snr else "SD1.5 scaled_linear betas"
        )
        card: dict[str, object] = {"command": command}
        if args.from_model is not None:
            card["continued from"] = (
                f"{args.from_model} (its VAE and text encoder kept, its UNet trained further); its run: "
                f"{base_card.get('command', '?')}, unet steps {base_card.get('unet steps', '?')}, "
                f"wall time {base_card.get('wall time', '?')}"
            )
        card.update(
            {
                "seed": args.seed,
                "resolution": args.resolution,
                "training images": f"{args.n_images} drawn (+{args.n_val} held out); backdrops {kinds}",
                "vae steps": (
                    base_card.get("vae steps", "?")
                    if args.from_model is not None
                    else f"{args.vae_steps} (batch {args.vae_batch}, {args.vae_crop}px crops, lr {args.vae_lr})"
                ),
                "vae final loss": (
                    f"{base_card.get('vae final loss', '?')}; held-out L1 on this run's set {vae_val_l1:.4f}"
                    if args.from_model is not None
                    else f"train L1 {vae_l1:.4f}, held-out L1 {vae_val_l1:.4f} (images in [-1, 1])"
                ),
                "vae scaling_factor": round(scaling, 5),
                "noise schedule": f"{schedule}, {objective} objective, timestep_spacing "
                f"{sched_config.get('timestep_spacing', 'leading')}",
                "unet steps": f"{step} (batch {args.unet_batch}, lr {args.unet_lr}, EMA 0.999)",
                "unet final loss": f"train MSE {train_loss:.4f} (last 100 steps), held-out MSE {v:.4f} "
                f"(EMA weights; {objective} target)",
                "text encoder": "as initialised (seed + 2), not trained",
                "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} torch thread(s)",
                "wall time": f"{(time.time() - started) / 60:.1f} min (VAE {vae_minutes:.1f} min)",
                "status": "final" if final else "checkpoint (training still running or stopped early)",
                "torch": torch.__version__,
            }
        )
        save_model({**parts, "unet": ema_unet}, out, card)
        log(f"checkpoint at unet step {step}: held-out MSE {v:.4f} -> {out}")
        return card

    t_unet = time.time()
    recent: list[float] = []
    unet.train()
    step = 0
    for step in range(1, args.unet_steps + 1):
        idx = torch.randint(0, len(mean), (args.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        cond = emb[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < 0.1
        cond[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, target(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        recent = (recent + [loss.item()])[-100:]
        if step % 50 == 0:
            log(f"unet step {step} loss {np.mean(recent):.4f} ({(time.time() - t_unet) / step:.2f}s/step)")
        out_of_time = args.unet_minutes is not None and time.time() - t_unet > args.unet_minutes * 60
        if out_of_time:
            log(f"--unet-minutes {args.unet_minutes} reached at step {step}")
            break
        if step % args.checkpoint_every == 0 and step < args.unet_steps:
            checkpoint(step, float(np.mean(recent)), final=False)
    card = checkpoint(step, float(np.mean(recent)) if recent else float("nan"), final=True)
    log(f"done: {card['wall time']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
