"""What each training sample sees: which image, which noise, which timestep — as pure functions of the step.

The maths of an optimizer step must not depend on how its samples are cut into micro-batches or spread
over processes. So every sample of the run has a *position*: optimizer step ``s`` (0-based) covers the
global positions ``s·B … s·B + B − 1`` of an endless stream of epochs (``B`` = the effective batch,
``train_batch_size × gradient_accumulation_steps``), and

* the image at a position comes from that epoch's seeded permutation (:class:`SampleStream`), and
* its random draws (VAE latent sample, noise, timestep, caption-dropout coin, noise offset, input
  perturbation) come from a CPU generator keyed by ``(seed, step, position within the step)``
  (:func:`draw_samples`).

Micro-batches of 1, 2, 4 or 16 images, and N processes each holding ``B / N`` of the positions, therefore
feed the UNet the same samples with the same noise; only the float summation order of the gradient differs.
Resume needs no RNG state: the step number is the whole position.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.fsutil import file_sha256
from shoe_lora_pipeline.core.latents import (
    encode_images,
    encode_text,
    load_image_tensor,
    load_latent_dataset,
    size_time_ids,
)

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.models import SDComponents


def derived_seed(seed: int, *parts: object) -> int:
    """An independent 63-bit seed per purpose ("sampler", "sample", epoch, step…) from the configured seed."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------
# which image each position sees
# ----------------------------------------------------------------------------------------------


