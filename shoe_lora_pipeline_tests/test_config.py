from pathlib import Path

import pytest

from shoe_lora_pipeline.core.config import ConfigError, load_config
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "raw").mkdir(exist_ok=True)
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BASE = """
dataset:
  name: casual_shoes
  raw_dir: raw
  output_dir: out
training:
  output_dir: out/lora
"""


def test_shipped_configs_validate() -> None:
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml", check_paths=False)
    assert demo.training.base_model == "tiny-shoes"
    assert demo.dataset.resolution == 128  # the resolution tiny-shoes was pretrained at
    # Only the demo (128 px by necessity) lets a render be resampled more than 6x to a marketplace's size.
    assert demo.publish.max_upscale == 16
    sd15 = load_config(REPO_ROOT / "configs" / "casual_shoes_sd15.yaml", check_paths=False)
    t = sd15.training
    # The reference recipe, exactly.
    assert t.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (t.lora_rank, t.lora_alpha, t.lora_dropout) == (8, 16, 0.0)
    assert t.lora_target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert (t.train_batch_size, t.gradient_accumulation_steps, t.max_train_steps) == (2, 8, 3000)
    assert (t.learning_rate, t.lr_scheduler, t.lr_warmup_steps) == (1e-4, "cosine", 500)
    assert (t.weight_decay, t.gradient_clipping, t.gradient_checkpointing) == (1e-2, 1.0, True)
    assert t.mixed_precision == "no"
    assert (t.validation_steps, t.checkpointing_steps, t.checkpoints_total_limit) == (500, 500, 5)
    assert sd15.dataset.resolution == 512
    assert sd15.publish.max_upscale == 6.0
    assert len(t.validation_prompts) == 4
    assert all(p.startswith("A professional product photo of ") for p in t.validation_prompts)


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path = _write(tmp_path, BASE)
    monkeypatch.chdir("/")
    cfg = load_config(cfg_path)
    assert cfg.dataset.raw_dir == (tmp_path / "raw").resolve()
    assert cfg.training.output_dir == (tmp_path / "out" / "lora").resolve()


def test_env_var_selects_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _write(tmp_path, BASE.replace("casual_shoes", "boots"))
    monkeypatch.setenv("SHOE_LORA_CONFIG", str(cfg_path))
    assert load_config().dataset.name == "boots"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE + "  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert "training.learning_rat" in str(err.value)
    assert "0.1" in str(err.value)
    assert str(cfg_path) in str(err.value)


def test_negative_learning_rate_is_named(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE + "  learning_rate: -0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert "training.learning_rate" in str(err.value)
    assert "-0.001" in str(err.value)


def test_missing_raw_dir_key_and_folder(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE.replace("  raw_dir: raw\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key 'dataset.raw_dir'"):
        load_config(cfg_path)
    cfg_path = _write(tmp_path, BASE.replace("raw_dir: raw", "raw_dir: nowhere"))
    with pytest.raises(ConfigError, match=r"dataset.raw_dir = .*nowhere.*does not exist"):
        load_config(cfg_path)


def test_overrides_are_validated_too(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE)
    cfg = load_config(cfg_path, overrides=["training.max_train_steps=7", "device=cpu"])
    assert cfg.training.max_train_steps == 7 and cfg.device == "cpu"
    with pytest.raises(ConfigError, match="training.max_train_steps"):
        load_config(cfg_path, overrides=["training.max_train_steps=-3"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(cfg_path, overrides=["training.max_train_steps"])


def test_split_fractions_must_sum_to_one(tmp_path: Path) -> None:
    cfg_path = _write(
        tmp_path,
        BASE.replace(
            "  output_dir: out\n", "  output_dir: out\n  splits: {train: 0.9, val: 0.2, test: 0.1}\n", 1
        ),
    )
    with pytest.raises(ConfigError, match="sum to 1.0"):
        load_config(cfg_path)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_training_hash_ignores_cadence_but_not_recipe(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE)
    a = load_config(cfg_path)
    b = load_config(cfg_path, overrides=["training.checkpointing_steps=7", "training.validation_steps=3"])
    c = load_config(cfg_path, overrides=["training.learning_rate=0.5"])
    d = load_config(cfg_path, overrides=["training.max_train_steps=11"])
    assert a.training_hash() == b.training_hash()
    assert a.training_hash() != c.training_hash()
    assert a.training_hash() != d.training_hash()


def test_unquoted_no_for_mixed_precision(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path, BASE + "  mixed_precision: no\n")
    assert load_config(cfg_path).training.mixed_precision == "no"
    assert load_config(cfg_path, overrides=["training.mixed_precision=no"]).training.mixed_precision == "no"
