"""Training as its own process: 2 data-parallel processes on the CPU (gloo) through ``accelerate launch``,
Dagster Pipes, faults (SIGKILL of the launcher, SIGINT, a dying rank), resume across process counts and
``dg launch``.

The runs with several processes are slow to start (every process imports torch and diffusers), so one
2-process run through ``dg.materialize`` is shared by the tests that read it, and the fault sequence is one
test: kill → interrupt → resume, each from the previous one's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest
import torch
import yaml

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.assets.lora_training import training_metadata
from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.distributed import Ranks
from shoe_lora_pipeline.core.launch import TrainArgs, accelerate_command
from shoe_lora_pipeline.core.run_artifacts import StepClock, read_losses_csv
from shoe_lora_pipeline.core.training import PendingStep, TrainingError, settle
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.dagster_server import dg_command
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT
from shoe_lora_pipeline_tests.support.training import (
    RESUME_SETTINGS,
    assert_same_lora,
    cpu,
    lora_tensors,
    make_cfg,
    relative_difference,
)

pytestmark = pytest.mark.slow

TWO_PROCESSES = ["training.launcher=accelerate", "training.num_processes=2"]


def shared_data_config(root: Path, dataset: dict[str, Any]) -> tuple[PipelineConfig, Path]:
    """The resume tests' settings on the shared train set, in a config file; the latent cache copied into
    the training folder (where the layout has it)."""
    cfg = make_cfg(root, **RESUME_SETTINGS)
    cfg.dataset.output_dir = dataset["root"]  # its train/ split
    shutil.copytree(dataset["latents"], cfg.training.output_dir / "latent_cache")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, path


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path, dataset: dict[str, Any]):
    """8 steps with 2 processes (the global batch of the 1-process runs), launched by the asset."""
    root = tmp_path_factory.mktemp("two-processes")
    cfg, path = shared_data_config(root, dataset)
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(path), overrides=TWO_PROCESSES),
        "device": DeviceResource(device="cpu"),
        "base_model": BaseModelResource(cache_dir=str(tiny_sd_cache)),
    }
    result = dg.materialize(category_assets("casual_shoes", ["lora_training"]), resources=resources)
    assert result.success
    out = cfg.training.output_dir
    return {
        "cfg": cfg,
        "config_path": path,
        "metadata": result.get_asset_materialization_events()[0].materialization.metadata,
        "lora": lora_tensors(out / "checkpoints" / "checkpoint-8"),
        "checkpoint_6": lora_tensors(out / "checkpoints" / "checkpoint-6"),
        "out": out,
    }


def test_two_processes_train_the_lora_of_one(two_process_run, uninterrupted_run):
    # Same global batch (2 × 2 = 4 images per step), split 2 + 2 over the processes: same samples, same noise.
    assert relative_difference(two_process_run["lora"], uninterrupted_run["lora"]) <= 1e-4
    out = two_process_run["out"]
    losses = read_losses_csv(out / "losses.csv")
    assert [r["step"] for r in losses] == list(range(1, 9))  # rank 0 alone writes it: one row per step
    assert [r["loss"] for r in losses] == pytest.approx(
        [r["loss"] for r in uninterrupted_run["losses"]], rel=1e-5
    )
    state = json.loads((out / "checkpoints" / "checkpoint-8" / ckpt.STATE_NAME).read_text())
    assert (state["num_processes"], state["micro_batch_size"]) == (2, 2)
    files = {p.name for p in (out / "checkpoints" / "checkpoint-8").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", ckpt.LORA_WEIGHTS_NAME, "optimizer.bin"} <= files
    assert "micro-batch 2 × 1 accumulation × 2 process(es)" in (out / "training_log_full.txt").read_text()
    rank1 = (out / "logs" / "rank1_training_log.txt").read_text()
    assert "train_lora start" in rank1 and "saved checkpoint-8" in rank1
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_accelerate_launcher_reports_what_the_in_process_asset_reports(
    two_process_run, uninterrupted_run, tiny_sd_cache
):
    meta = two_process_run["metadata"]
    cfg = two_process_run["cfg"]
    identity = BaseModelResource(cache_dir=str(tiny_sd_cache)).identity(cfg)
    in_process = training_metadata(cfg, cpu(), identity, uninterrupted_run["result"])
    assert set(meta) ^ set(in_process) == set()  # the same keys
    assert meta["num_processes"].value == 2 and meta["launcher"].value == "accelerate"
    assert meta["global_step"].value == 8
    assert "data:image/png;base64," in meta["loss_curve"].value
    assert meta["checkpoint_dir"].value.endswith("checkpoint-8")
    assert meta["base_model_revision"].value == identity["revision"]


# ----------------------------------------------------------------------------------------------
# faults
# ----------------------------------------------------------------------------------------------


class PeerRanks(Ranks):
    """Rank 0 of 2, whose peer's step losses are given (what the gather would bring)."""

    def __init__(self, peer: list[float]) -> None:
        super().__init__(0, 2)
        self.peer = torch.tensor(peer, dtype=torch.float64)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([tensor, self.peer])


def pending(step: int, micro: list[float]) -> PendingStep:
    return PendingStep(step, 1, 1e-3, torch.tensor(micro), torch.tensor(0.5), [])