class SampleStream:
    """The endless sequence of train items: epoch ``e`` is a permutation seeded by (seed, "sampler", e).

    Global position ``p`` reads item ``permutation(p // n)[p % n]``; an optimizer step that crosses an epoch
    boundary simply takes its last samples from the next epoch, so every step has the full effective batch.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError("cannot sample from an empty train set")
        self.num_items = num_items
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            if len(self._cache) > 2:  # a step spans at most two epochs
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(derived_seed(self.seed, "sampler", epoch))
            self._cache[epoch] = torch.randperm(self.num_items, generator=g).tolist()
        return self._cache[epoch]

    def item(self, position: int) -> tuple[int, int]:
        """(epoch, item index) at a global sample position."""
        epoch, offset = divmod(position, self.num_items)
        return epoch, self.permutation(epoch)[offset]

    def epoch_at_step(self, step: int, batch: int) -> int:
        """0-based epoch of the first sample of optimizer step ``step`` (0-based)."""
        return step * batch // self.num_items

    def epochs_for(self, steps: int, batch: int) -> int:
        return math.ceil(steps * batch / self.num_items)


# ----------------------------------------------------------------------------------------------
# the random draws of each sample
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSettings:
    """The per-sample noise options of the training objective (all off in the recipe)."""

    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    caption_dropout: float = 0.0


@dataclass
class MicroBatch:
    """One micro-batch: which positions of the step, which items, and their random draws (on ``device``)."""

    step: int  # 0-based optimizer step
    positions: list[int]  # within the step's effective batch
    items: list[int]  # train item indices
    epoch: int  # 0-based epoch of the first sample
    eps: torch.Tensor  # [b, C, h, w] standard normal: latent = mean + std * eps
    noise: torch.Tensor  # [b, C, h, w] the noise the UNet learns to predict (offset included)
    noisy_input_noise: torch.Tensor  # the noise added to the latents (= noise + input perturbation)
    timesteps: torch.Tensor  # [b] int64
    drop_caption: torch.Tensor  # [b] bool: train this sample with the empty caption

    def __len__(self) -> int:
        return len(self.positions)


def draw_samples(
    seed: int,
    step: int,
    positions: list[int],
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    settings: NoiseSettings,
) -> dict[str, torch.Tensor]:
    """The draws of each position of an optimizer step, on the CPU, from a generator keyed by
    (seed, step, position). Draw order per sample is fixed: eps, noise, timestep, dropout coin, offset, and
    the input perturbation last and only when enabled — so switching one option on changes no other draw.
    """
    eps, noise, steps, coins, offsets, perturb = [], [], [], [], [], []
    channels = latent_shape[0]
    for j in positions:
        g = torch.Generator().manual_seed(derived_seed(seed, "sample", step, j))
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        coins.append(torch.rand((1,), generator=g))
        offsets.append(torch.randn((channels, 1, 1), generator=g))
        if settings.input_perturbation:
            perturb.append(torch.randn(latent_shape, generator=g))
    out = {
        "eps": torch.stack(eps),
        "noise": torch.stack(noise),
        "timesteps": torch.cat(steps),
        "drop_caption": torch.cat(coins) < settings.caption_dropout,
    }
    if settings.noise_offset:
        # Offset noise (a per-channel constant) lets the model shift an image's mean brightness: zero-mean
        # noise never teaches it the pure-white backgrounds of product photos.
        out["noise"] = out["noise"] + settings.noise_offset * torch.stack(offsets)
    out["noisy_input_noise"] = out["noise"]
    if settings.input_perturbation:
        out["noisy_input_noise"] = out["noise"] + settings.input_perturbation * torch.stack(perturb)
    return out


class StepPlan:
    """How one process walks the positions of each optimizer step: its share of the effective batch
    (rank ``r`` of ``N`` holds positions ``r·B/N … (r+1)·B/N − 1``) cut into micro-batches."""

    def __init__(
        self,
        stream: SampleStream,
        effective_batch: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int,
        latent_shape: tuple[int, ...],
        num_train_timesteps: int,
        settings: NoiseSettings,
        device: torch.device,
    ) -> None:
        if effective_batch % world_size:
            raise ValueError(f"effective batch {effective_batch} is not divisible by {world_size} processes")
        self.local_batch = effective_batch // world_size
        if micro_batch < 1 or self.local_batch % micro_batch:
            raise ValueError(
                f"micro-batch {micro_batch} does not divide the per-process batch {self.local_batch} "
                f"(effective batch {effective_batch} over {world_size} process(es))"
            )
        self.stream, self.effective_batch, self.micro_batch = stream, effective_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.latent_shape, self.num_train_timesteps = seed, latent_shape, num_train_timesteps
        self.settings, self.device = settings, device

    @property
    def accumulation_steps(self) -> int:
        return self.local_batch // self.micro_batch

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """The micro-batches this process runs for optimizer step ``step`` (0-based)."""
        first = self.rank * self.local_batch
        out = []
        for start in range(first, first + self.local_batch, self.micro_batch):
            positions = list(range(start, start + self.micro_batch))
            drawn = [self.stream.item(step * self.effective_batch + j) for j in positions]
            draws = draw_samples(
                self.seed, step, positions, self.latent_shape, self.num_train_timesteps, self.settings
            )
            on = {k: v.to(self.device, non_blocking=True) for k, v in draws.items()}
            out.append(
                MicroBatch(
                    step=step,
                    positions=positions,
                    items=[i for _, i in drawn],
                    epoch=drawn[0][0],
                    eps=on["eps"],
                    noise=on["noise"],
                    noisy_input_noise=on["noisy_input_noise"],
                    timesteps=on["timesteps"],
                    drop_caption=on["drop_caption"],
                )
            )
        return out


# ----------------------------------------------------------------------------------------------
# the data: cached latents (optionally resident on the device) or on-the-fly encoding
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceBatch:
    """What a source gives for some train items: the VAE latent distribution and the UNet's conditions."""

    mean: torch.Tensor  # [b, C, h, w] unscaled
    std: torch.Tensor
    text: torch.Tensor  # [b, 77, D] hidden states the UNet cross-attends to
    pooled: torch.Tensor | None = None  # [b, P] SDXL: pooled text embedding (added condition)
    time_ids: torch.Tensor | None = None  # [b, 6] SDXL: original size, crop top-left, target size


