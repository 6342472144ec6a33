"""Provenance collection: package versions, git state (tolerating no git), UTC timestamps, hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shoe_lora_pipeline.core import provenance as prov


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    data = b"x" * (3 * 1024 * 1024 + 17)  # spans several 1 MiB chunks
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    assert prov.file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_utc_timestamp_is_iso_and_utc() -> None:
    stamp = prov.utc_now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - parsed) < timedelta(minutes=1)


def test_package_versions() -> None:
    import torch

    versions = prov.package_versions()
    assert set(prov.TRACKED_PACKAGES) <= set(versions)
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["shoe_lora_pipeline"]
    assert prov.package_versions(("surely-not-an-installed-package",)) == {
        "surely-not-an-installed-package": None
    }


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_info_commit_and_dirty(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    assert prov.git_info(tmp_path)["commit"] is None  # repository without commits
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    info = prov.git_info(tmp_path)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    (tmp_path / "untracked.txt").write_text("outputs do not make a checkout dirty")
    assert prov.git_info(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert prov.git_info(tmp_path)["dirty"] is True


def test_git_info_tolerates_no_repository_and_no_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "not_a_repo"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # do not find a repository further up
    assert prov.git_info(plain) == {"commit": None, "dirty": None, "repo": None}
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no git binary at all
    assert prov.git_info(plain)["commit"] is None
    assert prov.git_info(tmp_path / "does-not-exist")["commit"] is None


def test_collect_provenance_prefers_checkpoint_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {
        "global_step": 500,
        "training_hash": "th-ckpt",
        "dataset_fingerprint": "fp",
        "base_model": {"base_model": "org/model", "revision": "abc123", "fingerprint": "f00d", "path": "/x"},
    }
    record = prov.collect_provenance(
        dagster_run_id="run-42", training_state=state, dataset_manifest_hash="mh", extra={"note": "n"}
    )
    assert record["dagster_run_id"] == "run-42" and record["checkpoint_step"] == 500
    assert record["base_model"] == "org/model" and record["base_model_revision"] == "abc123"
    assert record["base_model_fingerprint"] == "f00d" and record["training_hash"] == "th-ckpt"
    assert record["dataset_manifest_hash"] == "mh" and record["note"] == "n"
    assert record["schema"] == prov.PROVENANCE_SCHEMA
    assert set(record["package_versions"]) == set(prov.TRACKED_PACKAGES)
    assert {"git_commit", "git_dirty", "python_version", "platform", "created_at"} <= set(record)
    assert "/x" not in json.dumps(record)  # no local paths: the record is published with the model
    json.dumps(record)  # serialisable as is


def test_collect_provenance_from_config(tmp_path: Path) -> None:
    from shoe_lora_pipeline.core.config import PipelineConfig

    cfg = PipelineConfig(
        dataset={"raw_dir": tmp_path, "output_dir": tmp_path / "d"},
        training={"output_dir": tmp_path / "t", "base_model": "tiny-sd"},
    )
    record = prov.collect_provenance(config=cfg)
    assert record["config_hash"] == cfg.config_hash() and record["training_hash"] == cfg.training_hash()
    assert record["base_model"] == "tiny-sd" and record["dataset_name"] == "casual_shoes"
    assert record["checkpoint_step"] is None and record["dagster_run_id"] is None
