"""Export a trained LoRA checkpoint to the PEFT, diffusers and kohya/A1111 formats, fuse it, read it back.

Conversions go through diffusers / peft themselves (``lora_state_dict``, ``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_diffusers``, ``convert_state_dict_to_kohya``, ``save_lora_weights``,
``PeftModel.save_pretrained``). What they get wrong for us is fixed here and nowhere else:

* ``convert_state_dict_to_kohya`` writes ``.alpha = rank`` (an int64 tensor). We trained with alpha != rank
  (8/16 in the recipe): every client would apply half the trained strength. We write the real alpha, as a
  scalar in the weights' dtype, as kohya-ss does.
* ``save_lora_weights`` controls the safetensors header; our provenance is added afterwards by re-writing
  the header (the tensor bytes are unchanged).
* safetensors writes its header metadata from an unordered map, so saving the same tensors and metadata
  twice gives different bytes. Every exported ``.safetensors`` header is re-written with sorted keys.

Reproducible exports: exporting the same checkpoint with the same config writes byte-identical weights
files, ``adapter_config.json`` and model card. What belongs to one export run (:data:`RUN_FACTS`: its
Dagster run id and time) is kept out of them and recorded only in ``provenance.json`` beside them;
:func:`read_provenance` adds it back for a file whose sha256 that ``provenance.json`` lists. The time the
weights came into being is the checkpoint's ``saved_at`` (``checkpoint_saved_at``).
* ``PeftModel.from_pretrained(unet, dir)`` expects keys as a ``PeftModel`` wrapping the UNet saves them
  (``base_model.model.…``), not the bare ``get_peft_model_state_dict(unet)`` keys of the trainer (with
  those peft only warns "missing adapter keys" and the adapter stays at its zero init: no effect at all). We wrap a meta-device UNet (architecture only) with
  ``get_peft_model``, check every key and shape against it, and let its ``save_pretrained`` write the files.
  ``save_embedding_layers=False`` stops peft from probing the Hub for the base model's config during export.

Exports are written to a temporary sibling folder and swapped in, so a reader never sees half an export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.fsutil import atomic_directory
from shoe_lora_pipeline.core.model_card import (
    FRONT_MATTER_KEY,
    ModelCardError,
    ModelCardInfo,
    read_front_matter,
    write_model_card,
)
from shoe_lora_pipeline.core.provenance import (
    OBJECTIVE_KEYS,
    PROVENANCE_SCHEMA,
    collect_provenance,
    file_sha256,
    utc_now_iso,
)
from shoe_lora_pipeline.core.run_artifacts import (
    VALIDATION_LOSS_NAME,
    best_validation_step,
    latest_grid,
    loss_at_step,
    read_validation_losses,
)

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from shoe_lora_pipeline.core.checkpoints import CheckpointInfo
    from shoe_lora_pipeline.core.config import PipelineConfig
    from shoe_lora_pipeline.core.families import ModelFamily
    from shoe_lora_pipeline.core.kohya_keys import KohyaUnetNames

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_STATE_NAME = "training_state.json"
PROVENANCE_NAME = "provenance.json"
MODEL_CARD_NAME = "README.md"
VALIDATION_GRID_NAME = "validation_grid.png"
META_PREFIX = "shoe_lora_"
# The whole provenance record as JSON (exact types); the flat shoe_lora_* keys are for metadata viewers.
META_PROVENANCE_KEY = META_PREFIX + "provenance"
# Facts of one export run, not of the LoRA: only in provenance.json, never in the files that identify it.
RUN_FACTS = ("dagster_run_id", "created_at")


class LoraExportError(RuntimeError):
    """A checkpoint cannot be exported; the message names the file and what is wrong."""


class ProvenanceError(ValueError):
    """A path holds no readable provenance; the message names the path."""


def kohya_weights_name(dataset_name: str) -> str:
    return f"{dataset_name}_lora.safetensors"


# --------------------------------------------------------------------------------------------------
# Training facts (for kohya ss_* metadata and the model card)
# --------------------------------------------------------------------------------------------------


# TrainingFacts fields that the trainer records in training_state.json's "training_config".
_RECORDED_FACTS = (
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "resolution",
    "seed",
    "mixed_precision",
    "validation_prompts",
    "snr_gamma",
    "noise_offset",
    "input_perturbation",
    "caption_dropout",
)


# TrainingFacts that the model card states under the same names.
_CARD_FACTS = (
    "learning_rate",
    "lr_scheduler",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "final_loss",
    "val_loss",
    "num_train_images",
)


@dataclass
class TrainingFacts:
    """Training settings that the weights files do not carry themselves. All optional."""

    learning_rate: float | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_train_steps: int | None = None
    resolution: int | None = None
    seed: int | None = None
    mixed_precision: str | None = None
    num_train_images: int | None = None
    captions: list[str] = field(default_factory=list)
    caption_template: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    final_loss: float | None = None  # None: the checkpoint's recorded loss, else losses.csv at its step
    snr_gamma: float | None = None
    noise_offset: float | None = None
    input_perturbation: float | None = None
    caption_dropout: float | None = None
    val_loss: float | None = None  # the held-out validation loss at the exported step, when measured

    def __post_init__(self) -> None:
        if self.num_train_images is None and self.captions:
            self.num_train_images = len(self.captions)  # one caption per training image

    @classmethod
    def from_config(
        cls, cfg: PipelineConfig, *, captions: Iterable[str] = (), num_train_images: int | None = None
    ) -> TrainingFacts:
        # The recorded facts carry the training config's own names (resolution is the dataset's).
        settings = {**cfg.training.model_dump(), "resolution": cfg.dataset.resolution}
        return cls(
            **{name: settings[name] for name in _RECORDED_FACTS},
            num_train_images=num_train_images,
            captions=list(captions),
            caption_template=cfg.dataset.caption_template,
        )


@dataclass
class ExportResult:
    out_dir: Path
    kohya_weights: Path
    validation_grid: Path | None
    rank: int
    alpha: float
    step: int | None
    file_sha256: dict[str, str]
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    # The other files have fixed names in the export folder.
    @property
    def peft_config(self) -> Path:
        return self.out_dir / PEFT_CONFIG_NAME

    @property
    def peft_weights(self) -> Path:
        return self.out_dir / PEFT_WEIGHTS_NAME

    @property
    def diffusers_weights(self) -> Path:
        return self.out_dir / DIFFUSERS_WEIGHTS_NAME

    @property
    def model_card(self) -> Path:
        return self.out_dir / MODEL_CARD_NAME

    @property
    def provenance_json(self) -> Path:
        return self.out_dir / PROVENANCE_NAME


# --------------------------------------------------------------------------------------------------
# Reading a training checkpoint
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraExportError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LoraExportError(f"{path}: expected a JSON object")
    return data


def load_checkpoint_lora(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a training checkpoint's LoRA as a PEFT state dict (``<module>.lora_A.weight`` keys).

    Returns ``(state_dict, meta)``; ``meta`` has ``rank``, ``alpha``, ``dropout``, ``target_modules``,
    ``global_step``, ``base_model`` (identity dict or None), ``training_hash``, ``dataset_fingerprint``,
    ``training_config`` (the trainer's recorded settings, may be empty), ``loss`` and ``weights_sha256``. Alpha must be declared (``training_state.json`` or the file's
    ``lora_adapter_metadata``): we refuse to guess ``alpha = rank``.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        raise LoraExportError(f"{weights}: LoRA weights file not found")
    # diffusers' own reader: the same code path a user's load_lora_weights takes.
    state_dict, network_alphas, file_meta = StableDiffusionPipeline.lora_state_dict(
        str(checkpoint_dir), weight_name=DIFFUSERS_WEIGHTS_NAME, return_lora_metadata=True
    )
    if network_alphas:
        raise LoraExportError(f"{weights}: is a kohya-format file, expected the trainer's diffusers format")
    foreign = sorted(k for k in state_dict if not k.startswith("unet."))
    if foreign:
        raise LoraExportError(f"{weights}: only UNet LoRAs are supported, found e.g. {foreign[0]!r}")
    peft_sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    bad = [k for k in peft_sd if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise LoraExportError(f"{weights}: unexpected LoRA key {bad[0]!r} (bias / DoRA are not supported)")

    file_cfg = {k.removeprefix("unet."): v for k, v in (file_meta or {}).items() if k.startswith("unet.")}
    state_path = checkpoint_dir / TRAINING_STATE_NAME
    state = _read_json(state_path) if state_path.is_file() else {}
    lora = dict(state.get("lora") or {})

    ranks = {int(v.shape[0]) for k, v in peft_sd.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise LoraExportError(f"{weights}: LoRA layers have different ranks {sorted(ranks)}")
    tensor_rank = ranks.pop()
    if file_cfg.get("use_rslora") or file_cfg.get("use_dora"):
        raise LoraExportError(f"{weights}: rsLoRA / DoRA adapters cannot be expressed in the kohya format")
    if file_cfg.get("rank_pattern") or file_cfg.get("alpha_pattern"):
        raise LoraExportError(f"{weights}: per-module rank/alpha patterns are not supported")

    def pick(state_key: str, file_key: str) -> Any:
        a, b = lora.get(state_key), file_cfg.get(file_key)
        if a is not None and b is not None and a != b and not _same_targets(a, b):
            raise LoraExportError(
                f"{checkpoint_dir}: {TRAINING_STATE_NAME} says lora.{state_key} = {a!r} but "
                f"{DIFFUSERS_WEIGHTS_NAME} metadata says {file_key} = {b!r}"
            )
        return a if a is not None else b

    rank, alpha = pick("rank", "r"), pick("alpha", "lora_alpha")
    if alpha is None:
        raise LoraExportError(
            f"{checkpoint_dir}: LoRA alpha is not recorded (neither {TRAINING_STATE_NAME} 'lora.alpha' nor "
            f"the 'lora_adapter_metadata' of {DIFFUSERS_WEIGHTS_NAME}); refusing to assume alpha = rank"
        )
    if rank is not None and int(rank) != tensor_rank:
        raise LoraExportError(
            f"{checkpoint_dir}: declared rank {rank} but the tensors have rank {tensor_rank}"
        )
    targets = pick("target_modules", "target_modules")
    if targets is None:
        # Module leaf names actually adapted, e.g. "to_q" or "to_out.0".
        targets = sorted({_target_of(k) for k in peft_sd})
    meta = {
        "rank": tensor_rank,
        "alpha": float(alpha),
        "dropout": float(pick("dropout", "lora_dropout") or 0.0),
        "target_modules": sorted(targets),
        "global_step": state.get("global_step"),
        "base_model": state.get("base_model"),
        "training_hash": state.get("training_hash"),
        "dataset_fingerprint": state.get("dataset_fingerprint"),
        "training_config": state.get("training_config") or {},  # the trainer's recorded settings
        "loss": state.get("loss"),
        "saved_at": state.get("saved_at"),  # when the trainer wrote the checkpoint (epoch seconds)
        "weights_sha256": file_sha256(weights),
    }
    return peft_sd, meta


def _same_targets(a: Any, b: Any) -> bool:
    return isinstance(a, list | tuple | set) and isinstance(b, list | tuple | set) and set(a) == set(b)


def _target_of(peft_key: str) -> str:
    module = peft_key.rsplit(".lora_", 1)[0]
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


# --------------------------------------------------------------------------------------------------
# Format conversions
# --------------------------------------------------------------------------------------------------


def peft_to_kohya(
    peft_state_dict: Mapping[str, torch.Tensor], alpha: float, names: KohyaUnetNames | None = None
) -> dict[str, torch.Tensor]:
    """kohya/A1111 UNet keys (``lora_unet_….lora_down.weight`` [r, in], ``lora_up`` [out, r], ``.alpha``).

    ``names`` is the family's kohya naming (:func:`kohya_keys.kohya_unet_names`: SDXL files name the LDM
    blocks); None keeps diffusers' module names, as SD1.5 files do. diffusers' converter needs the
    ``unet.`` prefix to emit ``lora_unet_`` and sets ``.alpha`` to the rank; we overwrite it with the
    trained alpha, a 0-d tensor in the weights' dtype like kohya-ss writes.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    renamed = names.rename(peft_state_dict) if names is not None else peft_state_dict
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in renamed.items()})
    out: dict[str, torch.Tensor] = {}
    for key, tensor in kohya.items():
        if key.endswith(".alpha"):
            down = kohya[key.removesuffix(".alpha") + ".lora_down.weight"]
            out[key] = torch.tensor(float(alpha), dtype=down.dtype)
        else:
            out[key] = tensor.detach().to("cpu").contiguous()
    return out


