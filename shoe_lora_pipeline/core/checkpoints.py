"""Training checkpoints: atomic save, rotation, discovery and the resume-compatibility check.

A checkpoint is a folder ``{output_dir}/checkpoints/checkpoint-N/`` (N = optimizer steps done)::

    pytorch_lora_weights.safetensors  LoRA tensors only, diffusers format (keys ``unet.…lora.down/up…``),
                                      with the peft LoraConfig (r, lora_alpha, …) as safetensors metadata
    optimizer.bin                     AdamW state (accelerate)
    scheduler.bin                     LR scheduler state (accelerate)
    random_states_<rank>.pkl          python / numpy / torch CPU / CUDA RNG (one file per process)
    scaler.pt                         only with fp16 mixed precision (GradScaler)
    losses.csv                        the per-step log up to N (rewritten into the run folder on resume)
    validation_loss.csv               the validation losses up to N (likewise), when measured
    training_state.json               written last: global_step, epoch, micro-batch, hashes, base model, LoRA

No sampler or noise-generator state is needed: every sample's image and random draws are functions of
(seed, step, position) (``core/train_data.py``), so the step number alone says where the data stream is.

The UNet's frozen weights are never written (a save-state pre-hook removes them and writes the LoRA file
instead) and the LoRA weights are loaded back by a load-state pre-hook: the reference trainer lost them on
resume (diffusers issue #12689).

Atomicity: everything is written into ``checkpoints/.tmp-checkpoint-N-<pid>/``, fsynced, and only then
renamed to ``checkpoint-N``. A crash or kill during a save leaves the previous checkpoints untouched and
never a half-written ``checkpoint-N``; leftovers are removed by :func:`clean_stale_tmp` at the next start. If
``checkpoint-N`` already exists, the old one is renamed aside, the new one renamed in, and only then is the
old one deleted, so there is never a moment without a complete ``checkpoint-N`` on disk (a crash between
the two renames is repaired by :func:`clean_stale_tmp`, which puts the old one back).

Several processes (data parallel): every rank writes its RNG state into the same temporary folder (named by
rank 0's pid), rank 0 the rest; rank 0 publishes the folder once every rank is done (:func:`save_checkpoint`).
Only rank 0 cleans up, sets aside or moves folders (``training.decide_start``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

from shoe_lora_pipeline.core.fsutil import (
    apply_umask_tree,
    atomic_write_json,
    disk_full_guard,
    format_bytes,
    free_bytes,
    fsync_dir,
)

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
STATE_NAME = "training_state.json"
LOSSES_NAME = "losses.csv"
STATE_FORMAT = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-checkpoint-(\d+)-\d+$")
_OLD_RE = re.compile(r"^\.old-checkpoint-(\d+)-\d+$")


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    state: dict[str, Any]  # the parsed training_state.json


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def is_complete(path: Path) -> bool:
    """A checkpoint counts only with its state file (written last) and its LoRA weights."""
    return (path / STATE_NAME).is_file() and (path / LORA_WEIGHTS_NAME).is_file()


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) else None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints directly under ``root``, oldest first (by step number, not by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if not is_complete(p):
            logger.warning("ignoring incomplete checkpoint folder %s", p)
            continue
        state = read_state(p)
        if state is None:
            logger.warning("ignoring checkpoint %s: unreadable %s", p, STATE_NAME)
            continue
        found.append(CheckpointInfo(step=int(m.group(1)), path=p, state=state))
    return sorted(found, key=lambda c: c.step)


def newest_checkpoint(root: Path) -> CheckpointInfo | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def loading_problem(path: Path) -> str | None:
    """Why a complete-looking checkpoint would not load (truncated or missing files); None when it will."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / LORA_WEIGHTS_NAME), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for a truncated file
        return f"{LORA_WEIGHTS_NAME} does not load ({type(exc).__name__}: {exc})"
    for name in ("optimizer.bin", "scheduler.bin"):
        if not (path / name).is_file():
            return f"{name} is missing"
        try:
            torch.load(path / name, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated pickle raises EOFError, UnpicklingError or RuntimeError
            return f"{name} does not load ({type(exc).__name__}: {exc})"
    return None


def clean_stale_tmp(root: Path) -> list[str]:
    """Remove what an interrupted save left behind; returns a line per action, for the training log."""
    root = Path(root)
    actions: list[str] = []
    if not root.is_dir():
        return actions
    for p in sorted(root.iterdir()):
        if _TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed unfinished checkpoint save {p.name}")
        elif m := _OLD_RE.match(p.name):
            final = root / checkpoint_name(int(m.group(1)))
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
                actions.append(f"removed replaced checkpoint {p.name}")
            else:
                # Crash between "old aside" and "new in": the old one is the good one.
                os.replace(p, final)
                actions.append(f"restored {final.name} from {p.name}")
    return actions


# ----------------------------------------------------------------------------------------------
# LoRA weights (diffusers format) and the accelerate hooks
# ----------------------------------------------------------------------------------------------


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA tensors in diffusers naming (what ``save_lora_weights`` expects), no base weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def lora_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft LoraConfig as a dict (carries r and lora_alpha for loaders)."""
    return unet.peft_config["default"].to_dict()


def save_lora_weights(unet: torch.nn.Module, directory: Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` the diffusers way."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=lora_state_dict(unet),
        safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet),
    )
    return Path(directory) / LORA_WEIGHTS_NAME


def load_lora_weights_into(unet: torch.nn.Module, directory: Path) -> None:
    """Copy the LoRA tensors of ``directory`` into the UNet's existing adapter (in place, dtype kept)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    raw = load_file(str(Path(directory) / LORA_WEIGHTS_NAME))
    unet_sd = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_sd), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(
            f"LoRA weights in {directory} do not fit the UNet adapter: unexpected keys {unexpected[:5]}"
        )
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"LoRA weights in {directory} lack tensors for the adapter: {missing[:5]}")