def test_logged_loss_is_the_mean_over_processes_and_a_peer_nan_stops_every_rank():
    source = type("Source", (), {"image_files": []})()
    rows = settle(
        [pending(1, [0.25, 0.5]), pending(2, [1.0, 0.0])], StepClock(), source, str, PeerRanks([1.25, 3.0])
    )
    assert [r["loss"] for r in rows] == [1.0, 2.0]  # (0.75 + 1.25) / 2, (1 + 3) / 2
    # Rank 0's own numbers are finite, its peer's are not: rank 0 raises too, at the same point (no wait).
    with pytest.raises(TrainingError, match="non-finite loss at optimizer step 2 on process 1"):
        settle(
            [pending(1, [0.1]), pending(2, [0.1])], StepClock(), source, str, PeerRanks([0.2, float("nan")])
        )


def launch(config_path: Path, cache: Path, fault: dict[str, Any]) -> subprocess.Popen:
    """``accelerate launch`` of the fault-injecting entry point with 2 processes."""
    args = TrainArgs(str(config_path), "casual_shoes", base_model_cache=str(cache))
    command = accelerate_command(2, args, module="shoe_lora_pipeline_tests.support.faulty_train")
    env = {**os.environ, "SHOE_LORA_TEST_FAULT": json.dumps(fault)}
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for(marker: Path, launcher: subprocess.Popen, timeout: float = 240) -> list[psutil.Process]:
    """Wait until the fault's marker file appears; returns the launcher's processes (itself included)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            pytest.fail(f"the run never reached the fault: {launcher.communicate()[1].decode()[-3000:]}")
        time.sleep(0.1)
    parent = psutil.Process(launcher.pid)
    return [parent, *parent.children(recursive=True)]


def assert_all_end(processes: list[psutil.Process], within: float = 60) -> None:
    """Every process ends by itself (else it is killed here, and the test fails)."""
    _, alive = psutil.wait_procs(processes, timeout=within)
    for p in alive:
        p.kill()
    assert not alive, f"left running: {[(p.pid, p.cmdline()[-6:]) for p in alive]}"


def test_kill_interrupt_and_resume_over_two_processes(tmp_path, tiny_sd_cache, dataset, two_process_run):
    cfg, path = shared_data_config(tmp_path, dataset)
    out = cfg.training.output_dir
    root = out / "checkpoints"

    # 1. SIGKILL of the launcher after checkpoint-4: nothing can clean up, yet no process is left behind.
    launcher = launch(path, tiny_sd_cache, {"kind": "hang", "step": 4, "marker": str(tmp_path / "at4")})
    processes = wait_for(tmp_path / "at4", launcher)
    assert len(processes) == 3  # the launcher and its 2 training processes
    launcher.kill()
    assert_all_end(processes)
    launcher.stderr.close()
    assert [c.step for c in ckpt.list_checkpoints(root)] == [2, 4]

    # 2. SIGINT (what cancelling a Dagster run sends): every rank stops before the same step, the newest
    #    complete checkpoint stays, no checkpoint is half-written.
    launcher = launch(path, tiny_sd_cache, {"kind": "pause", "step": 6, "marker": str(tmp_path / "at6")})
    processes = wait_for(tmp_path / "at6", launcher)
    launcher.send_signal(signal.SIGINT)
    assert_all_end(processes)
    assert launcher.returncode != 0
    launcher.stderr.close()
    assert [c.step for c in ckpt.list_checkpoints(root)] == [2, 4, 6]
    assert not list(root.glob(".tmp-*"))
    log = (out / "training_log_full.txt").read_text()
    assert "resumed from checkpoint-4" in log
    assert "stopped: KeyboardInterrupt: SIGINT: every process stops before step 7" in log
    assert "every process stops before step 7" in (out / "logs" / "rank1_training_log.txt").read_text()

    # The resumed processes continued the interrupted run bit for bit (same process count, same machine).
    assert_same_lora(lora_tensors(root / "checkpoint-6"), two_process_run["checkpoint_6"])

    # 3. `dg launch` with a run config, one process this time: it resumes from checkpoint-6,
    #    says that the process count changed, and ends with the LoRA of the 2-process run that was never
    #    interrupted (the same maths in another float summation order).
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_config = tmp_path / "run.yaml"
    overrides = ["training.launcher=accelerate", "training.num_processes=1"]
    resources = {
        "pipeline_config": {"config": {"overrides": overrides}},
        "device": {"config": {"device": "cpu"}},
        "base_model": {"config": {"cache_dir": str(tiny_sd_cache)}},
    }
    run_config.write_text(yaml.safe_dump({"resources": resources}))
    env = {**os.environ, "SHOE_LORA_CONFIG": str(path), "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        dg_command("launch", "--assets", "lora_training", "-c", str(run_config)),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert relative_difference(lora_tensors(root / "checkpoint-8"), two_process_run["lora"]) <= 1e-4
    log = (out / "training_log_full.txt").read_text()
    assert "checkpoint-6 was trained with num_processes 2, this run uses 1" in log
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("lora_training"))
    meta = event.asset_materialization.metadata
    assert (meta["resumed_from_step"].value, meta["num_processes"].value) == (6, 1)
    assert meta["launcher"].value == "accelerate"


def test_a_dying_rank_ends_every_rank(tmp_path):
    marker = tmp_path / "died"
    command = accelerate_command(2, TrainArgs("", ""), module="shoe_lora_pipeline_tests.support.rank_dies")
    command = [*command[: command.index("shoe_lora_pipeline_tests.support.rank_dies") + 1], str(marker)]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes = wait_for(marker, launcher)
    # Rank 0 waits in a collective for a peer that is gone: the launcher ends it, and itself, at once.
    assert_all_end(processes)
    assert launcher.returncode != 0
    launcher.stderr.close()