def size_conditioning(
    metadata: list[dict[str, object]], resolution: int, resize_policy: str, device: torch.device
) -> torch.Tensor:
    """SDXL ``time_ids`` [N, 6] of a split's images, from their captions.json metadata (float32)."""
    rows = [size_time_ids(m, resolution, resize_policy) for m in metadata]  # type: ignore[arg-type]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class CachedSource:
    """Items from the latent cache, loaded once; on an accelerator the whole cache can live on the device
    (``on_device``) so no host-to-device copy or DataLoader sits in the loop."""

    def __init__(
        self,
        latents_dir: Path,
        split_dir: Path,
        base_fingerprint: str,
        resolution: int,
        device: torch.device,
        *,
        on_device: bool = False,
        resize_policy: str = "pad",
    ) -> None:
        ds = load_latent_dataset(
            latents_dir, split_dir, base_fingerprint=base_fingerprint, resolution=resolution
        )
        self.image_files, self.device = ds.image_files, device
        home = device if on_device else torch.device("cpu")
        self.mean, self.std, self.text = (t.to(home) for t in (ds.mean, ds.std, ds.text_embeddings))
        # SDXL caches hold the pooled embedding; the size conditioning comes from captions.json.
        self.pooled = self.time_ids = None
        if ds.pooled_embeddings is not None:
            self.pooled = ds.pooled_embeddings.to(home)
            self.time_ids = size_conditioning(ds.metadata, resolution, resize_policy, home)

    def __len__(self) -> int:
        return len(self.image_files)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def get(self, indices: list[int]) -> SourceBatch:
        idx = torch.tensor(indices, device=self.mean.device)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx].to(self.device, non_blocking=True)

        return SourceBatch(
            self.mean[idx].to(self.device, non_blocking=True),
            self.std[idx].to(self.device, non_blocking=True),
            self.text[idx].to(self.device, non_blocking=True),
            take(self.pooled),
            take(self.time_ids),
        )


class OnTheFlySource:
    """Encodes each micro-batch with the frozen VAE and text encoder(s) (``training.cache_latents: false``)."""

    def __init__(
        self,
        components: SDComponents,
        split_dir: Path,
        resolution: int,
        device: torch.device,
        resize_policy: str = "pad",
    ):
        entries = read_captions_json(split_dir / "captions.json")
        self.image_files = [e["image_file"] for e in entries]
        self.captions = [e["caption"] for e in entries]
        self.paths = [split_dir / "images" / f for f in self.image_files]
        self.components, self.resolution, self.device = components, resolution, device
        self.time_ids = None
        if components.family.uses_added_conditions:
            self.time_ids = size_conditioning([e["metadata"] for e in entries], resolution, resize_policy, device)

    def __len__(self) -> int:
        return len(self.image_files)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        factor = self.components.vae_scale_factor
        side = self.resolution // factor
        return (int(self.components.vae.config.latent_channels), side, side)

    def get(self, indices: list[int]) -> SourceBatch:
        pixels = torch.stack([load_image_tensor(self.paths[i], self.resolution) for i in indices])
        mean, std = encode_images(self.components.vae, pixels)
        text, pooled = encode_text(self.components, [self.captions[i] for i in indices])
        time_ids = None if self.time_ids is None else self.time_ids[torch.tensor(indices, device=self.device)]
        return SourceBatch(mean, std, text, pooled, time_ids)


Source = CachedSource | OnTheFlySource


def dataset_fingerprint(train_dir: Path) -> str:
    """Content fingerprint of a train folder: captions.json bytes plus every listed image's sha256."""
    train_dir = Path(train_dir)
    h = hashlib.sha256((train_dir / "captions.json").read_bytes())
    for e in read_captions_json(train_dir / "captions.json"):
        h.update(
            e["image_file"].encode() + b"\0" + file_sha256(train_dir / "images" / e["image_file"]).encode()
        )
    return h.hexdigest()
