"""Distribution and text-alignment metrics: FID (pytorch-fid), KID, IS and CLIP score (torchmetrics).

Weights policy — nothing is ever downloaded:

* **One Inception file serves FID, KID and IS**: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (the TF 2015-12-05 FID Inception), from ``evaluation.inception_weights`` if set, else the torch hub cache
  (``torch.hub.get_dir()/checkpoints/``). The file's existence is checked first; pytorch-fid's own builder
  (``InceptionV3`` → ``fid_inception_v3``) is then run with its module-level ``load_state_dict_from_url``
  temporarily replaced by a loader of that local file, so the network path cannot be reached and the
  architecture is exactly the library's. The full torchvision Inception that ``fid_inception_v3`` builds
  (``num_classes=1008``) is kept so its ``fc`` gives classifier logits for IS.
  Missing file → every Inception metric is ``unavailable`` with the path looked for.
* Features are extracted **once per image set** (the test split once for both models): FID uses
  pytorch-fid's statistics (mean, ``np.cov(rowvar=False)``, as ``calculate_activation_statistics``) and
  ``calculate_frechet_distance``; KID and IS are torchmetrics' ``KernelInceptionDistance`` /
  ``InceptionScore`` with ``feature=nn.Identity()`` fed those precomputed features / logits (torchmetrics
  documents an ``nn.Module`` returning ``(N, d)`` as a custom extractor). Resizing is pytorch-fid's
  (bilinear to 299, no antialias), so numbers match pytorch-fid, not torchmetrics' default extractor.
* IS uses the "unbiased" logits ``pool3 @ fc.weight.T`` (no bias) over the 1008 TF classes, as the
  original IS code and torch-fidelity's ``logits_unbiased`` (torchmetrics' default) do.
* CLIP score: torchmetrics ``CLIPScore`` with a ``transformers`` ``CLIPModel`` + ``CLIPProcessor`` loaded
  from ``evaluation.clip_model_dir`` with ``local_files_only=True``. torchmetrics 1.9 only accepts hub ids
  containing "openai"/"jinaai"/"zer0int" as strings (a local folder raises), so the model is passed the
  supported way for anything else: a callable returning ``(model, processor)``. transformers >= 5 returns a
  ``ModelOutput`` from ``get_image_features``/``get_text_features`` where torchmetrics 1.9 expects a tensor;
  a thin adapter returns the projected embeddings (``pooler_output``) — the score math stays torchmetrics'.

The feature extractor is injectable (any ``nn.Module`` taking float images ``(N, 3, H, W)`` in [0, 1]
and returning ``(N, d)`` features, or ``(features, logits)``), so the plumbing is tested without weights.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_FULL_RANK_N = 2048
KID_MAX_SUBSET = 1000
FID_SMALL_SAMPLE_NOTE = (
    "FID from fewer than 2048 images per set is biased upwards (the 2048-d covariances are rank-deficient); "
    "compare only runs with the same N, the same reference set and the same resize."
)
CLIP_SCORE_NOTE = (
    "CLIP score = max(100·cos(image, prompt), 0), model-dependent: random images vs a caption score ~20-24 "
    "with ViT-B/16, so 0 is not the floor; published SD1.5 ≈ 36.2 (ViT-B/16), MLPerf threshold 25."
)
MetricStatus = Literal["ok", "unavailable", "error"]
ImageLike = Path | str | Image.Image

# name -> (label, higher is better)
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "fid": ("FID", False),
    "kid": ("KID", False),
    "inception_score": ("Inception Score", True),
    "clip_score": ("CLIP score", True),
}

_PATCH_LOCK = threading.Lock()


@dataclass
class MetricResult:
    """One metric for one model; ``value`` is None unless ``status == "ok"``."""

    name: str
    value: float | None
    status: MetricStatus
    reason: str | None = None
    n_generated: int = 0
    n_reference: int | None = None
    compared: str = ""
    weights: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.value is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unavailable(name: str, reason: str, **kwargs: Any) -> MetricResult:
    return MetricResult(name=name, value=None, status="unavailable", reason=reason, **kwargs)


def errored(name: str, reason: str, **kwargs: Any) -> MetricResult:
    return MetricResult(name=name, value=None, status="error", reason=reason, **kwargs)


# ----------------------------------------------------------------------------------------------
# Inception weights
# ----------------------------------------------------------------------------------------------


def default_inception_weights_path() -> Path:
    """Where torch hub (and so pytorch-fid) keeps the FID Inception file: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_weights_path(configured: Path | str | None) -> tuple[Path, str | None]:
    """(path used or looked for, why it cannot be used or None)."""
    if configured is not None and str(configured):
        path = Path(configured).expanduser()
        if not path.is_file():
            return path, (
                f"evaluation.inception_weights = {path} does not exist (or is not a file); nothing is downloaded"
            )
        return path, None
    path = default_inception_weights_path()
    if not path.is_file():
        return path, (
            f"Inception weights not found: looked for {path} (torch hub cache; evaluation.inception_weights "
            f"is not set). Nothing is downloaded: copy pytorch-fid's {INCEPTION_WEIGHTS_FILE} there or set "
            "evaluation.inception_weights"
        )
    return path, None


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3 (pool3, 2048-d) plus the classifier's unbiased logits (1008 TF classes).

    Input: float in [0, 1] or uint8 in [0, 255], ``(N, 3, H, W)``, any size (pytorch-fid resizes to 299).
    Output: ``(pool3 (N, 2048), logits_unbiased (N, 1008))``.
    """

    def __init__(self, fid_model: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.fid_model = fid_model
        self.register_buffer("fc_weight", fc.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        pool = self.fid_model(x)[0].flatten(1)
        return pool, pool @ self.fc_weight.T


def load_fid_inception(weights_path: Path | str, device: str | torch.device = "cpu") -> FIDInception:
    """Build pytorch-fid's FID Inception from a local weights file; never touches the network."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found")
    import pytorch_fid.inception as pfi

    def local_state_dict(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # Stands in for torch hub's download inside pytorch_fid: the URL is ignored, the local file is used.
        return torch.load(path, map_location="cpu", weights_only=True)

    captured: dict[str, nn.Module] = {}
    original_builder = pfi.fid_inception_v3

    def capturing_builder() -> nn.Module:
        net = original_builder()
        captured["net"] = net
        return net

    # Module globals are process-wide: serialise and always restore.
    with _PATCH_LOCK:
        saved_loader = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = local_state_dict
        pfi.fid_inception_v3 = capturing_builder
        try:
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)
        finally:
            pfi.load_state_dict_from_url = saved_loader
            pfi.fid_inception_v3 = original_builder
    return FIDInception(model, captured["net"].fc).to(device).eval()


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features (and classifier logits, when the extractor gives them) of one image set, on the CPU."""

    features: torch.Tensor
    logits: torch.Tensor | None = None
    label: str = ""

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _load_image(img: ImageLike) -> torch.Tensor:
    """(3, H, W) float in [0, 1], as torchvision's ToTensor (what pytorch-fid feeds its model)."""
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    else:
        with Image.open(img) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 255.0).permute(2, 0, 1).contiguous()


