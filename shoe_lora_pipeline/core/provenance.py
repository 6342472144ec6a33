"""Provenance: what produced an exported artefact, recorded so it can be audited without Dagster.

Everything here is cheap and never fails the export: a missing package, no git binary or a folder that is
not a git checkout just leave the corresponding field ``None``.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.fsutil import file_sha256  # noqa: F401  (part of this module's API)

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.config import PipelineConfig

PROVENANCE_SCHEMA = "shoe_lora_pipeline/provenance/v1"
# Distributions whose versions decide how the weights were produced and how they load.
TRACKED_PACKAGES = (
    "shoe_lora_pipeline",
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "accelerate",
    "safetensors",
    "dagster",
)
# The repository this package lives in (valid for an editable install / source checkout).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20


def utc_now_iso() -> str:
    """Current time in UTC, ISO 8601 with an explicit ``+00:00`` offset, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions; ``None`` for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git binary, timeout, unreadable folder
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(repo_dir: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "repo"}`` of the checkout holding ``repo_dir`` (default: this package's).

    The package folder must itself be the top of the work tree: a package installed into a virtualenv that
    happens to sit inside some *other* git repository must not report that repository's commit.
    ``dirty`` ignores untracked files (outputs, data) and means "tracked files differ from HEAD".
    """
    root = Path(repo_dir) if repo_dir is not None else _PACKAGE_ROOT
    info: dict[str, Any] = {"commit": None, "dirty": None, "repo": None}
    if not root.is_dir():
        return info
    top = _git(["rev-parse", "--show-toplevel"], root)
    if top is None or (repo_dir is None and Path(top).resolve() != root.resolve()):
        return info
    info["repo"] = top
    info["commit"] = _git(["rev-parse", "HEAD"], root)  # None in a repository without commits
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    info["dirty"] = None if status is None else bool(status)
    return info


# The training objective's options (off in the recipe), recorded wherever a LoRA's settings are.
OBJECTIVE_KEYS = ("snr_gamma", "noise_offset", "input_perturbation", "caption_dropout")


def objective_settings(
    recorded: Mapping[str, Any] | None, config: PipelineConfig | None = None
) -> dict[str, Any]:
    """min-SNR-γ, noise offset, input perturbation and caption dropout as the checkpoint recorded them
    (else as configured)."""
    fallback = config.training.model_dump() if config is not None else {}
    recorded = recorded if isinstance(recorded, Mapping) else {}
    return {key: recorded.get(key, fallback.get(key)) for key in OBJECTIVE_KEYS}


def collect_provenance(
    *,
    dagster_run_id: str | None = None,
    config: PipelineConfig | None = None,
    training_state: Mapping[str, Any] | None = None,
    dataset_manifest_hash: str | None = None,
    repo_dir: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A flat provenance record (values are str/int/float/bool/None, except ``package_versions``).

    ``training_state`` is a checkpoint's ``training_state.json``; its facts (step, base model, training
    hash) describe the weights and therefore take precedence over what the current config would give.
    """
    state = dict(training_state or {})
    base = dict(state.get("base_model") or {})
    git = git_info(repo_dir)
    record: dict[str, Any] = {
        "schema": PROVENANCE_SCHEMA,
        "created_at": utc_now_iso(),
        "dagster_run_id": dagster_run_id,
        "config_hash": config.config_hash() if config is not None else None,
        "training_hash": state.get("training_hash")
        or (config.training_hash(base.get("family")) if config is not None else None),
        "dataset_name": config.dataset.name if config is not None else None,
        "dataset_manifest_hash": dataset_manifest_hash,
        "dataset_fingerprint": state.get("dataset_fingerprint"),
        "base_model": base.get("base_model") or (config.training.base_model if config is not None else None),
        "base_model_revision": base.get("revision")
        or (config.training.revision if config is not None else None),
        "base_model_fingerprint": base.get("fingerprint"),
        "checkpoint_step": state.get("global_step"),
        **objective_settings(state.get("training_config"), config),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "package_versions": package_versions(),
    }
    if extra:
        record.update(extra)
    return record