def register_lora_hooks(accelerator: Accelerator, unet: torch.nn.Module) -> None:
    """Make ``accelerator.save_state``/``load_state`` write and read only the LoRA weights of ``unet``."""

    def is_ours(model: torch.nn.Module) -> bool:
        return accelerator.unwrap_model(model) is unet

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in reversed(range(len(models))):
            if is_ours(models[i]):
                if accelerator.is_main_process:  # every rank holds the same LoRA: one writes it
                    save_lora_weights(unet, Path(output_dir))
                # Popping the state dict stops accelerate from writing the full UNet (GBs of frozen weights).
                weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            if is_ours(models[i]):
                models.pop(i)
                load_lora_weights_into(unet, Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------
# atomic save and rotation
# ----------------------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    """fsync every file and the folder itself, so a power cut after the rename cannot lose contents."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    tag: int | None = None,
) -> Path:
    """Atomically write ``root/checkpoint-{step}``; returns its path.

    ``accelerator.save_state`` writes LoRA (via the hooks), optimizer, scheduler, RNG and registered
    objects; ``write_extra(folder)`` adds files (losses.csv); ``training_state.json`` is written last.

    With several processes every rank calls this: ``save_state`` writes each rank's RNG state and rank 0's
    LoRA, optimizer and scheduler into the same temporary folder, named by ``tag`` (the same on every rank;
    default this process's pid). Rank 0 alone adds the rest and publishes the folder once every rank is
    done writing; no rank returns before it is published.
    """
    root = Path(root)
    main = accelerator.is_main_process
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid() if tag is None else tag}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with disk_full_guard(root):  # a full disk: the partial folder goes, the previous checkpoints stay
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every rank's files are in tmp
            if main:
                if write_extra is not None:
                    write_extra(tmp)
                atomic_write_json(
                    tmp / STATE_NAME,
                    {**state, "format": STATE_FORMAT, "global_step": step, "saved_at": time.time()},
                    sort_keys=True,
                    default=str,
                )
                apply_umask_tree(tmp)  # safetensors writes the LoRA file 0600 whatever the umask
                _fsync_tree(tmp)
        except BaseException:
            # Exceptions and Ctrl-C: leave no partial folder. (A SIGKILL leaves tmp; clean_stale_tmp handles it.)
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    if main:
        _publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is replaced only after the new one is
    in place, so a complete ``final`` is on disk at every moment."""
    root = final.parent
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)


def rotate_checkpoints(root: Path, keep: int, protect: Iterable[int] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (by step), never one whose step is in
    ``protect`` (the best validation loss); returns the deleted folders."""
    ckpts = list_checkpoints(root)
    protected = set(protect)
    doomed = [c.path for c in ckpts[: max(0, len(ckpts) - keep)] if c.step not in protected]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(accelerator: Accelerator, ckpt: CheckpointInfo) -> None:
    """Restore LoRA weights, optimizer, scheduler, RNG and registered objects from ``ckpt``."""
    accelerator.load_state(str(ckpt.path))