def _batches(images: Sequence[ImageLike], batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of equal-sized images (a size change starts a new batch; nothing is resized here)."""
    current: list[torch.Tensor] = []
    for img in images:
        t = _load_image(img)
        if current and (len(current) >= batch_size or t.shape != current[0].shape):
            yield torch.stack(current)
            current = []
        current.append(t)
    if current:
        yield torch.stack(current)


def _to_2d(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4:  # (N, D, h, w): global-average like pytorch-fid does for non-pooled blocks
        x = torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)) if x.shape[-2:] != (1, 1) else x
        x = x.flatten(1)
    return x


def extract_features(
    images: Sequence[ImageLike],
    extractor: nn.Module,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    label: str = "",
) -> FeatureSet:
    """Run ``extractor`` over ``images`` (paths or PIL) in batches; features in float64 on the CPU."""
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    has_logits: bool | None = None
    extractor.eval()
    with torch.inference_mode():
        for batch in _batches(images, batch_size):
            out = extractor(batch.to(device))
            if isinstance(out, tuple | list):
                f, lg = out[0], (out[1] if len(out) > 1 else None)
            else:
                f, lg = out, None
            feats.append(_to_2d(f).double().cpu())
            has_logits = lg is not None if has_logits is None else has_logits and lg is not None
            if lg is not None:
                logits.append(lg.double().cpu())
    if not feats:
        return FeatureSet(torch.zeros(0, 0, dtype=torch.float64), None, label)
    return FeatureSet(torch.cat(feats), torch.cat(logits) if has_logits else None, label)


def _as_features(
    images: FeatureSet | Sequence[ImageLike],
    extractor: nn.Module | None,
    batch_size: int,
    device: str | torch.device,
) -> FeatureSet:
    if isinstance(images, FeatureSet):
        return images
    if extractor is None:
        raise ValueError("images given without a feature_extractor")
    return extract_features(images, extractor, batch_size=batch_size, device=device)


def _feature_pair(
    generated: FeatureSet | Sequence[ImageLike],
    reference: FeatureSet | Sequence[ImageLike],
    extractor: nn.Module | None,
    batch_size: int,
    device: str | torch.device,
) -> tuple[FeatureSet, FeatureSet]:
    return (
        _as_features(generated, extractor, batch_size, device),
        _as_features(reference, extractor, batch_size, device),
    )


def _result_facts(
    gen: FeatureSet, ref: FeatureSet | None, compared: str, weights: str | None
) -> dict[str, Any]:
    """What every metric result records about its input: the set sizes, what was compared, the weights."""
    n_reference = None if ref is None else ref.n
    return {"n_generated": gen.n, "n_reference": n_reference, "compared": compared, "weights": weights}


def _too_few_images(
    name: str, label: str, gen: FeatureSet, ref: FeatureSet, common: dict[str, Any]
) -> MetricResult | None:
    """``unavailable`` when either set has fewer than the 2 images a distance between sets needs."""
    if gen.n < 2 or ref.n < 2:
        reason = f"{label} needs >= 2 images per set (generated {gen.n}, reference {ref.n})"
        return unavailable(name, reason, **common)
    return None


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def compute_fid(
    generated: FeatureSet | Sequence[ImageLike],
    reference: FeatureSet | Sequence[ImageLike],
    feature_extractor: nn.Module | None = None,
    *,
    compared: str = "generations vs reference",
    weights: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> MetricResult:
    """Fréchet distance between the feature statistics of two sets (pytorch-fid's formula)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    gen, ref = _feature_pair(generated, reference, feature_extractor, batch_size, device)
    common = _result_facts(gen, ref, compared, weights)
    if (too_few := _too_few_images("fid", "FID", gen, ref, common)) is not None:
        return too_few
    a, b = gen.features.numpy(), ref.features.numpy()
    # Same statistics as pytorch_fid.fid_score.calculate_activation_statistics.
    mu1, sigma1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, sigma2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    extras: dict[str, Any] = {
        "dims": int(a.shape[1]),
        "implementation": "pytorch_fid.calculate_frechet_distance",
    }
    if min(gen.n, ref.n) < FID_FULL_RANK_N:
        extras["note"] = FID_SMALL_SAMPLE_NOTE
    try:
        # With N < dims the covariances are singular and scipy warns on every call; that is expected for a
        # small evaluation set, so the warnings are kept in extras instead of flooding the run log.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
        messages = sorted(
            {str(w.message).splitlines()[0] for w in caught if w.category is not DeprecationWarning}
        )
        if messages:
            extras["warnings"] = messages
    except (ValueError, np.linalg.LinAlgError) as exc:
        return errored("fid", f"Fréchet distance failed: {exc}", extras=extras, **common)
    if not math.isfinite(value):
        return errored("fid", f"Fréchet distance is not finite ({value})", extras=extras, **common)
    return MetricResult("fid", value, "ok", extras=extras, **common)


def compute_kid(
    generated: FeatureSet | Sequence[ImageLike],
    reference: FeatureSet | Sequence[ImageLike],
    feature_extractor: nn.Module | None = None,
    *,
    subsets: int = 100,
    seed: int = 0,
    compared: str = "generations vs reference",
    weights: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> MetricResult:
    """torchmetrics KernelInceptionDistance on precomputed features; ``subset_size`` = min(N_gen, N_ref, 1000).

    With subset_size equal to both set sizes every subset is the full set, so ``kid_std`` is 0.
    Subset sampling uses torch's global RNG: it runs under ``fork_rng`` with a fixed seed (reproducible,
    and the caller's RNG is untouched).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    gen, ref = _feature_pair(generated, reference, feature_extractor, batch_size, device)
    common = _result_facts(gen, ref, compared, weights)
    if (too_few := _too_few_images("kid", "KID", gen, ref, common)) is not None:
        return too_few
    subset_size = min(gen.n, ref.n, KID_MAX_SUBSET)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=subset_size)
    kid.update(ref.features, real=True)
    kid.update(gen.features, real=False)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = kid.compute()
    except (ValueError, RuntimeError) as exc:
        return errored("kid", f"KID failed: {exc}", **common)
    extras = {"kid_std": float(std), "subset_size": subset_size, "subsets": subsets, "degree": 3}
    return MetricResult("kid", float(mean), "ok", extras=extras, **common)


def inception_score_splits(n: int) -> int:
    """10 splits (the convention) only when each split keeps >= 100 images; otherwise 1.

    IS of a split is bounded by its size, so small splits bias it down: 32 images in 10 splits of 3 could
    never exceed 3, while the checklist asks for > 6.
    """
    return 10 if n >= 1000 else 1


def compute_inception_score(
    generated: FeatureSet | Sequence[ImageLike],
    feature_extractor: nn.Module | None = None,
    *,
    splits: int | None = None,
    seed: int = 0,
    compared: str = "generations (no reference)",
    weights: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> MetricResult:
    """torchmetrics InceptionScore on precomputed classifier logits (``feature=nn.Identity()``)."""
    from torchmetrics.image.inception import InceptionScore

    gen = _as_features(generated, feature_extractor, batch_size, device)
    common = _result_facts(gen, None, compared, weights)
    if gen.logits is None:
        return unavailable(
            "inception_score",
            "the feature extractor gives no classifier logits; IS needs the Inception classifier "
            "(pytorch-fid's FID Inception has them, a features-only extractor does not)",
            **common,
        )
    if gen.n < 2:
        return unavailable("inception_score", f"IS needs >= 2 images (got {gen.n})", **common)
    k = splits or inception_score_splits(gen.n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=nn.Identity(), splits=k)
    metric.update(gen.logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        torch.manual_seed(seed)
        mean, std = metric.compute()
    std_value = float(std)
    extras = {
        "is_std": std_value if math.isfinite(std_value) else None,
        "splits": k,
        "num_classes": int(gen.logits.shape[1]),
        "logits": "unbiased (pool3 @ fc.weight.T)",
        "upper_bound": min(gen.n // k, int(gen.logits.shape[1])),
        "note": "IS is bounded by the images per split; with few images it is not comparable to published IS.",
    }
    return MetricResult("inception_score", float(mean), "ok", extras=extras, **common)


# ----------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------


class CLIPTensorFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return tensors, as torchmetrics
    1.9 expects (transformers >= 5 returns a ``ModelOutput`` whose ``pooler_output`` is the projection)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return self._tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        )


def clip_model_problem(clip_model_dir: Path | str | None) -> str | None:
    """Why ``clip_model_dir`` cannot be used (None when it looks like a transformers CLIP folder)."""
    if clip_model_dir is None or not str(clip_model_dir):
        return (
            "no CLIP model: evaluation.clip_model_dir is not set (nothing is downloaded; set it to a local "
            "transformers CLIP folder, e.g. a saved openai/clip-vit-base-patch16)"
        )
    path = Path(clip_model_dir).expanduser()
    if not path.is_dir():
        return f"evaluation.clip_model_dir = {path} does not exist"
    if not (path / "config.json").is_file():
        return f"evaluation.clip_model_dir = {path} has no config.json (not a transformers model folder)"
    return None


def load_local_clip(clip_model_dir: Path | str) -> tuple[CLIPTensorFeatures, Any]:
    """(model adapter, processor) from a local folder; ``local_files_only`` so nothing is fetched."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(clip_model_dir).expanduser()
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return CLIPTensorFeatures(model), processor


def compute_clip_score(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    clip_model_dir: Path | str | None = None,
    *,
    loader: Callable[[], tuple[Any, Any]] | None = None,
    group_ids: Sequence[int] | None = None,
    compared: str = "generations vs their prompts",
    device: str | torch.device = "cpu",
) -> MetricResult:
    """Mean torchmetrics CLIPScore of each image against its prompt, plus per-group (per-prompt) means.

    ``loader`` (a callable returning ``(model, processor)``) overrides ``clip_model_dir``; it is what
    torchmetrics receives. A tiny random-init CLIP gives a meaningless value through real plumbing.
    """
    weights = str(clip_model_dir) if clip_model_dir is not None else None
    common = {"n_generated": len(images), "n_reference": None, "compared": compared, "weights": weights}
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if loader is None:
        problem = clip_model_problem(clip_model_dir)
        if problem:
            return unavailable("clip_score", problem, **common)
        model_dir = Path(str(clip_model_dir)).expanduser()

        def loader() -> tuple[Any, Any]:
            return load_local_clip(model_dir)

    if not images:
        return unavailable("clip_score", "no images", **common)
    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        model, processor = loader()
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    except Exception as exc:  # a broken folder: report, don't crash the evaluation
        return errored("clip_score", f"could not load the CLIP model: {type(exc).__name__}: {exc}", **common)
    groups = list(group_ids) if group_ids is not None else [0] * len(images)
    per_group: dict[str, float] = {}
    with torch.inference_mode():
        for g in dict.fromkeys(groups):
            idx = [i for i, gi in enumerate(groups) if gi == g]
            batch = [(_load_image(images[i]) * 255).round().to(torch.uint8).to(device) for i in idx]
            # forward() scores this batch alone and also accumulates it into the overall state.
            per_group[str(g)] = float(metric(batch, [prompts[i] for i in idx]))
        value = float(metric.compute())
    extras = {"scale": "0-100", "note": CLIP_SCORE_NOTE}
    if group_ids is not None:
        extras["per_prompt"] = per_group
    return MetricResult("clip_score", value, "ok", extras=extras, **common)


# ----------------------------------------------------------------------------------------------
# One suite for both models
# ----------------------------------------------------------------------------------------------


def _once(loader: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
    cache: list[tuple[Any, Any]] = []

    def cached() -> tuple[Any, Any]:
        if not cache:
            cache.append(loader())
        return cache[0]

    return cached


class MetricSuite:
    """Loads the Inception and CLIP models once, extracts the reference features once, then scores
    any number of generated sets (base, LoRA) the same way."""

    def __init__(
        self,
        reference_images: Sequence[ImageLike],
        *,
        inception_weights: Path | str | None = None,
        clip_model_dir: Path | str | None = None,
        feature_extractor: nn.Module | None = None,
        clip_loader: Callable[[], tuple[Any, Any]] | None = None,
        reference_label: str = "test split",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.reference_images = list(reference_images)
        self.reference_label = reference_label
        self.device = device
        self.batch_size = batch_size
        self.clip_model_dir = clip_model_dir
        if clip_loader is None and clip_model_problem(clip_model_dir) is None:
            model_dir = Path(str(clip_model_dir)).expanduser()

            def clip_loader() -> tuple[Any, Any]:
                return load_local_clip(model_dir)

        # Loaded once, on first use, and shared by every generated set.
        self.clip_loader = _once(clip_loader) if clip_loader is not None else None
        self.extractor: nn.Module | None = None
        self.extractor_problem: tuple[MetricStatus, str] | None = None
        if feature_extractor is not None:
            self.extractor = feature_extractor.to(device)
            self.weights = f"injected feature extractor ({type(feature_extractor).__name__})"
        else:
            path, problem = inception_weights_path(inception_weights)
            self.weights = str(path)
            if problem:
                self.extractor_problem = ("unavailable", problem)
            else:
                try:
                    self.extractor = load_fid_inception(path, device)
                except Exception as exc:  # wrong/corrupt file: say so, keep the other metrics
                    self.extractor_problem = (
                        "error",
                        f"could not load Inception weights {path}: {type(exc).__name__}: {exc}",
                    )
        self._reference: FeatureSet | None = None

    def reference_features(self) -> FeatureSet | None:
        if self.extractor is None:
            return None
        if self._reference is None:
            self._reference = extract_features(
                self.reference_images,
                self.extractor,
                batch_size=self.batch_size,
                device=self.device,
                label=self.reference_label,
            )
        return self._reference

    def compute(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str],
        label: str,
        group_ids: Sequence[int] | None = None,
    ) -> dict[str, MetricResult]:
        """FID, KID, IS and CLIP score of one generated set (``label`` e.g. "LoRA")."""
        vs_ref = f"{label} generations vs {self.reference_label}"
        out: dict[str, MetricResult] = {}
        if self.extractor is None:
            status, reason = self.extractor_problem or ("unavailable", "no feature extractor")
            for name, compared in (
                ("fid", vs_ref),
                ("kid", vs_ref),
                ("inception_score", f"{label} generations (no reference)"),
            ):
                out[name] = MetricResult(
                    name,
                    None,
                    status,
                    reason,
                    len(images),
                    None if name == "inception_score" else len(self.reference_images),
                    compared,
                    self.weights,
                )
        else:
            gen = extract_features(
                images, self.extractor, batch_size=self.batch_size, device=self.device, label=label
            )
            ref = self.reference_features()
            assert ref is not None
            if ref.n == 0:
                reason = f"no reference images ({self.reference_label} is empty)"
                out["fid"] = unavailable(
                    "fid", reason, n_generated=gen.n, n_reference=0, compared=vs_ref, weights=self.weights
                )
                out["kid"] = unavailable(
                    "kid", reason, n_generated=gen.n, n_reference=0, compared=vs_ref, weights=self.weights
                )
            else:
                out["fid"] = compute_fid(gen, ref, compared=vs_ref, weights=self.weights)
                out["kid"] = compute_kid(gen, ref, compared=vs_ref, weights=self.weights)
            out["inception_score"] = compute_inception_score(
                gen, compared=f"{label} generations (no reference)", weights=self.weights
            )
        out["clip_score"] = compute_clip_score(
            images,
            prompts,
            self.clip_model_dir,
            loader=self.clip_loader,
            group_ids=group_ids,
            compared=f"{label} generations vs their prompts",
            device=self.device,
        )
        return out
