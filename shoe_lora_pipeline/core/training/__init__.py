"""LoRA training, one responsibility per module (read ``loop.py`` first):

* ``objective.py`` — the LoRA on the UNet, the denoising loss, min-SNR-γ, the validation loss;
* ``start.py`` — resume / skip / fresh, the recorded settings, the accelerator, the prepared run, restore;
* ``history.py`` — settling the steps' losses, losses.csv and progress, the loss EMA, checkpoint saving;
* ``loop.py`` — :func:`train_lora`: the loop and its logging / validation / checkpoint points;
* ``result.py`` — :class:`TrainingResult` after the loop or from disk, and :class:`TrainingError`.

The names callers use are importable from ``shoe_lora_pipeline.core.training`` as before.
"""

from shoe_lora_pipeline.core.training.history import History, PendingStep, save_and_rotate, settle
from shoe_lora_pipeline.core.training.loop import train_lora, validate
from shoe_lora_pipeline.core.training.objective import (
    VALIDATION_LOSS_FRACTIONS,
    WEIGHT_DTYPES,
    denoising_mse,
    diffusion_loss,
    lora_settings,
    min_snr_weights,
    setup_lora_unet,
    validation_loss,
)
from shoe_lora_pipeline.core.training.result import TrainingError, TrainingResult, peak_memory_mb
from shoe_lora_pipeline.core.training.start import (
    Run,
    decide_start,
    hash_relevant_differences,
    make_accelerator,
    prepare_run,
    recorded_training_config,
)

__all__ = [
    "VALIDATION_LOSS_FRACTIONS",
    "WEIGHT_DTYPES",
    "History",
    "PendingStep",
    "Run",
    "TrainingError",
    "TrainingResult",
    "decide_start",
    "denoising_mse",
    "diffusion_loss",
    "hash_relevant_differences",
    "lora_settings",
    "make_accelerator",
    "min_snr_weights",
    "peak_memory_mb",
    "prepare_run",
    "recorded_training_config",
    "save_and_rotate",
    "settle",
    "setup_lora_unet",
    "train_lora",
    "validate",
    "validation_loss",
]