# ----------------------------------------------------------------------------------------------
# resume compatibility
# ----------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


def config_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (keys present on either side)."""
    if not isinstance(old, dict):
        return []
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return diffs


def compatibility_problems(
    saved: dict[str, Any],
    current: dict[str, Any],
    explain: Callable[[dict[str, Any] | None], list[str]] | None = None,
) -> list[str]:
    """Why a checkpoint cannot be resumed under the current settings; empty when it can.

    Compared: ``training_hash``, ``dataset_fingerprint`` and the base model's ``fingerprint``. When the hash
    differs, the settings at fault are named by ``explain(saved training_config)`` (default: every
    setting that differs).
    """
    problems = []
    if saved.get("training_hash") != current["training_hash"]:
        old_config = saved.get("training_config")
        if explain is not None:
            diffs = explain(old_config)
        else:
            diffs = config_differences(old_config, current["training_config"])
        problems.append(
            f"training_hash differs (checkpoint {_short(saved.get('training_hash'))} vs current "
            f"{_short(current['training_hash'])})" + (": " + "; ".join(diffs) if diffs else "")
        )
    if saved.get("dataset_fingerprint") != current["dataset_fingerprint"]:
        problems.append(
            f"dataset_fingerprint differs (checkpoint {_short(saved.get('dataset_fingerprint'))} vs current "
            f"{_short(current['dataset_fingerprint'])})"
        )
    saved_base = (saved.get("base_model") or {}).get("fingerprint")
    current_base = current["base_model"].get("fingerprint")
    if saved_base != current_base:
        problems.append(
            f"base model fingerprint differs (checkpoint {(saved.get('base_model') or {}).get('base_model')} "
            f"{_short(saved_base)} vs current {current['base_model'].get('base_model')} {_short(current_base)})"
        )
    return problems


def supersede_checkpoints(root: Path, old_training_hash: str | None, extra: list[Path] = ()) -> Path | None:
    """Move every ``checkpoint-*`` (and ``extra`` paths, e.g. old losses.csv) into ``superseded-<hash>/``.

    Used when settings changed: the old run is kept for the user rather than deleted.
    """
    root = Path(root)
    movable = [p for p in root.iterdir() if _CKPT_RE.match(p.name)] if root.is_dir() else []
    movable += [p for p in extra if p.exists()]
    if not movable:
        return None
    base = f"superseded-{(old_training_hash or 'unknown')[:8]}"
    target = root / base
    n = 1
    while target.exists():
        n += 1
        target = root / f"{base}-{n}"
    target.mkdir(parents=True)
    for p in movable:
        os.replace(p, target / p.name)
    fsync_dir(root)
    return target


# ----------------------------------------------------------------------------------------------
# where a run starts: resume, skip or fresh
# ----------------------------------------------------------------------------------------------


@dataclass
class StartDecision:
    resume_from: CheckpointInfo | None  # the checkpoint to continue from (None: fresh start)
    note: str  # one line for the log and the Dagster metadata
    log_lines: list[str]  # what was cleaned up or set aside on the way, in order
    superseded: bool = False  # the settings changed: old checkpoints were moved aside
    complete: bool = False  # the checkpoint is already at max_train_steps: nothing to train


def _set_aside_broken(info: CheckpointInfo) -> Path:
    """Move a checkpoint that does not load to ``broken-checkpoint-N`` (kept for inspection, never loaded)."""
    target = info.path.with_name(f"broken-{info.path.name}")
    n = 1
    while target.exists():
        n += 1
        target = info.path.with_name(f"broken-{info.path.name}-{n}")
    os.replace(info.path, target)
    fsync_dir(info.path.parent)
    return target


def decide_start(
    root: Path,
    current: dict[str, Any],
    *,
    max_train_steps: int,
    explain: Callable[[dict[str, Any] | None], list[str]] | None = None,
    superseded_outputs: list[Path] = (),
) -> StartDecision:
    """Resume from the newest checkpoint that loads and matches ``current`` (training hash, dataset, base
    model); skip when it is already complete; otherwise start fresh, moving old checkpoints (and
    ``superseded_outputs``) aside. A newest checkpoint whose files do not load is set aside with a warning
    and the previous complete one is used."""
    root = Path(root)
    lines = [f"checkpoints: {action}" for action in clean_stale_tmp(root)]
    newest = None
    for info in reversed(list_checkpoints(root)):
        problem = loading_problem(info.path)
        if problem is None:
            newest = info
            break
        moved = _set_aside_broken(info)
        lines.append(
            f"warning: checkpoint {info.path.name} does not load ({problem}); moved to {moved.name}, "
            "trying the previous checkpoint"
        )
    if newest is None:
        return StartDecision(None, f"fresh start: no loadable checkpoint in {root}", lines)
    if problems := compatibility_problems(newest.state, current, explain=explain):
        moved = supersede_checkpoints(root, newest.state.get("training_hash"), extra=list(superseded_outputs))
        note = (
            f"fresh start: newest checkpoint {newest.path.name} does not match this run: "
            + " | ".join(problems)
            + (f"; old checkpoints and outputs moved to {moved}" if moved else "")
        )
        return StartDecision(None, note, lines, superseded=True)
    if newest.step >= max_train_steps:
        note = f"skipped: {newest.path.name} is already at max_train_steps={max_train_steps}"
        return StartDecision(newest, note, lines, complete=True)
    return StartDecision(
        newest, f"resumed from {newest.path.name} (step {newest.step} of {max_train_steps})", lines
    )


# ----------------------------------------------------------------------------------------------
# room on the disk
# ----------------------------------------------------------------------------------------------

# Per checkpoint beside the LoRA tensors and the two AdamW moments: RNG states, scheduler, JSON, losses.csv.
CHECKPOINT_OVERHEAD_BYTES = 1 << 20
# The export writes the LoRA three times (PEFT, diffusers, kohya) plus a card, provenance and a grid.
EXPORT_COPIES, EXPORT_OVERHEAD_BYTES = 3, 4 << 20


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def space_needed(root: Path, lora_bytes: int, keep: int) -> tuple[int, str]:
    """Bytes a training still needs in ``root`` (the checkpoints folder) and how they add up: room for
    ``keep + 1`` checkpoints (rotation removes the oldest only after the newest is complete) less those on
    disk already, and for the export. A checkpoint's size is the newest one's on disk, else the LoRA
    tensors and AdamW's two moments."""
    existing = list_checkpoints(root) if root.is_dir() else []
    size = _tree_bytes(existing[-1].path) if existing else 3 * lora_bytes + CHECKPOINT_OVERHEAD_BYTES
    new = max(1, keep + 1 - len(existing))
    export = EXPORT_COPIES * lora_bytes + EXPORT_OVERHEAD_BYTES
    how = (
        f"{new} more checkpoint(s) of {format_bytes(size)} (checkpoints_total_limit {keep} + 1 while "
        f"rotating, {len(existing)} on disk) and the export, {format_bytes(export)}"
    )
    return new * size + export, how


def check_room_for_training(root: Path, lora_bytes: int, keep: int) -> None:
    """Refuse to start a training that cannot write its checkpoints and export: raises
    :class:`InsufficientSpaceError` with the numbers."""
    needed, how = space_needed(root, lora_bytes, keep)
    free = free_bytes(root)
    if free is not None and free < needed:
        raise InsufficientSpaceError(
            f"not enough disk space to train in {root}: {format_bytes(free)} free, {format_bytes(needed)} "
            f"needed for {how}; free some space or lower training.checkpoints_total_limit"
        )


class InsufficientSpaceError(RuntimeError):
    """A training refused at its start because the disk cannot hold its checkpoints and export."""
