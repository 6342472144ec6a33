import pytest
import torch

from shoe_lora_pipeline.core.device import DeviceError, choose_device


@pytest.mark.parametrize(
    ("mps", "cuda", "expected"),
    [(True, True, "mps"), (True, False, "mps"), (False, True, "cuda"), (False, False, "cpu")],
)
def test_auto_prefers_mps_then_cuda_then_cpu(mps: bool, cuda: bool, expected: str) -> None:
    info = choose_device("auto", mps_available=mps, cuda_available=cuda)
    assert info.type == expected
    assert info.torch_device == torch.device(expected)


def test_mps_is_always_fp32() -> None:
    info = choose_device("auto", "fp16", mps_available=True, cuda_available=False)
    assert info.mixed_precision == "no"
    assert info.weight_dtype == torch.float32
    assert "fp32" in info.dtype_policy and "ignored" in info.dtype_policy


@pytest.mark.parametrize(
    ("mp", "dtype"), [("no", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_cuda_mixed_precision_only_when_asked(mp: str, dtype: torch.dtype) -> None:
    info = choose_device("cuda", mp, mps_available=False, cuda_available=True)
    assert info.mixed_precision == mp
    assert info.weight_dtype == dtype
    if mp != "no":
        assert "LoRA parameters and optimizer state fp32" in info.dtype_policy


def test_cpu_ignores_mixed_precision() -> None:
    info = choose_device("cpu", "bf16", mps_available=False, cuda_available=False)
    assert info.mixed_precision == "no" and "CUDA only" in info.dtype_policy


def test_unavailable_explicit_device_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="device = 'cuda'"):
        choose_device("cuda", mps_available=False, cuda_available=False)
    with pytest.raises(DeviceError, match="device = 'mps'"):
        choose_device("mps", mps_available=False, cuda_available=True)
    with pytest.raises(DeviceError, match="tpu"):
        choose_device("tpu")


def test_metadata_records_choice() -> None:
    meta = choose_device("auto", mps_available=False, cuda_available=False).as_metadata()
    assert meta["type"] == "cpu" and meta["requested"] == "auto" and meta["name"]
