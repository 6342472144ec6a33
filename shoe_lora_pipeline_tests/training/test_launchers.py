"""Where training runs: the launcher settings, the commands, the Kubernetes pod spec, the GPU leases and
the ``gpu`` pool's limit. Fast: nothing here trains (the runs are in test_scale_out.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.assets.lora_training import gpu_pool_note, train_with_accelerate
from shoe_lora_pipeline.core.config import ConfigError, load_config
from shoe_lora_pipeline.core.device import choose_device
from shoe_lora_pipeline.core.gpu_slots import NoFreeGpuError, lease_gpus, visible_gpus
from shoe_lora_pipeline.core.launch import (
    ACCELERATE_MODULE,
    TRAIN_MODULE,
    TrainArgs,
    accelerate_command,
    data_mount_path,
    k8s_pod,
    resolve_num_processes,
)
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline.train import parse_args, pipes_metadata
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

K8S = [
    "training.launcher=k8s",
    "training.num_processes=2",
    "training.k8s.image=registry.example/shoe-lora:1",
    "training.k8s.volume_claim=shoe-data",
    "training.k8s.namespace=ml",
    "training.k8s.node_selector={gpu: h100}",
    "training.k8s.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
]


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "raw").mkdir(exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "dataset: {name: casual_shoes, raw_dir: raw, output_dir: data/out}\n"
        "training: {output_dir: data/out/lora, train_batch_size: 2, gradient_accumulation_steps: 4}\n"
    )
    return path


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


def test_where_training_runs_is_not_part_of_the_training_hash(tmp_path):
    path = write_config(tmp_path)
    base = load_config(path)
    moved = load_config(path, overrides=K8S)
    assert moved.training_hash() == base.training_hash()  # switching launcher keeps the checkpoints
    assert load_config(path, overrides=["automation.gpu_slots=4"]).training_hash() == base.training_hash()
    assert load_config(path, overrides=["training.max_train_steps=7"]).training_hash() != base.training_hash()
    assert (base.training.launcher, base.training.num_processes, base.automation.gpu_slots) == (
        "inprocess",
        1,
        1,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.num_processes=2"], "needs training.launcher accelerate or k8s"),
        (["training.launcher=accelerate", "training.num_processes=3"], "num_processes 3 must divide"),
        (
            ["training.launcher=accelerate", "training.num_processes=2", "training.micro_batch_size=8"],
            "micro_batch_size 8 must divide the per-process batch 4",
        ),
        (["training.launcher=k8s"], "needs training.k8s.image and training.k8s.volume_claim"),
        ([*K8S, "training.num_processes=auto"], "needs a number for num_processes"),
        (["training.launcher=slurm"], "training.launcher"),
        ([*K8S, "training.k8s.mount_path=data"], "mount_path must be an absolute path"),
        (["automation.gpu_slots=0"], "automation.gpu_slots"),
    ],
)
def test_launcher_settings_are_checked_when_the_config_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path), overrides=overrides)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def test_one_entry_point_for_every_launcher():
    args = TrainArgs("/cfg.yaml", "boots", ("training.max_train_steps=5",), "cuda", "/cache")
    argv = args.argv()
    assert argv == [
        "--config", "/cfg.yaml", "--category", "boots", "--override", "training.max_train_steps=5",
        "--device", "cuda", "--base-model-cache", "/cache",
    ]  # fmt: skip
    parsed = parse_args(argv)
    assert (parsed.config, parsed.category, parsed.override, parsed.device) == (
        "/cfg.yaml",
        "boots",
        ["training.max_train_steps=5"],
        "cuda",
    )
    # one process: the entry point itself; several: accelerate launch (through the wrapper) around it
    assert accelerate_command(1, args, python="py") == ["py", "-m", TRAIN_MODULE, *argv]
    several = accelerate_command(4, args, python="py")
    assert several[:3] == ["py", "-m", ACCELERATE_MODULE]
    assert several[several.index("--num_processes") + 1] == "4" and "--multi_gpu" in several
    assert several[several.index("--main_process_port") + 1] == "0"  # a free port: runs side by side
    assert several[-len(argv) - 2 :] == ["-m", TRAIN_MODULE, *argv]


def test_num_processes_auto_is_one_per_visible_gpu():
    assert resolve_num_processes("auto", "cuda", 8) == 8
    assert resolve_num_processes("auto", "cpu", 0) == 1
    assert resolve_num_processes(2, "cpu", 0) == 2


def test_pipes_carries_the_typed_metadata():
    out = pipes_metadata(
        {"loss": 0.5, "log": dg.MetadataValue.path("/x/log.txt"), "grid": dg.MetadataValue.md("![g](data:)")}
    )
    assert out == {
        "loss": {"raw_value": 0.5, "type": "__infer__"},
        "log": {"raw_value": "/x/log.txt", "type": "path"},
        "grid": {"raw_value": "![g](data:)", "type": "md"},
    }


# ----------------------------------------------------------------------------------------------
# Kubernetes (no cluster here: the spec is checked, and handed to dagster-k8s's own pod builder)
# ----------------------------------------------------------------------------------------------


def test_k8s_pod_spec(tmp_path):
    cfg = load_config(write_config(tmp_path), overrides=K8S)
    args = TrainArgs(str(cfg.source_path), "casual_shoes")
    pod = k8s_pod(cfg, args, 2)
    assert pod.image == "registry.example/shoe-lora:1" and pod.namespace == "ml"
    assert pod.command == accelerate_command(2, args, python="python")
    (container,) = pod.base_pod_spec["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    mount = str(tmp_path / "data" / "out")  # the common folder of dataset.output_dir and training.output_dir
    assert container["volumeMounts"] == [
        {"name": "training-data", "mountPath": mount},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    spec = pod.base_pod_spec
    assert spec["volumes"][0] == {
        "name": "training-data",
        "persistentVolumeClaim": {"claimName": "shoe-data"},
    }
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["restartPolicy"] == "Never"
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod.base_pod_meta["labels"]["shoe-lora/category"] == "casual_shoes"

    # The same pod as dagster-k8s builds it for the cluster: every field has a Kubernetes name and type.
    build_pod_body = pytest.importorskip("dagster_k8s.pipes").build_pod_body
    body = build_pod_body("train-1", pod.image, pod.command, pod.env, pod.base_pod_meta, pod.base_pod_spec)
    (built,) = body.spec.containers
    assert (built.image, built.command) == (pod.image, pod.command)
    assert built.resources.limits == {"nvidia.com/gpu": "2"}
    assert [(m.name, m.mount_path) for m in built.volume_mounts] == [
        ("training-data", mount),
        ("dshm", "/dev/shm"),
    ]
    assert body.spec.volumes[0].persistent_volume_claim.claim_name == "shoe-data"
    assert body.spec.tolerations[0].effect == "NoSchedule" and body.spec.node_selector == {"gpu": "h100"}
    assert {e.name: e.value for e in built.env}["PYTHONUNBUFFERED"] == "1"


def test_k8s_pod_on_the_cpu_asks_for_no_gpu_and_the_volume_must_hold_the_outputs(tmp_path):
    path = write_config(tmp_path)
    cfg = load_config(path, overrides=[*K8S, "device=cpu"])
    assert "resources" not in k8s_pod(cfg, TrainArgs("c", "casual_shoes"), 2).base_pod_spec["containers"][0]
    elsewhere = load_config(path, overrides=[*K8S, "training.k8s.mount_path=/mnt/other"])
    with pytest.raises(ConfigError, match="is not inside training.k8s.mount_path /mnt/other"):
        data_mount_path(elsewhere)


def test_k8s_launcher_hands_the_pod_to_dagster_k8s(tmp_path, monkeypatch):
    dagster_k8s = pytest.importorskip("dagster_k8s")
    calls = []

    class FakePipesK8sClient:
        """Stands in for the cluster: records the call, reports what the pod's entry point would."""

        def run(self, **kwargs):
            calls.append(kwargs)
            completed = type("Completed", (), {})()
            completed.get_materialize_result = lambda: dg.MaterializeResult(metadata={"global_step": 8})
            return completed

    monkeypatch.setattr(dagster_k8s, "PipesK8sClient", FakePipesK8sClient)
    path = write_config(tmp_path)
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(path), overrides=K8S),
        "device": DeviceResource(),
        "base_model": BaseModelResource(cache_dir=str(tmp_path / "cache")),
    }
    result = dg.materialize(category_assets("casual_shoes", ["lora_training"]), resources=resources)
    assert result.success
    (call,) = calls
    assert call["image"] == "registry.example/shoe-lora:1" and call["namespace"] == "ml"
    command = call["command"]
    assert (
        command[: command.index("--config")] == accelerate_command(2, TrainArgs("", ""), python="python")[:-4]
    )
    assert parse_args(command[command.index("--config") :]).override == K8S  # the same config in the pod
    assert call["base_pod_spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    (mat,) = result.get_asset_materialization_events()
    assert mat.materialization.metadata["global_step"].value == 8


# ----------------------------------------------------------------------------------------------
# many categories, many GPUs
# ----------------------------------------------------------------------------------------------


def test_visible_gpus():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, device_count=2) == ["0", "1"]


