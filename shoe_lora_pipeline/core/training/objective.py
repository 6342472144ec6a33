"""The training objective: the LoRA on the UNet, the denoising loss of a micro-batch and the held-out
validation loss.

* latents ``scaling_factor * (mean + std * eps)`` from the VAE's latent distribution (cached or encoded on
  the fly — both take ``eps`` from the sample's own generator, so they give the same numbers);
* noise ~ N(0, 1) and timesteps uniform in ``[0, num_train_timesteps)``, noised with the base model's
  DDPMScheduler; target = noise (``epsilon``) or velocity (``v_prediction``); MSE in fp32, averaged over
  the effective batch; optional min-SNR-γ weighting, noise offset, input perturbation, caption dropout;
* LoRA on the UNet's attention projections via peft; LoRA parameters in fp32 whenever the *effective*
  mixed precision is fp16/bf16 (frozen weights in the half dtype).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from shoe_lora_pipeline.core.latents import move_module
from shoe_lora_pipeline.core.models import lora_config
from shoe_lora_pipeline.core.train_data import MicroBatch, Source, SourceBatch, derived_seed

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from shoe_lora_pipeline.core.config import TrainingConfig


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# Validation loss: the mean denoising loss at these fractions of the noise schedule (4 spread timesteps).
VALIDATION_LOSS_FRACTIONS = (0.125, 0.375, 0.625, 0.875)


def setup_lora_unet(
    unet: torch.nn.Module, tcfg: TrainingConfig, device: torch.device, mixed_precision: str
) -> list[torch.nn.Parameter]:
    """Frozen UNet in the weight dtype on ``device`` + a fresh LoRA adapter; returns the LoRA params (a list).

    ``mixed_precision`` must be the accelerator's *effective* setting: with fp16/bf16 the frozen weights
    are half precision and the LoRA parameters are upcast to fp32 (peft creates them in the base layer's
    dtype; AdamW on fp16 parameters cannot unscale and bf16 updates lose the small LoRA steps).
    """
    from diffusers.training_utils import cast_training_params

    if getattr(unet, "peft_config", None):
        raise ValueError("the UNet already carries a LoRA adapter; pass freshly loaded base model components")
    unet.requires_grad_(False)
    move_module(unet, device, WEIGHT_DTYPES[mixed_precision])
    unet.add_adapter(lora_config(**lora_settings(tcfg)))
    if mixed_precision in ("fp16", "bf16"):
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"no LoRA parameters: lora_target_modules {tcfg.lora_target_modules} match no UNet layer"
        )
    return params


def lora_settings(tcfg: TrainingConfig) -> dict[str, Any]:
    return {
        "rank": tcfg.lora_rank,
        "alpha": tcfg.lora_alpha,
        "dropout": tcfg.lora_dropout,
        "target_modules": list(tcfg.lora_target_modules),
    }


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample: min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def denoising_mse(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy_input_noise: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    weight_dtype: torch.dtype,
    channels_last: bool = False,
    added_conditions: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction against the target (noise or velocity), in fp32.
    ``added_conditions``: SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``); None for SD1.5."""
    noisy = noise_scheduler.add_noise(latents, noisy_input_noise, timesteps).to(weight_dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # "v_prediction" (checked before training starts)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    extra = {}
    if added_conditions is not None:
        extra["added_cond_kwargs"] = {k: v.to(weight_dtype) for k, v in added_conditions.items()}
    pred = unet(noisy, timesteps, encoder_hidden_states=text.to(weight_dtype), return_dict=False, **extra)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    batch: MicroBatch,
    source: Source,
    empty_text: torch.Tensor,
    scaling_factor: float,
    weight_dtype: torch.dtype,
    snr_gamma: float | None = None,
    channels_last: bool = False,
    empty_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample losses of one micro-batch of the denoising objective (weighted by min-SNR-γ when set).

    A caption-dropout sample trains with the empty caption's embedding: for SDXL both encoders' hidden
    states (``empty_text``) and the pooled one (``empty_pooled``); its size conditioning stays."""
    got = source.get(batch.items)
    drop = batch.drop_caption
    text = torch.where(drop[:, None, None], empty_text.to(got.text.dtype), got.text)
    latents = scaling_factor * (got.mean + got.std * batch.eps)
    losses = denoising_mse(
        unet,
        noise_scheduler,
        latents,
        batch.noise,
        batch.noisy_input_noise,
        batch.timesteps,
        text,
        weight_dtype,
        channels_last,
        added_conditions(got, drop, empty_pooled),
    )
    if snr_gamma is not None:
        losses = losses * min_snr_weights(noise_scheduler, batch.timesteps, snr_gamma)
    return losses


def added_conditions(
    got: SourceBatch, drop: torch.Tensor | None = None, empty_pooled: torch.Tensor | None = None
) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` of a batch (pooled embedding, dropped where ``drop``; time_ids); None for
    a family without added conditions."""
    if got.pooled is None or got.time_ids is None:
        return None
    pooled = got.pooled
    if drop is not None:
        if empty_pooled is None:
            raise ValueError("an SDXL batch needs the empty caption's pooled embedding for caption dropout")
        pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype).reshape(1, -1), pooled)
    return {"text_embeds": pooled, "time_ids": got.time_ids}


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    source: Source,
    scaling_factor: float,
    weight_dtype: torch.dtype,
    seed: int,
    batch_size: int,
) -> dict[str, float]:
    """Mean denoising MSE of the held-out split at fixed timesteps with noise from fixed generators:
    deterministic for given weights and independent of the training RNG. Returns ``val_loss`` and one
    ``t<timestep>`` entry per timestep."""
    total_steps = int(noise_scheduler.config.num_train_timesteps)
    timesteps = [int(f * total_steps) for f in VALIDATION_LOSS_FRACTIONS]
    device = source.device
    sums = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, len(source), batch_size):
            items = list(range(start, min(len(source), start + batch_size)))
            got = source.get(items)
            mean, std, text, conditions = got.mean, got.std, got.text, added_conditions(got)
            for k, t in enumerate(timesteps):
                gens = [torch.Generator().manual_seed(derived_seed(seed, "val-loss", i, k)) for i in items]
                eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
                noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
                latents = scaling_factor * (mean + std * eps)
                t_batch = torch.full((len(items),), t, dtype=torch.long, device=device)
                mse = denoising_mse(
                    unet, noise_scheduler, latents, noise, noise, t_batch, text, weight_dtype,
                    added_conditions=conditions,
                )  # fmt: skip
                sums[k] += mse.double().sum()
    finally:
        unet.train(was_training)
    per_t = (sums / len(source)).tolist()
    return {
        "val_loss": sum(per_t) / len(per_t),
        **{f"t{t}": v for t, v in zip(timesteps, per_t, strict=True)},
    }
