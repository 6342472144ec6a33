"""``shoe-lora audit PATH``: provenance from any exported file or folder, no Dagster involved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoe_lora_pipeline import cli
from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint

RUN_ID = "0f3c-audit-run"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path) -> dict[str, Path]:
    base_dir = tiny_sd_path(tiny_sd_cache)
    root = tmp_path_factory.mktemp("audit")
    ckpt, _ = make_training_checkpoint(root, base_dir, rank=4, alpha=16, step=12)
    res = lora_io.export_lora(
        ckpt, root / "lora_weights", dataset_name="shoes", provenance={"dagster_run_id": RUN_ID}
    )
    fused = lora_io.fuse_lora_pipeline(base_dir, res.out_dir, root / "final_pipeline")
    return {
        "folder": res.out_dir,
        "kohya": res.kohya_weights,
        "diffusers": res.diffusers_weights,
        "peft": res.peft_weights,
        "peft_config": res.peft_config,
        "card": res.model_card,
        "provenance_json": res.provenance_json,
        "fused": fused,
    }


@pytest.mark.parametrize(
    "which", ["folder", "kohya", "diffusers", "peft", "peft_config", "card", "provenance_json", "fused"]
)
def test_audit_json_for_every_export(
    exported: dict[str, Path], which: str, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["audit", str(exported[which]), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["provenance"]["dagster_run_id"] == RUN_ID
    assert record["provenance"]["checkpoint_step"] == 12
    assert record["provenance"]["base_model"] == "tiny-sd"
    assert record["lora"]["rank"] == 4 and float(record["lora"]["alpha"]) == 16.0
    assert record["lora"]["scale"] == 4.0


def test_audit_table_is_aligned(exported: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["audit", str(exported["kohya"])]) == 0
    out = capsys.readouterr().out
    assert "format" in out and "kohya" in out and RUN_ID in out
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert any(r.split()[:2] == ["alpha", "16"] for r in rows)
    assert any(r.split()[0] == "package_versions.torch" for r in rows)
    # Values start in one column.
    columns = {len(r) - len(r[2:].split(None, 1)[1]) for r in rows if len(r[2:].split(None, 1)) == 2}
    assert len(columns) == 1


def test_audit_subprocess_entry_point(exported: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoe_lora_pipeline.cli", "audit", str(exported["fused"]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["format"] == "fused_pipeline" and record["provenance"]["dagster_run_id"] == RUN_ID


def test_audit_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nothing_here.safetensors"
    assert cli.main(["audit", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_audit_file_without_provenance(tmp_path: Path, tiny_sd_cache: Path) -> None:
    plain = tiny_sd_path(tiny_sd_cache) / "unet" / "diffusion_pytorch_model.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "shoe_lora_pipeline.cli", "audit", str(plain)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert str(plain) in proc.stderr and "no shoe_lora provenance" in proc.stderr
    assert proc.stdout == ""


def test_audit_folder_without_provenance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["audit", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert cli.main(["audit", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_cli_requires_a_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "audit" in cli.SUBCOMMANDS