def kohya_model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as kohya-ss ``precalculate_safetensors_hashes``.

    Serialise with only the ``ss_*`` metadata; the model hash is sha256 of everything after the header
    (i.e. the tensor bytes, independent of metadata), the legacy hash is sha256 of the 64 KiB at offset
    1 MiB, first 8 hex digits (sd-webui-additional-networks).
    """
    from safetensors.torch import save

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Caption tag counts as kohya-ss counts them: comma-separated, stripped, lower-cased."""
    freq: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def _meta_str(value: Any) -> str:
    """Safetensors metadata values must be strings: keep strings, JSON-encode everything else."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def provenance_metadata(provenance: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, str]:
    """Our safetensors header entries: flat ``shoe_lora_<key>`` strings plus the exact JSON record."""
    meta = {f"{META_PREFIX}{k}": _meta_str(v) for k, v in provenance.items()}
    for k in ("rank", "alpha", "dropout", "target_modules"):
        meta[f"{META_PREFIX}lora_{k}"] = _meta_str(lora[k])
    meta[META_PROVENANCE_KEY] = json.dumps(dict(provenance), sort_keys=True)
    return meta


def build_kohya_metadata(
    lora: Mapping[str, Any],
    facts: TrainingFacts,
    *,
    dataset_name: str,
    base_model: str | None,
    step: int | None,
    training_comment: str | None = None,
    family: ModelFamily | None = None,
    objective: BaseObjective | None = None,
) -> dict[str, str]:
    """kohya-ss style ``ss_*`` training metadata (all values strings, as A1111's metadata viewer expects).

    ``family`` (default SD1.5) gives ``ss_base_model_version`` (``sd_v1`` / ``sdxl_base_v1-0``, the value
    A1111 and civitai read the base model from) and the resolution when ``facts`` has none. ``objective``
    (the base model's scheduler, :func:`base_objective`): a v-prediction base adds kohya's
    ``ss_v_parameterization`` "True" (what kohya, A1111 and ComfyUI read to sample a v-prediction model's
    LoRA as v-prediction) and a zero-terminal-SNR one ``ss_zero_terminal_snr`` "True"; an epsilon base
    writes neither (kohya's default)."""
    from shoe_lora_pipeline.core.families import SD15

    family = family or SD15
    res = facts.resolution or family.default_resolution
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": int(lora["rank"]),
        "ss_network_alpha": float(lora["alpha"]),
        "ss_network_dropout": float(lora.get("dropout") or 0.0),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": step,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_learning_rate": facts.learning_rate,
        "ss_unet_lr": facts.learning_rate,
        "ss_text_encoder_lr": None,  # the text encoder is not trained
        "ss_lr_scheduler": facts.lr_scheduler,
        "ss_lr_warmup_steps": facts.lr_warmup_steps,
        "ss_batch_size_per_device": facts.train_batch_size,
        "ss_gradient_accumulation_steps": facts.gradient_accumulation_steps,
        "ss_num_train_images": facts.num_train_images,
        "ss_seed": facts.seed,
        "ss_mixed_precision": facts.mixed_precision,
        # kohya's names for the objective's options (None = off, as kohya writes an unset option)
        "ss_min_snr_gamma": facts.snr_gamma,
        "ss_noise_offset": facts.noise_offset or None,
        "ss_ip_noise_gamma": facts.input_perturbation or None,
        "ss_caption_dropout_rate": facts.caption_dropout or 0.0,
        "ss_tag_frequency": json.dumps({dataset_name: tag_frequency(facts.captions)}),
        "ss_training_comment": training_comment
        or f"shoe_lora_pipeline export of step {step}; provenance in the shoe_lora_* keys",
        "ss_output_name": f"{dataset_name}_lora",
    }
    if objective is not None and objective.prediction_type == "v_prediction":
        meta["ss_v_parameterization"] = True
    if objective is not None and objective.zero_terminal_snr:
        meta["ss_zero_terminal_snr"] = True
    # kohya writes str(value) for every field, "None" included.
    return {k: v if isinstance(v, str) else str(v) for k, v in meta.items()}


@dataclass(frozen=True)
class BaseObjective:
    """What the base model's UNet predicts and whether its noise schedule ends at zero SNR."""

    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False


def base_objective(scheduler_config: Mapping[str, Any] | None) -> BaseObjective:
    """The objective a diffusers scheduler config describes (``prediction_type``; zero terminal SNR when
    ``rescale_betas_zero_snr`` is set or its ``trained_betas`` leave alpha_bar_T below 1e-4)."""
    config = scheduler_config or {}
    zero_snr = bool(config.get("rescale_betas_zero_snr"))
    betas = config.get("trained_betas")
    if isinstance(betas, list) and betas:
        alpha_bar = math.prod(1.0 - float(b) for b in betas)
        zero_snr = zero_snr or alpha_bar < 1e-4
    return BaseObjective(str(config.get("prediction_type") or "epsilon"), zero_snr)


def _rewrite_safetensors_metadata(path: Path, extra: Mapping[str, str] | None = None) -> None:
    """Add ``extra`` to the header metadata of a safetensors file and write the header with sorted keys.

    safetensors serialises ``__metadata__`` from a hash map, so its own saver orders the keys differently
    on every call; sorted keys make the same tensors + metadata the same bytes. The tensor section is
    copied unchanged (offsets are relative to it); the header is space-padded to 8 bytes as safetensors
    pads it.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        tensor_bytes = f.read()
    header["__metadata__"] = {**(header.get("__metadata__") or {}), **(extra or {})}
    blob = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.write(tensor_bytes)


def _peft_lora_config(meta: Mapping[str, Any], base_model: str | None, revision: str | None) -> LoraConfig:
    from shoe_lora_pipeline.core.models import lora_config

    cfg = lora_config(meta["rank"], meta["alpha"], meta["dropout"], list(meta["target_modules"]))
    cfg.base_model_name_or_path = base_model
    cfg.revision = revision
    return cfg


def _save_peft_adapter(
    peft_sd: Mapping[str, torch.Tensor], lora_cfg: LoraConfig, unet_config_dir: Path, out_dir: Path
) -> None:
    """adapter_config.json + adapter_model.safetensors, written by ``PeftModel.save_pretrained``."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    # The architecture only: no memory and no weights, even for the full SD1.5 UNet.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_config_dir))
    # get_peft_model copies the module's name_or_path into adapter_config.json's base_model_name_or_path.
    unet.name_or_path = lora_cfg.base_model_name_or_path
    peft_model = get_peft_model(unet, lora_cfg)
    # A PeftModel addresses the UNet as base_model.model.<module> and its parameters carry the adapter
    # name; save_pretrained(state_dict=...) strips the name and writes the layout that
    # PeftModel.from_pretrained(unet, dir) expects. Every key and shape is checked against the
    # (meta) parameters of the wrapped base UNet first.
    expected = {k: tuple(v.shape) for k, v in peft_model.state_dict().items() if ".lora_" in k}
    named = {f"base_model.model.{k.removesuffix('.weight')}.default.weight": v for k, v in peft_sd.items()}
    given = {k: tuple(v.shape) for k, v in named.items()}
    if given != expected:
        diff = sorted(set(given.items()) ^ set(expected.items()))
        raise LoraExportError(
            f"LoRA does not fit the base UNet in {unet_config_dir}: first mismatch {diff[:2]}"
        )
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        # save_embedding_layers=False: "auto" probes the Hub for the base model's config.json (a network
        # call during export); no embedding layer is ever a target here.
        peft_model.save_pretrained(
            tmp, safe_serialization=True, save_embedding_layers=False, state_dict=named
        )
        # save_pretrained also writes peft's generic README.md; we write our own model card instead.
        for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
            os.replace(Path(tmp) / name, out_dir / name)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def select_checkpoint(checkpoints_dir: Path, wanted: int | str | None, training_dir: Path) -> CheckpointInfo:
    """The checkpoint to export: the newest, ``checkpoint-<wanted>`` (manual early stopping), or with
    ``"best"`` the kept checkpoint whose step has the lowest validation loss in validation_loss.csv."""
    from shoe_lora_pipeline.core.checkpoints import list_checkpoints

    kept = list_checkpoints(checkpoints_dir)
    have = ", ".join(str(c.step) for c in kept) or "none"
    if not kept:
        raise LoraExportError(f"no complete checkpoint in {checkpoints_dir}: materialize lora_training")
    if wanted is None:
        return kept[-1]
    if wanted == "best":
        by_step = {c.step: c for c in kept}
        rows = [
            r
            for r in read_validation_losses(Path(training_dir) / VALIDATION_LOSS_NAME)
            if r["step"] in by_step
        ]
        if not rows:
            raise LoraExportError(
                f"export.checkpoint_step = best: no validation loss was measured at a kept checkpoint "
                f"(kept steps: {have}; {Path(training_dir) / VALIDATION_LOSS_NAME}); the val split may be empty"
            )
        return by_step[best_validation_step(rows)]
    for ckpt in kept:
        if ckpt.step == wanted:
            return ckpt
    raise LoraExportError(f"export.checkpoint_step = {wanted}: no such checkpoint (kept steps: {have})")


def _merge_facts(facts: TrainingFacts, recorded: Mapping[str, Any], warnings: list[str]) -> TrainingFacts:
    """The checkpoint's recorded settings describe the weights: they win over the caller's (today's config)."""
    merged = TrainingFacts(**{f: getattr(facts, f) for f in facts.__dataclass_fields__})
    for name in _RECORDED_FACTS:
        value = recorded.get(name)
        # An objective option recorded as None was off for these weights; other None/[] mean "not recorded".
        if name not in recorded or value == [] or (value is None and name not in OBJECTIVE_KEYS):
            continue
        given = getattr(merged, name)
        if given not in (None, []) and given != value:
            warnings.append(
                f"training {name} = {given!r} differs from the checkpoint's {value!r}; used the latter"
            )
        setattr(merged, name, value)
    return merged


def _merge_provenance(provenance: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Caller's record over the automatic one (versions, git, platform), checkpoint facts over both."""
    prov = {**collect_provenance(), **provenance}
    base = dict(meta.get("base_model") or {})
    facts = {
        "checkpoint_step": meta.get("global_step"),
        "base_model": base.get("base_model"),
        "base_model_revision": base.get("revision"),
        "base_model_fingerprint": base.get("fingerprint"),
        "base_model_family": base.get("family"),  # recorded for families other than SD1.5
        "training_hash": meta.get("training_hash"),
        "dataset_fingerprint": meta.get("dataset_fingerprint"),
    }
    recorded = meta.get("training_config")
    if isinstance(recorded, Mapping):
        # the objective the weights were trained with (an option recorded as None was off)
        prov.update({k: recorded[k] for k in OBJECTIVE_KEYS if k in recorded})
    warnings = []
    for key, value in facts.items():
        if value is None:
            continue
        given = prov.get(key)
        if given is not None and given != value:
            warnings.append(
                f"provenance {key} = {given!r} differs from the checkpoint's {value!r}; kept both"
            )
            prov[f"requested_{key}"] = given
        prov[key] = value
    prov["source_checkpoint_sha256"] = meta.get("weights_sha256")
    saved_at = meta.get("saved_at")
    prov["checkpoint_saved_at"] = (
        datetime.fromtimestamp(float(saved_at), timezone.utc).replace(microsecond=0).isoformat()
        if isinstance(saved_at, int | float)
        else None
    )
    return prov, warnings


def identity_provenance(prov: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance that the weights files and the model card carry: everything but :data:`RUN_FACTS`."""
    return {k: v for k, v in prov.items() if k not in RUN_FACTS}


def _base_model_folder(given: Path | None, meta: Mapping[str, Any], checkpoint_dir: Path) -> Path:
    """The base model's diffusers folder: as given, else the path the checkpoint recorded."""
    if given is None:
        recorded = (meta.get("base_model") or {}).get("path")
        given = Path(recorded) if recorded else None
    if given is None or not (Path(given) / "unet" / "config.json").is_file():
        raise LoraExportError(
            f"base model folder {given} (from {checkpoint_dir / TRAINING_STATE_NAME}) has no "
            "unet/config.json: pass base_model_dir= the diffusers folder of the base model"
        )
    return Path(given)


def _checkpoint_family(base_model_dir: Path, meta: Mapping[str, Any], checkpoint_dir: Path) -> ModelFamily:
    """The family of the base model folder; a checkpoint that recorded another family was trained on
    another model and cannot be exported against this one."""
    from shoe_lora_pipeline.core.families import family_of_folder

    family = family_of_folder(Path(base_model_dir))
    identity = meta.get("base_model")
    if not identity:
        return family  # a checkpoint that recorded no base model: the folder decides
    recorded = identity.get("family") or "sd15"  # SD1.5 identities name none
    if recorded != family.name:
        raise LoraExportError(
            f"{checkpoint_dir / TRAINING_STATE_NAME}: base_model.family = {recorded!r} but the base model "
            f"folder {base_model_dir} is {family.name} ({family.title}): export against the model it was "
            "trained on"
        )
    return family


def _losses_at_checkpoint(
    facts: TrainingFacts, meta: Mapping[str, Any], checkpoint_dir: Path, training_output_dir: Path
) -> None:
    """The training loss (recorded, else losses.csv at the step) and the validation loss at the step."""
    step = meta["global_step"]
    if facts.final_loss is None:
        facts.final_loss = meta["loss"]
    for losses_csv in (checkpoint_dir / "losses.csv", training_output_dir / "losses.csv"):
        if facts.final_loss is None:
            facts.final_loss = loss_at_step(losses_csv, step)
    measured = [r for r in read_validation_losses(checkpoint_dir / VALIDATION_LOSS_NAME) if r["step"] == step]
    facts.val_loss = measured[-1]["val_loss"] if measured else facts.val_loss


def _write_kohya_file(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    ss: dict[str, str],
    overrides: Mapping[str, str] | None,
    ours: Mapping[str, str],
) -> tuple[str, str]:
    """The kohya/A1111 file with its ``ss_*`` metadata (caller overrides checked), kohya's two hashes and
    our provenance keys; returns (sshs_model_hash, sshs_legacy_hash)."""
    from safetensors.torch import save_file

    for k, v in (overrides or {}).items():
        if not isinstance(v, str):
            raise LoraExportError(f"kohya metadata {k!r} must be a string, got {type(v).__name__}")
        if k in ("ss_network_dim", "ss_network_alpha") and v != ss[k]:
            # These must describe the tensors; a different value would mislead every client.
            raise LoraExportError(f"kohya metadata {k} = {v!r} contradicts the checkpoint ({ss[k]!r})")
        ss[k] = v
    model_hash, legacy_hash = kohya_model_hashes(dict(tensors), ss)
    header = {**ss, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, **ours}
    save_file(dict(tensors), str(path), metadata=header)
    _rewrite_safetensors_metadata(path)  # sorted header: the same bytes on every export
    return model_hash, legacy_hash


def _card_info(
    meta: Mapping[str, Any],
    facts: TrainingFacts,
    dataset_name: str,
    base_model: str,
    base_revision: str | None,
    step: int,
    prov: dict[str, Any],
    family: ModelFamily,
) -> ModelCardInfo:
    return ModelCardInfo(
        dataset_name=dataset_name,
        base_model=base_model,
        base_model_revision=base_revision,
        rank=meta["rank"],
        alpha=meta["alpha"],
        dropout=meta["dropout"],
        target_modules=list(meta["target_modules"]),
        steps=step,
        **{name: getattr(facts, name) for name in _CARD_FACTS},
        objective={k: getattr(facts, k) for k in OBJECTIVE_KEYS},
        instance_prompt=facts.caption_template,
        widget_prompts=list(facts.validation_prompts),
        provenance=prov,
        family=family,
    )


def export_lora(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    dataset_name: str,
    provenance: Mapping[str, Any],
    training: TrainingFacts | None = None,
    kohya_metadata: Mapping[str, str] | None = None,
    base_model_dir: Path | None = None,
    training_output_dir: Path | None = None,
) -> ExportResult:
    """Write the PEFT, diffusers and kohya files, ``validation_grid.png``, ``provenance.json`` and README.md.

    ``kohya_metadata`` entries override the ``ss_*`` fields derived from ``training``. ``base_model_dir``
    (the diffusers folder; default: the path recorded in the checkpoint) supplies the UNet config the PEFT
    adapter is checked against. ``training_output_dir`` (default: two levels above the checkpoint) holds
    ``losses.csv`` and ``validation/``.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    from shoe_lora_pipeline.core.kohya_keys import kohya_unet_names

    checkpoint_dir = Path(checkpoint_dir)
    peft_sd, meta = load_checkpoint_lora(checkpoint_dir)
    prov, warnings = _merge_provenance(provenance, meta)
    if prov.get("dataset_name") is None:
        prov["dataset_name"] = dataset_name
    facts = _merge_facts(training or TrainingFacts(), meta["training_config"], warnings)
    step = meta["global_step"]
    base_model = prov.get("base_model") or "unknown"
    base_revision = prov.get("base_model_revision")
    base_model_dir = _base_model_folder(base_model_dir, meta, checkpoint_dir)
    family = _checkpoint_family(base_model_dir, meta, checkpoint_dir)
    unet_config = _read_json(Path(base_model_dir) / "unet" / "config.json")
    training_output_dir = Path(training_output_dir or checkpoint_dir.parent.parent)
    _losses_at_checkpoint(facts, meta, checkpoint_dir, training_output_dir)
    lora = {k: meta[k] for k in ("rank", "alpha", "dropout", "target_modules")}
    lora["scale"] = meta["alpha"] / meta["rank"]
    identity = identity_provenance(prov)
    ours = provenance_metadata(identity, lora)
    lora_cfg = _peft_lora_config(meta, base_model, base_revision)
    kohya_name = kohya_weights_name(dataset_name)

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        # 1. PEFT adapter.
        _save_peft_adapter(peft_sd, lora_cfg, Path(base_model_dir) / "unet", tmp)
        _rewrite_safetensors_metadata(tmp / PEFT_WEIGHTS_NAME, ours)

        # 2. diffusers: the adapter metadata carries lora_alpha, so load_lora_weights applies alpha/r.
        family.text2img_pipeline_class().save_lora_weights(
            tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(dict(peft_sd)),
            safe_serialization=True,
            unet_lora_adapter_metadata=lora_cfg.to_dict(),
        )
        _rewrite_safetensors_metadata(tmp / DIFFUSERS_WEIGHTS_NAME, ours)

        # 3. kohya / A1111 / ComfyUI.
        scheduler_json = Path(base_model_dir) / "scheduler" / "scheduler_config.json"
        ss = build_kohya_metadata(
            lora,
            facts,
            dataset_name=dataset_name,
            base_model=base_model,
            step=step,
            family=family,
            objective=base_objective(_read_json(scheduler_json) if scheduler_json.is_file() else None),
        )
        kohya_tensors = peft_to_kohya(peft_sd, meta["alpha"], kohya_unet_names(family, unet_config))
        model_hash, legacy_hash = _write_kohya_file(tmp / kohya_name, kohya_tensors, ss, kohya_metadata, ours)

        # 4. Validation grid of this step.
        grid_src = latest_grid(training_output_dir, at_or_before=step)
        grid = None
        if grid_src is not None:
            grid = tmp / VALIDATION_GRID_NAME
            shutil.copyfile(grid_src, grid)

        weight_files = [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, kohya_name]
        hashes = {name: file_sha256(tmp / name) for name in weight_files}

        # 5. provenance.json, human-readable; the only file with this run's RUN_FACTS.
        record = {
            "schema": PROVENANCE_SCHEMA,
            "kind": "lora_weights",
            "lora": lora,
            "provenance": prov,
            "files": hashes,
            "kohya": {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash},
            "warnings": warnings,
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

        # 6. Model card.
        card = _card_info(meta, facts, dataset_name, base_model, base_revision, step, identity, family)
        card.kohya_weights_file, card.file_sha256 = kohya_name, hashes
        card.validation_grid_file = VALIDATION_GRID_NAME if grid else None
        write_model_card(tmp / MODEL_CARD_NAME, card)
    return ExportResult(
        out_dir=out_dir,
        kohya_weights=out_dir / kohya_name,
        validation_grid=out_dir / VALIDATION_GRID_NAME if grid else None,
        rank=meta["rank"],
        alpha=meta["alpha"],
        step=step,
        file_sha256=hashes,
        provenance=prov,
        warnings=warnings,
    )


# --------------------------------------------------------------------------------------------------
# Does a LoRA file fit a model?
# --------------------------------------------------------------------------------------------------


class LoraMismatchError(LoraExportError):
    """A LoRA file does not fit the model it is loaded onto (another family, another architecture); the
    message names the file, the keys at fault, the family the file says it is for and the model's."""


def _declared_family(meta: Mapping[str, str]) -> tuple[ModelFamily | None, str | None]:
    """(family, where the file says so) from kohya's ``ss_base_model_version`` or our provenance (an
    export names ``base_model_family`` unless it is SD1.5, as every export before SDXL was)."""
    from shoe_lora_pipeline.core.families import FAMILIES, SD15, family_named

    version = meta.get("ss_base_model_version")
    if version:
        found = [f for f in FAMILIES.values() if f.kohya_base_model_version == version]
        return (found[0] if found else None), f"ss_base_model_version = {version!r}"
    raw = meta.get(META_PROVENANCE_KEY)
    prov = json.loads(raw) if raw else {}
    if prov.get("base_model_family"):
        return family_named(prov["base_model_family"]), (
            f"{META_PROVENANCE_KEY} base_model_family = {prov['base_model_family']!r}"
        )
    if prov.get("base_model"):
        return SD15, f"{META_PROVENANCE_KEY} base_model = {prov['base_model']!r}, no base_model_family"
    return None, None


def _lora_weights_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise LoraExportError(f"{path}: no {DIFFUSERS_WEIGHTS_NAME} or {PEFT_WEIGHTS_NAME} in this folder")
    return path


def check_lora_fits(
    path: Path, unet: torch.nn.Module, family: ModelFamily, *, model: str = "the model"
) -> None:
    """Raise :class:`LoraMismatchError` unless every UNet LoRA layer in the file at ``path`` (a diffusers,
    PEFT or kohya file, or an export folder) names a module of ``unet`` with the layer's shapes.

    Read from the safetensors header only (names, shapes): cheap enough to run before every load, and
    ``unet`` may be a meta-device model. kohya names are accepted in both conventions (diffusers' and the
    LDM blocks of SDXL files). Text-encoder layers for a second text encoder fail on a one-encoder family.
    """
    import torch
    from safetensors import safe_open

    from shoe_lora_pipeline.core.kohya_keys import KOHYA_UNET_PREFIX, KohyaUnetNames, ldm_attention_blocks

    path = _lora_weights_file(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise LoraExportError(f"{path}: not a readable safetensors file: {exc}") from None
    # (inputs, outputs) of every layer a LoRA can adapt: linear layers and convolutions (LoCon files); a
    # layer peft already wraps is found by its base layer's name.
    linear: dict[str, tuple[int, int]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear[name.removesuffix(".base_layer")] = (module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            linear[name.removesuffix(".base_layer")] = (module.in_channels, module.out_channels)
    kohya_names = {}
    for names in (KohyaUnetNames(None), KohyaUnetNames(ldm_attention_blocks(unet.config))):
        for module in linear:
            try:
                kohya_names[names.kohya_name(module)] = module
            except ValueError:
                continue  # outside an attention block: no LDM name
    declared, where = _declared_family(meta)
    problems: list[str] = []
    if declared is not None and declared != family:
        # Small models of two families can share every layer shape: what the file says decides.
        weights = sorted(k for k in shapes if _lora_module_of(k, {}, KOHYA_UNET_PREFIX)[1] is not None)
        problems.append(f"{where} says it is a {declared.name} LoRA (keys {', '.join(weights[:2])}, …)")
    for key, shape in sorted(shapes.items()):
        module, part = _lora_module_of(key, kohya_names, KOHYA_UNET_PREFIX)
        if part is None:
            continue  # alpha, text encoders of this family, DoRA scales…
        if module == "text_encoder_2" and family.num_text_encoders < 2:
            problems.append(f"{key} (a second text encoder; {family.title} has one)")
            continue
        layer = linear.get(module) if module is not None else None
        if layer is None:
            problems.append(f"{key} (no such layer in the UNet)")
        elif part == "A" and shape[1:2] != (layer[0],):  # [r, in] (a convolution's [r, in, k, k])
            problems.append(f"{key} {list(shape)} (the layer takes {layer[0]} inputs)")
        elif part == "B" and shape[:1] != (layer[1],):  # [out, r, …]
            problems.append(f"{key} {list(shape)} (the layer gives {layer[1]} outputs)")
    if problems:
        found = f"{declared.name} ({declared.title})" if declared else "not recorded in the file"
        raise LoraMismatchError(
            f"{path}: this LoRA does not fit {model}, a {family.name} ({family.title}) model: "
            f"{'; '.join(problems[:3])}{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. "
            f"Family found in the file: {found}{f' ({where})' if where else ''}. Load it onto a base model of "
            "its own family."
        )


def _lora_module_of(
    key: str, kohya_names: Mapping[str, str], kohya_prefix: str
) -> tuple[str | None, str | None]:
    """(UNet module path, "A"/"B") of a LoRA weight key in any of the three formats; (None, None) for
    keys that are not UNet LoRA weights; ("text_encoder_2", "A") for a second text encoder's layers."""
    # PEFT lora_A/lora_B, diffusers' lora.down/lora.up, kohya's lora_down/lora_up.
    m = re.fullmatch(r"(.+)\.lora[._](A|B|down|up)\.weight", key)
    if m is None:
        return None, None
    stem, part = m.group(1), {"down": "A", "up": "B"}.get(m.group(2), m.group(2))
    if stem.startswith(("text_encoder_2.", "lora_te2_")):
        return "text_encoder_2", part
    if stem.startswith(("text_encoder.", "lora_te1_", "lora_te_")):
        return None, None
    if stem.startswith(kohya_prefix):
        return kohya_names.get(stem), part
    return stem.removeprefix("base_model.model.").removeprefix("unet."), part


# --------------------------------------------------------------------------------------------------
# Fuse
# --------------------------------------------------------------------------------------------------


def fuse_lora_pipeline(
    base_model_dir: Path,
    lora_dir: Path,
    out_dir: Path,
    lora_scale: float = 1.0,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Save base model + LoRA merged into the weights as a standalone diffusers pipeline folder of the base
    model's family (``StableDiffusionXLPipeline.from_pretrained`` loads an SDXL one).

    ``lora_scale`` multiplies the trained alpha/r scale (1.0 = as trained). ``provenance.json`` carries the
    LoRA's own record over and describes the fusing (scale, source sha256, ``provenance`` of this run) under
    ``fuse``.
    """
    from shoe_lora_pipeline.core.pipelines import family_of_pipeline, pipeline_from_folder

    lora_dir = Path(lora_dir)
    weights = lora_dir / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        raise LoraExportError(f"{weights}: LoRA weights file not found")
    # The base model's own family: an SDXL base gives a StableDiffusionXLPipeline folder.
    pipe = pipeline_from_folder(Path(base_model_dir), local_files_only=False, requires_safety_checker=True)
    check_lora_fits(weights, pipe.unet, family_of_pipeline(pipe), model=f"base model {base_model_dir}")
    pipe.load_lora_weights(str(lora_dir), weight_name=DIFFUSERS_WEIGHTS_NAME)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    leftover = [n for n, _ in pipe.unet.named_modules() if n.endswith(("lora_A", "lora_B"))]
    if leftover:
        raise LoraExportError(f"LoRA layers remain after fusing, e.g. {leftover[0]}")

    source = _read_json(lora_dir / PROVENANCE_NAME) if (lora_dir / PROVENANCE_NAME).is_file() else {}
    lora = {**(source.get("lora") or {}), "fused_scale": lora_scale}
    record = {
        "schema": PROVENANCE_SCHEMA,
        "kind": "fused_pipeline",
        "lora": lora,
        # How the LoRA was trained and exported; the fusing run is described under "fuse".
        "provenance": source.get("provenance") or dict(provenance or {}) or collect_provenance(),
        "fuse": {
            "lora_scale": lora_scale,
            "created_at": utc_now_iso(),
            "source_lora_file": DIFFUSERS_WEIGHTS_NAME,
            "source_lora_sha256": file_sha256(weights),
        },
    }
    if provenance:
        record["fuse"]["provenance"] = dict(provenance)
    with atomic_directory(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------
# Reading provenance back
# --------------------------------------------------------------------------------------------------


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # header only; no torch needed
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ProvenanceError(f"{path}: not a readable safetensors file: {exc}") from None


def _from_safetensors(path: Path) -> dict[str, Any]:
    meta = _safetensors_metadata(path)
    lora: dict[str, Any] = {}
    fmt = "safetensors"
    if any(k.startswith("ss_") for k in meta):
        fmt = "kohya"
        if "ss_network_dim" in meta:
            lora["rank"] = int(meta["ss_network_dim"])
        if "ss_network_alpha" in meta:
            lora["alpha"] = float(meta["ss_network_alpha"])
    if "lora_adapter_metadata" in meta:
        fmt = "diffusers"
        adapter = json.loads(meta["lora_adapter_metadata"])
        for ours, theirs in (("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
            if f"unet.{theirs}" in adapter:
                lora[ours] = adapter[f"unet.{theirs}"]
        if "unet.target_modules" in adapter:
            lora["target_modules"] = sorted(adapter["unet.target_modules"])
    sibling = path.parent / PEFT_CONFIG_NAME
    if path.name == PEFT_WEIGHTS_NAME and sibling.is_file():
        fmt = "peft"
        cfg = json.loads(sibling.read_text())
        lora.update(
            rank=cfg.get("r"),
            alpha=cfg.get("lora_alpha"),
            dropout=cfg.get("lora_dropout"),
            target_modules=sorted(cfg.get("target_modules") or []),
        )
    for k in ("rank", "alpha", "dropout", "target_modules"):
        raw = meta.get(f"{META_PREFIX}lora_{k}")
        if k not in lora and raw is not None:
            lora[k] = json.loads(raw) if k != "target_modules" or raw.startswith("[") else raw
    if META_PROVENANCE_KEY in meta:
        prov = json.loads(meta[META_PROVENANCE_KEY])
    else:  # written by another tool: only the flat string entries
        prov = {
            k.removeprefix(META_PREFIX): v
            for k, v in meta.items()
            if k.startswith(META_PREFIX) and not k.startswith(f"{META_PREFIX}lora_")
        }
    if not prov:
        raise ProvenanceError(f"{path}: no shoe_lora provenance in the safetensors header")
    extra = {k: v for k, v in meta.items() if k.startswith("sshs_")}
    return {"format": fmt, "lora": lora, "provenance": prov, "extra": extra}


def _from_json_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvenanceError(f"{path}: cannot read provenance JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("provenance"), dict):
        raise ProvenanceError(f"{path}: no 'provenance' object in this JSON file")
    extra = {k: v for k, v in record.items() if k not in {"lora", "provenance", "kind", "schema"}}
    return {
        "format": record.get("kind", "provenance.json"),
        "lora": record.get("lora") or {},
        "provenance": record["provenance"],
        "extra": extra,
    }


def _from_model_card(path: Path) -> dict[str, Any]:
    try:
        front = read_front_matter(path)
    except ModelCardError as exc:
        raise ProvenanceError(str(exc)) from None
    block = front.get(FRONT_MATTER_KEY)
    if not isinstance(block, dict) or not isinstance(block.get("provenance"), dict):
        raise ProvenanceError(f"{path}: no '{FRONT_MATTER_KEY}' provenance in the model card front matter")
    return {
        "format": "model_card",
        "lora": block.get("lora") or {},
        "provenance": block["provenance"],
        "extra": {"base_model": front.get("base_model"), "files": block.get("files") or {}},
    }


def _from_render_png(path: Path) -> dict[str, Any]:
    """A published product render: the LoRA's provenance travels inside the PNG (core.renders.pnginfo)."""
    from shoe_lora_pipeline.core.renders.pnginfo import PngProvenanceError, read_png_provenance

    try:
        found = read_png_provenance(path)
    except PngProvenanceError as exc:
        raise ProvenanceError(str(exc)) from None
    render = found["render"]
    if not isinstance(render, dict) or not isinstance(render.get("lora_provenance"), dict):
        if _marking(path).get("digital_source_type"):  # published from outside (`shoe-lora publish`)
            return _from_render_image(path)
        raise ProvenanceError(f"{path}: no shoe_lora_render provenance chunk in this PNG")
    extra = {
        k: v for k, v in render.items() if k not in {"lora_provenance", "qa", "schema", "dagster_run_id"}
    }
    # Two Dagster runs meet here: the LoRA's training run (provenance.dagster_run_id) and the run that
    # published this image (the chunk's dagster_run_id): named apart.
    extra["publish_run_id"] = render.get("dagster_run_id")
    extra["parameters"] = found["parameters"]
    extra["marking"] = _marking(path)
    qa = render.get("qa") if isinstance(render.get("qa"), dict) else {}
    # The verdict first (passed, score, failed), then each check's measurements.
    qa = {**{k: qa[k] for k in ("passed", "score", "failed") if k in qa}, **qa}
    return {
        "format": "render_png",
        "lora": {},
        "provenance": render["lora_provenance"],
        "qa": qa,
        "extra": extra,
    }


def _add_run_facts(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The export run's :data:`RUN_FACTS` from the ``provenance.json`` beside ``path``, when that record
    describes this very file (its sha256 in ``files``; for the model card, the same ``files``)."""
    prov = result["provenance"]
    sidecar = path.parent / PROVENANCE_NAME
    if all(prov.get(k) is not None for k in RUN_FACTS) or not sidecar.is_file():
        return result
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return result
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not isinstance(record.get("provenance"), dict):
        return result
    if path.suffix.lower() == ".md":
        same = result["extra"].get("files") == files
    else:
        same = files.get(path.name) == file_sha256(path)
    if same:
        for key in RUN_FACTS:
            if prov.get(key) is None and record["provenance"].get(key) is not None:
                prov[key] = record["provenance"][key]
        result["extra"]["run_facts_from"] = str(sidecar)
    return result


def _marking(path: Path) -> dict[str, Any]:
    """The AI-generated marking of a published image (core.marking): XMP source type, C2PA state, signer."""
    from shoe_lora_pipeline.core.marking import read_marking

    try:
        m = read_marking(path)
    except OSError:
        return {}
    c2pa = m["c2pa"]
    return {
        "digital_source_type": m["digital_source_type"],
        "c2pa": (c2pa["validation_state"] or "invalid") if c2pa["present"] else c2pa.get("error") or "none",
        "c2pa_status": c2pa.get("status"),
        "c2pa_signer": c2pa["signer"],
        "c2pa_issuer": c2pa["issuer"],
        "c2pa_actions": [f"{a['action']} ({a['digitalSourceType']})" for a in c2pa.get("actions") or []],
        "icc": m["icc"],
    }


def _from_render_image(path: Path) -> dict[str, Any]:
    """A published JPEG (or an outside image published with ``shoe-lora publish``): the A1111 parameters
    in EXIF UserComment / the PNG chunk, the JSON provenance in the XMP packet / PNG chunk."""
    from shoe_lora_pipeline.core.marking import read_marking

    try:
        found = read_marking(path)
    except OSError as exc:
        raise ProvenanceError(f"{path}: not a readable image: {exc}") from None
    render = found["render"]
    if not isinstance(render, dict) and not found["digital_source_type"]:
        raise ProvenanceError(f"{path}: no shoe_lora_render provenance and no AI marking in this image")
    render = render if isinstance(render, dict) else {}
    lora_provenance = render.get("lora_provenance")
    extra = {
        k: v for k, v in render.items() if k not in {"lora_provenance", "qa", "schema", "dagster_run_id"}
    }
    if render.get("dagster_run_id") is not None:
        extra["publish_run_id"] = render["dagster_run_id"]
    extra["parameters"] = found["parameters"]
    extra["marking"] = _marking(path)
    fmt = "render_jpeg" if found["format"] == "JPEG" else "render_png"
    qa = render.get("qa") if isinstance(render.get("qa"), dict) else {}
    qa = {**{k: qa[k] for k in ("passed", "score", "failed") if k in qa}, **qa}
    return {
        "format": fmt,
        "lora": {},
        "provenance": lora_provenance if isinstance(lora_provenance, dict) else {},
        "qa": qa,
        "extra": extra,
    }


def read_provenance(path: Path) -> dict[str, Any]:
    """Provenance and LoRA hyper-parameters stored in an exported file or folder.

    Accepts a ``.safetensors`` file (kohya, diffusers or PEFT export), ``adapter_config.json``,
    ``provenance.json``, ``README.md``, the ``lora_weights`` folder, a fused pipeline folder or a published
    product render (``.png`` or ``.jpg``, with its AI marking under ``extra.marking``).
    Returns ``{"path", "format", "lora", "provenance", "extra"}`` (a render also ``"qa"``: the product QA
    it was published with). Raises :class:`ProvenanceError` naming the path when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise ProvenanceError(f"{path}: no such file or folder")
    if path.is_dir():
        for name in (PROVENANCE_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, MODEL_CARD_NAME):
            if (path / name).is_file():
                return read_provenance(path / name)
        raise ProvenanceError(
            f"{path}: folder has no {PROVENANCE_NAME}, {PEFT_WEIGHTS_NAME}, {DIFFUSERS_WEIGHTS_NAME} or "
            f"{MODEL_CARD_NAME} to read provenance from"
        )
    suffix = path.suffix.lower()
    if path.name == PEFT_CONFIG_NAME and (path.parent / PEFT_WEIGHTS_NAME).is_file():
        # adapter_config.json has no room for provenance; its weights file carries it.
        return read_provenance(path.parent / PEFT_WEIGHTS_NAME)
    if suffix == ".safetensors":
        result = _add_run_facts(path, _from_safetensors(path))
    elif suffix == ".json":
        result = _from_json_record(path)
    elif suffix == ".md":
        result = _add_run_facts(path, _from_model_card(path))
    elif suffix == ".png":
        result = _from_render_png(path)
    elif suffix in (".jpg", ".jpeg"):
        result = _from_render_image(path)
    else:
        raise ProvenanceError(
            f"{path}: not an exported file (.safetensors, provenance.json, README.md or a render .png/.jpg)"
        )
    lora = result["lora"]
    if lora.get("rank") and lora.get("alpha") is not None and "scale" not in lora:
        lora["scale"] = float(lora["alpha"]) / float(lora["rank"])
    return {"path": str(path), **result}


def weights_header(path: Path) -> dict[str, str]:
    """Raw safetensors header metadata (for tests and debugging)."""
    return _safetensors_metadata(Path(path))


def kohya_tensor_hash(path: Path) -> str:
    """sha256 of the tensor section of a safetensors file; equals ``sshs_model_hash`` of a kohya file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def lora_content_sha256(path: Path) -> str:
    """What of a diffusers LoRA file decides the pixels it gives: the tensor bytes and the adapter
    metadata diffusers applies (rank, alpha, targets), not the provenance or kohya facts in the header.
    Renders are keyed on it, so re-writing the same LoRA with other provenance re-renders nothing."""
    adapter = _safetensors_metadata(Path(path)).get("lora_adapter_metadata")
    payload = {
        "tensors_sha256": kohya_tensor_hash(path),
        "adapter": json.loads(adapter) if adapter else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