def test_each_training_gets_free_gpus_until_none_is_left(tmp_path):
    devices = ["0", "1", "2"]
    with lease_gpus(1, devices, tmp_path, "boots") as first, lease_gpus(2, devices, tmp_path) as second:
        assert (first.cuda_visible_devices, second.cuda_visible_devices) == ("0", "1,2")
        with pytest.raises(NoFreeGpuError, match=r"busy: GPU 0 \(pid \d+ boots\), GPU 1 .*dagster instance"):
            lease_gpus(1, devices, tmp_path)
    with lease_gpus(3, devices, tmp_path) as all_three:  # released on exit
        assert all_three.devices == devices


def test_a_gpu_is_free_again_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from shoe_lora_pipeline.core.gpu_slots import lease_gpus; "
            f"lease = lease_gpus(1, ['0'], {str(tmp_path)!r}, 'child'); print('held', flush=True); sys.stdin.read()",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NoFreeGpuError, match=f"pid {holder.pid} child"):
            lease_gpus(1, ["0"], tmp_path)
    finally:
        holder.kill()  # no clean-up code runs: the kernel drops the lock
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    with lease_gpus(1, ["0"], tmp_path) as lease:
        assert lease.devices == ["0"]


def test_gpu_pool_limit_is_compared_with_gpu_slots():
    with dg.instance_for_test() as instance:
        assert "dagster instance concurrency set gpu 2" in gpu_pool_note(instance, 2)
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        assert gpu_pool_note(instance, 2) is None


