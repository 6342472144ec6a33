"""LR schedule: linear warmup then cosine, stepped once per optimizer step (not per micro-batch)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.optimization import get_scheduler

from shoe_lora_pipeline.core.run_artifacts import read_losses_csv
from shoe_lora_pipeline_tests.support.training import make_cfg, run_training


def expected_lr(base: float, done_steps: int, warmup: int, total: int) -> float:
    """The recipe: base * t/warmup during warmup, then base * 0.5 * (1 + cos(pi * progress))."""
    if done_steps < warmup:
        return base * done_steps / warmup
    progress = (done_steps - warmup) / (total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def test_recipe_schedule_500_warmup_3000_steps():
    base, warmup, total = 1e-4, 500, 3000
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=warmup, num_training_steps=total)
    seen = {}
    for t in range(total + 1):
        seen[t] = opt.param_groups[0]["lr"]  # the rate the (t+1)-th optimizer step would use
        opt.step()
        sched.step()
    for t in (0, 1, 250, 499, 500, 501, 1000, 1750, 2500, 2999, 3000):
        assert seen[t] == pytest.approx(expected_lr(base, t, warmup, total), rel=1e-12, abs=1e-18), t
    assert seen[250] == pytest.approx(0.5 * base)
    assert seen[500] == pytest.approx(base)
    assert seen[1750] == pytest.approx(0.5 * base)
    assert seen[3000] == pytest.approx(0.0, abs=1e-18)


def test_training_loop_steps_the_schedule_once_per_optimizer_step(tmp_path, load_components, dataset):
    # accumulation 3: if the schedule stepped per micro-batch it would run 3x too fast
    cfg = make_cfg(
        tmp_path, max_train_steps=6, lr_warmup_steps=2, gradient_accumulation_steps=3, checkpointing_steps=100
    )
    run_training(cfg, load_components(), dataset)
    rows = read_losses_csv(cfg.training.output_dir / "losses.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        # losses.csv records the optimizer's lr for that step: the schedule after step-1 completed steps
        assert r["lr"] == pytest.approx(expected_lr(1e-3, r["step"] - 1, 2, 6), rel=1e-9, abs=1e-15), r
