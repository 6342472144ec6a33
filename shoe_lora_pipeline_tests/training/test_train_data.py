"""What each training sample sees: the sample stream, the per-sample draws and how a step is cut up."""

from __future__ import annotations

import pytest
import torch

from shoe_lora_pipeline.core.train_data import NoiseSettings, SampleStream, StepPlan, draw_samples

SHAPE = (4, 8, 8)


def plan(micro: int, rank: int = 0, world: int = 1, settings: NoiseSettings | None = None) -> StepPlan:
    return StepPlan(
        SampleStream(num_items=7, seed=3),
        effective_batch=8,
        micro_batch=micro,
        rank=rank,
        world_size=world,
        seed=3,
        latent_shape=SHAPE,
        num_train_timesteps=1000,
        settings=settings or NoiseSettings(),
        device=torch.device("cpu"),
    )


def step_samples(plans: list[StepPlan], step: int) -> dict[str, torch.Tensor | list[int]]:
    """A step's samples gathered from every micro-batch of every process, in position order."""
    batches = sorted((b for p in plans for b in p.micro_batches(step)), key=lambda b: b.positions[0])
    return {
        "positions": [j for b in batches for j in b.positions],
        "items": [i for b in batches for i in b.items],
        "eps": torch.cat([b.eps for b in batches]),
        "noise": torch.cat([b.noise for b in batches]),
        "timesteps": torch.cat([b.timesteps for b in batches]),
    }


def test_every_epoch_is_a_fresh_permutation_and_steps_cross_epoch_boundaries():
    stream = SampleStream(num_items=7, seed=3)
    items = [stream.item(p) for p in range(21)]
    for epoch in range(3):
        assert sorted(i for e, i in items if e == epoch) == list(range(7))
    assert stream.permutation(0) != stream.permutation(1)
    assert SampleStream(7, 3).permutation(2) == stream.permutation(2)  # a function of (seed, epoch) alone
    # step 0 takes positions 0-7: all of epoch 0 and the first sample of epoch 1 (a full batch every step)
    assert [b.epoch for b in plan(4).micro_batches(0)] == [0, 0]
    assert step_samples([plan(8)], 0)["items"][7] == stream.permutation(1)[0]


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_see_the_same_samples_and_draws_as_one_batch(micro):
    whole = step_samples([plan(8)], step=5)
    cut = step_samples([plan(micro)], step=5)
    assert cut["positions"] == whole["positions"] == list(range(8))
    assert cut["items"] == whole["items"]
    for key in ("eps", "noise", "timesteps"):
        assert torch.equal(cut[key], whole[key]), key
    assert len(plan(micro).micro_batches(5)) == plan(micro).accumulation_steps == 8 // micro


def test_processes_hold_disjoint_shares_that_add_up_to_the_step():
    whole = step_samples([plan(8)], step=2)
    ranks = [plan(2, rank=r, world=4) for r in range(4)]
    shares = [[j for b in p.micro_batches(2) for j in b.positions] for p in ranks]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]
    spread = step_samples(ranks, step=2)
    assert spread["items"] == whole["items"]
    assert torch.equal(spread["noise"], whole["noise"]) and torch.equal(spread["eps"], whole["eps"])


def test_step_plan_refuses_a_micro_batch_that_does_not_divide_the_share():
    with pytest.raises(ValueError, match="micro-batch 3 does not divide the per-process batch 8"):
        plan(3)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        plan(1, world=3)


def test_each_noise_option_changes_only_its_own_draw():
    base = draw_samples(1, 4, [0, 1, 2], SHAPE, 1000, NoiseSettings())
    offset = draw_samples(1, 4, [0, 1, 2], SHAPE, 1000, NoiseSettings(noise_offset=0.1))
    perturbed = draw_samples(1, 4, [0, 1, 2], SHAPE, 1000, NoiseSettings(input_perturbation=0.1))
    dropped = draw_samples(1, 4, [0, 1, 2], SHAPE, 1000, NoiseSettings(caption_dropout=1.0))

    for other in (offset, perturbed, dropped):
        assert torch.equal(other["eps"], base["eps"]) and torch.equal(other["timesteps"], base["timesteps"])
    # noise offset: a per-(sample, channel) constant added to the noise, nothing else
    shift = offset["noise"] - base["noise"]
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0
    assert torch.equal(offset["noisy_input_noise"], offset["noise"])
    # input perturbation: the target noise is unchanged, only the noise added to the latents moves
    assert torch.equal(perturbed["noise"], base["noise"])
    assert not torch.equal(perturbed["noisy_input_noise"], perturbed["noise"])
    assert not base["drop_caption"].any() and dropped["drop_caption"].all()


def test_caption_dropout_rate_follows_its_probability():
    drops = draw_samples(0, 0, list(range(2000)), (1, 1, 1), 1000, NoiseSettings(caption_dropout=0.2))
    assert 0.17 < drops["drop_caption"].float().mean().item() < 0.23