def test_each_training_child_is_pinned_to_a_free_gpu(tmp_path, monkeypatch):
    launched = []

    class FakePipesSubprocessClient:
        """Records the child's environment and command; checks its GPU stays taken while it runs."""

        def __init__(self, env):
            self.env = env

        def run(self, *, context, command):
            launched.append((self.env, command))
            with pytest.raises(NoFreeGpuError):
                lease_gpus(1, [self.env["CUDA_VISIBLE_DEVICES"]], tmp_path)
            completed = type("Completed", (), {})()
            completed.get_materialize_result = lambda: dg.MaterializeResult()
            return completed

    monkeypatch.setattr(dg, "PipesSubprocessClient", FakePipesSubprocessClient)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = load_config(write_config(tmp_path), overrides=["training.launcher=accelerate"])
    gpu = choose_device("cuda", cuda_available=True)
    context = SimpleNamespace(
        run=SimpleNamespace(run_id="0123456789"),
        asset_key=dg.AssetKey("lora_training"),
        log=logging.getLogger(),
    )
    args = TrainArgs(str(cfg.source_path), "casual_shoes")
    with lease_gpus(1, ["0"], tmp_path, "another category"):  # GPU 0 is busy training another category
        train_with_accelerate(context, cfg, gpu, args, str(tmp_path))
    train_with_accelerate(context, cfg, gpu, args, str(tmp_path))  # released after the first child: GPU 0
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in launched] == ["1", "0"]
    assert launched[0][1] == accelerate_command(1, args)
