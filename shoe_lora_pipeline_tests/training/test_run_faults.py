"""A real ``dg launch`` of ``lora_training`` (multiprocess executor: the step is a child of
the run worker), in its own session, training until stopped:

* while it trains, another run of the same category, on the same instance and on another instance, for the
  training and for the data stage, waits ``automation.category_lock_timeout_s`` and fails naming the
  holder; it writes nothing;
* SIGKILL of the top process only: within 10 s no process of the run is left (the step and its children
  die with it), and the category lock is free again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest
import yaml

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.core import category_lock
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.dagster_cli import materialize_command
from shoe_lora_pipeline_tests.support.dagster_server import running_dagster_dev
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT
from shoe_lora_pipeline_tests.support.training import make_cfg

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300  # imports of dagster, torch and diffusers on 2 busy cores


def endless_training_config(root: Path, dataset: dict[str, Any]) -> Path:
    """A category on a copy of the shared train set and its latents, with more steps than the test waits."""
    cfg = make_cfg(root, max_train_steps=100_000, checkpointing_steps=2, checkpoints_total_limit=2)
    cfg.dataset.output_dir = root / "data"
    cfg.dataset.raw_dir = root / "raw"
    cfg.dataset.raw_dir.mkdir()
    shutil.copytree(dataset["train"], cfg.dataset.output_dir / "train")
    cfg.training.output_dir = root / "data" / "lora"
    shutil.copytree(dataset["latents"], cfg.training.output_dir / "latent_cache")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def attempt(assets: list[str], config: Path, cache: Path, instance: dg.DagsterInstance | None) -> str:
    """Materialise ``assets`` of the category with a 1 s lock wait; the failure's message."""
    resources = {
        "pipeline_config": PipelineConfigResource(
            config_path=str(config), overrides=["automation.category_lock_timeout_s=1"]
        ),
        "device": DeviceResource(device="cpu"),
        "base_model": BaseModelResource(cache_dir=str(cache)),
    }
    result = dg.materialize(
        category_assets("casual_shoes", assets), resources=resources, instance=instance, raise_on_error=False
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    return (
        failure.step_failure_data.error.cause.message
        if failure.step_failure_data.error.cause
        else (failure.step_failure_data.error.message)
    )


def test_a_killed_run_leaves_nothing_and_no_other_run_writes_beside_a_live_one(
    tmp_path, tiny_sd_cache, dataset
):
    config = endless_training_config(tmp_path, dataset)
    out = tmp_path / "data" / "lora"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_config = tmp_path / "run.yaml"
    resources = {
        "device": {"config": {"device": "cpu"}},
        "base_model": {"config": {"cache_dir": str(tiny_sd_cache)}},
    }
    run_config.write_text(yaml.safe_dump({"resources": resources}))
    env = {**os.environ, "SHOE_LORA_CONFIG": str(config), "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    top = subprocess.Popen(
        materialize_command("lora_training", run_config),
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,  # its own session: the test kills the top process only, never the group
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Training has started once its first checkpoint is published (polled; the run goes on training).
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (out / "checkpoints" / "checkpoint-2").is_dir():
            if top.poll() is not None or time.monotonic() > deadline:
                top.kill()
                pytest.fail(f"training never started: {top.communicate()[1].decode()[-4000:]}")
            time.sleep(0.2)
        holder = category_lock.read_holder(tmp_path / "data")
        run_id = holder["run_id"]
        step_pid = holder["pid"]
        assert psutil.Process(step_pid).ppid() == top.pid  # the step: a child of the run worker

        # Another run of this category, on this instance and on another one (an ephemeral instance), for
        # the training and for the data stage: waits, fails naming the live run, writes nothing.
        before = sorted(
            str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*") if "checkpoint" not in str(p)
        )
        with dg.DagsterInstance.from_config(str(home)) as same_instance:
            for assets, instance in ((["lora_training"], same_instance), (["raw_images"], None)):
                message = attempt(assets, config, tiny_sd_cache, instance)
                assert (
                    f"run_id {run_id}, pid {step_pid}" in message
                    and "being written by another run" in message
                )
        after = sorted(
            str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*") if "checkpoint" not in str(p)
        )
        assert after == before  # e.g. no raw/manifest.csv beside the live training
        assert category_lock.held_folders() == []

        # SIGKILL of the top process only: every process of the run ends within 10 s.
        processes = [psutil.Process(top.pid), *psutil.Process(top.pid).children(recursive=True)]
        assert any(p.pid == step_pid for p in processes)
        top.kill()
        _, alive = psutil.wait_procs(processes, timeout=10)
        left = [
            (p.pid, " ".join(p.cmdline()[-4:]))
            for p in alive
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        for p in alive:
            p.kill()
        assert not left, f"left running after the run worker was killed: {left}"
    finally:
        if top.poll() is None:
            top.kill()
        top.wait()
        top.stderr.close()
    # The kernel let go of the dead run's lock: the next run takes it at once.
    category_lock.acquire(tmp_path / "data", "next-run", timeout_s=0)
    category_lock.release_run("next-run")


LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def test_sigkill_of_dagster_dev_leaves_no_step_of_the_run(tmp_path, tiny_sd_cache, dataset):
    """The same under ``dagster dev``: its code server outlives it by design (it lets launched runs
    finish), so the step watches the Dagster processes above it, not only its parent."""
    config = endless_training_config(tmp_path, dataset)
    out = tmp_path / "data" / "lora"
    env = {"SHOE_LORA_CONFIG": str(config), "SHOE_LORA_CACHE": str(tiny_sd_cache), "OMP_NUM_THREADS": "1"}
    with running_dagster_dev(tmp_path, env) as server:
        workspace = server.wait_until_loaded()
        location = workspace["locationEntries"][0]["name"]
        resources = {"device": {"config": {"device": "cpu"}}}
        params = {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": "__repository__",
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": ["lora_training"]}],
            },
            "runConfigData": {"resources": resources},
        }
        launched = server.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (out / "checkpoints" / "checkpoint-2").is_dir():
            if server.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training never started:\n{server.log_tail()}")
            time.sleep(0.2)
        step = psutil.Process(category_lock.read_holder(tmp_path / "data")["pid"])
        run_worker = step.parent()
        server.proc.kill()  # SIGKILL of `dagster dev` only
        _, alive = psutil.wait_procs([step, run_worker], timeout=10)
        left = [(p.pid, " ".join(p.cmdline()[-4:])) for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"left running 10 s after dagster dev was killed: {left}"
