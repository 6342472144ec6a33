"""Pipeline configuration: YAML files under ``configs/`` validated with pydantic.

Relative paths in a config file resolve against the folder that holds that file, so a config can be
moved together with its data. The active file is chosen by ``SHOE_LORA_CONFIG`` (default
``configs/demo.yaml`` in the repository).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / "configs" / "demo.yaml"
CONFIG_ENV_VAR = "SHOE_LORA_CONFIG"

CAPTION_TEMPLATE = (
    "A professional product photo of {colour} {type} shoes on white background, "
    "{characteristics}, product photography"
)
VALIDATION_PROMPTS = [
    "A professional product photo of black casual shoes on white background, side view, product photography",
    "A professional product photo of brown leather casual shoes on white background, "
    "side view, product photography",
    "A professional product photo of white casual sneakers on white background, "
    "side view, product photography",
    "A professional product photo of blue casual shoes on white background, side view, product photography",
]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file, key and value at fault."""


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CleaningConfig(_Strict):
    min_side: int = Field(128, ge=1, description="Reject images whose shorter side is below this (pixels).")
    max_aspect_ratio: float = Field(4.0, ge=1.0, description="Reject images wider/taller than this ratio.")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Refuse images with more pixels than this (decompression bombs)."
    )
    resize_policy: Literal["pad", "crop"] = Field(
        "pad", description="pad: letterbox onto white (keeps the whole shoe); crop: centre crop."
    )
    near_duplicate_distance: int = Field(
        4, ge=0, le=64, description="Perceptual-hash Hamming distance at or below which images are reported."
    )
    workers: int = Field(0, ge=0, description="Worker processes; 0 = one per CPU core.")


class SplitConfig(_Strict):
    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1.0, got {total:g}")
        return self


class DatasetConfig(_Strict):
    name: str = Field("casual_shoes", min_length=1)
    raw_dir: Path
    output_dir: Path
    resolution: int = Field(
        512,
        ge=64,
        description="Side of the square training images (pixels); unset: the base model family's native "
        "size (SD1.5 512, SDXL 1024).",
    )
    styles_csv: Path | None = Field(
        None, description="Product metadata CSV (fashion-product-images layout); default raw_dir/styles.csv."
    )
    default_type: str = Field("casual", description="Type word used when no metadata names one.")
    default_characteristics: str = Field("side view", description="Characteristics used when none known.")
    caption_template: str = CAPTION_TEMPLATE
    min_valid_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Asset check: valid/raw at least this.")
    cleaning: CleaningConfig = CleaningConfig()
    splits: SplitConfig = SplitConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in {".", ".."}:
            raise ValueError(f"dataset name must be a plain folder name, got {v!r}")
        return v

    @field_validator("caption_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        for needed in ("{colour}", "{type}"):
            if needed not in v:
                raise ValueError(f"caption_template must contain {needed}, got {v!r}")
        return v

    @property
    def styles_csv_path(self) -> Path:
        return self.styles_csv if self.styles_csv is not None else self.raw_dir / "styles.csv"


class SpeedConfig(_Strict):
    """CUDA throughput levers (CPU and MPS run the recipe as written). None of them changes the maths of a
    step beyond float rounding, so none is part of the training hash: switching one keeps the checkpoints.
    Defaults as measured on an H200 at SD1.5 scale (benchmarks/RESULTS.md): SDPA 2× and TF32 2.3× in fp32
    mode; channels_last, the fused AdamW and a device-resident cache made no measurable difference there;
    compile is 1.66× per step but costs about 2.3 minutes of warm-up, which pays back after ≈ 1,800 steps."""

    tf32: bool = Field(True, description="Allow TF32 tensor-core matmuls in fp32 mode.")
    sdpa: bool = Field(True, description="PyTorch scaled_dot_product_attention (AttnProcessor2_0).")
    channels_last: bool = Field(False, description="channels_last memory format for the UNet's convolutions.")
    compile: bool = Field(False, description="torch.compile the UNet's blocks one by one (regional).")
    fused_optimizer: bool = Field(True, description="AdamW's fused CUDA kernel.")
    data_on_device: bool = Field(
        False, description="Keep the whole latent + text-embedding cache on the GPU."
    )


class K8sConfig(_Strict):
    """The pod that trains with ``training.launcher: k8s`` (dagster-k8s ``PipesK8sClient``). The pod runs the
    same entry point on the same config file; it sees the data at the same paths through the volume."""

    image: str | None = Field(None, description="Container image with this project installed (required).")
    namespace: str | None = Field(None, description="Kubernetes namespace; default: the current one.")
    config_path: str | None = Field(
        None, description="The config file inside the pod; default: its path here (the same image)."
    )
    volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim holding dataset.output_dir and training.output_dir."
    )
    mount_path: Path | None = Field(
        None, description="Where the claim is mounted; default: the common folder of the two output dirs."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {gpu: h100}.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations, e.g. of a GPU node pool's taint."
    )
    service_account: str | None = Field(None, description="serviceAccountName of the pod.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables of the pod.")

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"mount_path must be an absolute path inside the pod, got {str(v)!r}")
        return v


class TrainingConfig(_Strict):
    base_model: str = Field(
        "tiny-sd",
        description="'tiny-sd' (random, shapes only), 'tiny-shoes' (the committed demo model), a Hugging Face "
        "hub id, or a local folder.",
    )
    revision: str | None = Field(None, description="Hub revision (commit/tag) of base_model.")
    vae: str | None = Field(
        None,
        description="A VAE instead of the base model's (hub id or local AutoencoderKL folder), e.g. "
        "madebyollin/sdxl-vae-fp16-fix: the SDXL VAE overflows in fp16, so without one SDXL latents encode in "
        "fp32.",
    )
    model_family: Literal["auto", "sd15", "sdxl"] = Field(
        "auto",
        description="The base model's family: 'auto' reads it from the model's UNet config (SDXL: "
        "addition_embed_type text_time and a text_encoder_2); 'sd15'/'sdxl' insist, and a model of the other "
        "family is an error.",
    )
    output_dir: Path
    # train_batch_size × gradient_accumulation_steps is the effective batch (images per optimizer step);
    # micro_batch_size only says how many of them go through the UNet at once.
    train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    micro_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Images per forward pass; 'auto' = the largest that fits on CUDA, train_batch_size on "
        "CPU/MPS. Must divide the effective batch. Does not change the maths of a step.",
    )
    max_train_steps: int = Field(3000, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    lr_warmup_steps: int = Field(500, ge=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    weight_decay: float = Field(1e-2, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    gradient_clipping: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool | Literal["auto"] = Field(
        True, description="Recompute activations in the backward pass; 'auto' = only where needed to fit."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    validation_steps: int = Field(500, ge=1)
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int = Field(5, ge=1)
    seed: int = 42
    deterministic: bool = Field(
        False, description="Deterministic CUDA kernels: bit-identical resume on GPUs, somewhat slower."
    )
    cache_latents: bool = Field(True, description="Encode images/captions once before training.")
    latent_encoding_batch_size: int = Field(8, ge=1)
    validation_prompts: list[str] = Field(default_factory=lambda: list(VALIDATION_PROMPTS))
    num_validation_images: int = Field(4, ge=1)
    validation_inference_steps: int = Field(30, ge=1)
    validation_guidance_scale: float = Field(7.5, ge=0.0)
    log_every_steps: int = Field(10, ge=1, description="Dagster progress line interval (optimizer steps).")
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR-γ loss weighting (5.0 is usual); null = off (the recipe)."
    )
    noise_offset: float = Field(
        0.0, ge=0.0, description="Per-channel offset noise (0.05-0.1 usual) for pure white backgrounds."
    )
    input_perturbation: float = Field(0.0, ge=0.0, description="Input perturbation of the noise (0.1 usual).")
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability a sample trains with the empty caption."
    )
    # Where training runs. None of these changes the maths of a step (the effective batch is global), so
    # none is part of the training hash: switching launcher or process count keeps the checkpoints.
    launcher: Literal["inprocess", "accelerate", "k8s"] = Field(
        "inprocess",
        description="inprocess: in the Dagster step; accelerate: `accelerate launch` in a child process "
        "(Dagster Pipes); k8s: a Kubernetes pod (dagster-k8s Pipes).",
    )
    num_processes: int | Literal["auto"] = Field(
        1,
        description="Data-parallel processes (one per GPU) sharing the effective batch; 'auto' = the "
        "visible GPUs. More than 1 needs launcher accelerate or k8s.",
    )
    k8s: K8sConfig = Field(default_factory=K8sConfig)

    @property
    def effective_batch_size(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _launcher_settings(self) -> TrainingConfig:
        n = self.num_processes
        if isinstance(n, int):
            if n < 1:
                raise ValueError(f"num_processes must be at least 1 or 'auto', got {n}")
            if self.effective_batch_size % n:
                raise ValueError(
                    f"num_processes {n} must divide the effective batch train_batch_size × "
                    f"gradient_accumulation_steps = {self.effective_batch_size}"
                )
            micro = self.micro_batch_size
            if isinstance(micro, int) and (self.effective_batch_size // n) % micro:
                raise ValueError(
                    f"micro_batch_size {micro} must divide the per-process batch {self.effective_batch_size // n} "
                    f"(effective batch {self.effective_batch_size} over num_processes {n})"
                )
        if self.launcher == "inprocess" and n != 1:
            raise ValueError(
                f"num_processes {n!r} needs training.launcher accelerate or k8s (inprocess trains in one process)"
            )
        if self.launcher == "k8s":
            missing = [f"training.k8s.{k}" for k in ("image", "volume_claim") if not getattr(self.k8s, k)]
            if missing:
                raise ValueError(f"training.launcher k8s needs {' and '.join(missing)}")
            if n == "auto":
                raise ValueError(
                    "training.launcher k8s needs a number for num_processes (the pod's GPU count)"
                )
        return self

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainingConfig:
        micro = self.micro_batch_size
        if isinstance(micro, int) and (micro < 1 or self.effective_batch_size % micro):
            raise ValueError(
                f"micro_batch_size {micro} must divide the effective batch train_batch_size × "
                f"gradient_accumulation_steps = {self.effective_batch_size}"
            )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` as False; that is what the user meant.
        return "no" if v is False else v


class ExportConfig(_Strict):
    checkpoint_step: int | Literal["best"] | None = Field(
        None,
        description="Export checkpoint-N instead of the final one (manual early stopping); 'best' = the "
        "checkpoint with the lowest validation loss.",
    )

    @field_validator("checkpoint_step")
    @classmethod
    def _positive_step(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"checkpoint_step must be a step ≥ 1 or 'best', got {v}")
        return v

    fuse_lora_scale: float = Field(1.0, gt=0.0, description="LoRA scale fused into final_pipeline.")


EVALUATION_PROMPTS = [
    *VALIDATION_PROMPTS,
    "A professional product photo of red casual sneakers on white background, side view, product photography",
    "A professional product photo of grey casual shoes on white background, lace-up, product photography",
    "A professional product photo of beige loafers on white background, side view, product photography",
    "A professional product photo of navy casual shoes on white background, lace-up, product photography",
]


class EvaluationThresholds(_Strict):
    """The recipe's validation checklist; a check whose metric is unavailable never passes."""

    final_loss_max: float = Field(
        0.02,
        description="lora_training's smoothed_loss (EMA of the per-step losses) below this "
        "(epsilon-prediction base models).",
    )
    final_val_loss_ratio_max: float = Field(
        1.0,
        gt=0.0,
        description="v-prediction base models (whose loss has another scale): the run's last validation loss "
        "over its first (validation_loss.csv, every training.validation_steps) below this, i.e. it fell.",
    )
    white_background_min: float = Field(0.95, ge=0.0, le=1.0, description="Share of white-background images.")
    centred_min: float = Field(0.90, ge=0.0, le=1.0, description="Share of centred products.")
    colour_adherence_min: float = Field(
        0.75, ge=0.0, le=1.0, description="Share of images whose product colour matches the prompt's colour."
    )
    diversity_min_hamming: float = Field(
        6.0, ge=0.0, description="Mean pHash distance within a prompt; below it = mode collapse."
    )
    fid_max: float = 30.0
    clip_score_min: float = 25.0
    inception_score_min: float = 6.0


class EvaluationConfig(_Strict):
    prompts: list[str] = Field(default_factory=lambda: list(EVALUATION_PROMPTS), min_length=1)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    images_per_prompt: int = Field(4, ge=1)
    seed: int = 1234
    resolution: int | None = Field(None, ge=64, description="Generation size; default dataset.resolution.")
    inception_weights: Path | None = Field(
        None, description="pt_inception-2015-12-05-6726825d.pth; default: the torch hub cache."
    )
    clip_model_dir: Path | None = Field(None, description="Local CLIP model folder (transformers layout).")
    thresholds: EvaluationThresholds = EvaluationThresholds()


class HiresConfig(_Strict):
    """A1111's "hires fix" for approved images only: an img2img pass of the same pipeline and LoRA at
    ``scale`` × the render size, same seed, ``denoise`` strength (diffusers' img2img pipeline built from the
    same components: no extra weights)."""

    enabled: bool = Field(True, description="Re-render approved images at scale before publishing.")
    scale: float = Field(2.0, ge=1.0, le=8.0, description="Hires size / render size.")
    denoise: float = Field(0.35, gt=0.0, le=1.0, description="img2img strength (A1111 Denoising strength).")
    steps: int | None = Field(
        None,
        ge=1,
        description="Sampler steps of the pass before strength; default renders.num_inference_steps.",
    )


class C2paConfig(_Strict):
    """C2PA Content Credentials signing of every published file (c2pa-python)."""

    cert_chain: Path | None = Field(None, description="PEM certificate chain, signing certificate first.")
    private_key: Path | None = Field(None, description="PEM private key of the signing certificate.")
    algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = "es256"
    timestamp_url: str | None = Field(None, description="RFC 3161 time-stamp authority; none offline.")
    test_certificate: bool = Field(
        False,
        description="Make a local test CA + signer under <training.output_dir>/c2pa-test when cert_chain and "
        "private_key are not given: valid in structure, not trusted by any C2PA reader.",
    )

    @model_validator(mode="after")
    def _credentials_usable(self) -> C2paConfig:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError(
                "publish.c2pa needs both cert_chain and private_key (or neither, with test_certificate)"
            )
        if self.cert_chain is None and not self.test_certificate:
            raise ValueError("publish.c2pa needs cert_chain and private_key, or test_certificate: true")
        if self.cert_chain is not None and self.private_key is not None:
            from shoe_lora_pipeline.core.marking import check_credentials

            check_credentials(self.cert_chain, self.private_key, self.algorithm)
        return self


class PublishConfig(_Strict):
    """published_renders: which marketplaces, how to finish, how to mark (see core.marketplace)."""

    profiles: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["amazon_main"],
        min_length=1,
        description="Built-in names (amazon_main, google_merchant, shopify) or {name, [based_on,] keys…}.",
    )
    shadow: Literal["keep", "remove"] = Field("keep", description="The contact shadow under the product.")
    background_tolerance: int = Field(
        12, ge=0, le=128, description="Largest channel difference from the border colour counted as backdrop."
    )
    near_white: int = Field(
        200, ge=0, le=255, description="A border whose median darkest channel is below this is refused."
    )
    max_upscale: float = Field(
        6.0, ge=1.0, description="Refuse an image whose framed product needs more resampling than this."
    )
    c2pa: C2paConfig | None = Field(
        None, description="Sign a C2PA manifest into every file; null = XMP only."
    )

    @field_validator("profiles")
    @classmethod
    def _known_profiles(cls, v: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        from shoe_lora_pipeline.core.marketplace import ProfileError, resolve_profiles

        try:
            resolve_profiles(v)
        except ProfileError as exc:
            raise ValueError(str(exc)) from None
        return v

    def resolved_profiles(self) -> list[Any]:
        """The :class:`~shoe_lora_pipeline.core.marketplace.MarketplaceProfile` of every entry."""
        from shoe_lora_pipeline.core.marketplace import resolve_profiles

        return resolve_profiles(self.profiles)


RENDERS_NEGATIVE_PROMPT = "blurry, low quality, cropped, out of frame, multiple shoes, text, watermark, logo, busy background, shadow"


class RendersConfig(_Strict):
    """Product renders: a specs sheet in, QA-ranked, reviewed and published product photos out."""

    specs_csv: Path | None = Field(
        None, description="Specs sheet (sku, colour, type, characteristics, count[, view, prompt, …])."
    )
    max_per_sku: int = Field(8, ge=1, description="Refuse a row whose count is above this.")
    candidates_per_image: int = Field(4, ge=1, description="Candidates generated per wanted image.")
    auto_approve: bool = Field(True, description="Approve the top `count` candidates no review rejects.")
    require_qa_pass: bool = Field(True, description="Auto-approve only candidates that pass product QA.")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    sampler: Literal["dpmpp_2m", "pndm", "ddim", "euler"] = Field(
        "dpmpp_2m", description="dpmpp_2m: DPM++ 2M (deterministic, good at 20-30 steps); pndm: SD1.5's own."
    )
    resolution: int | None = Field(None, ge=64, description="Render size; default dataset.resolution.")
    batch_size: int = Field(8, ge=1, description="Images per pipeline call, across SKUs.")
    seed: int = Field(0, ge=0, description="Mixed into every (sku, index) seed; change it for new images.")
    negative_prompt: str = Field(RENDERS_NEGATIVE_PROMPT, description="Default for rows without one.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 elsewhere."
    )
    compile: bool = Field(False, description="torch.compile the UNet on CUDA (pays back on large sheets).")
    hires: HiresConfig = Field(default_factory=HiresConfig)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"renders.resolution must be a multiple of 8 (latents are 1/8), got {v}")
        return v


class CategoryRendersConfig(_Strict):
    specs_csv: Path | None = Field(
        None, description="This category's specs sheet; other renders keys shared."
    )


class CategoryConfig(_Strict):
    """One more product category: its own photos and output folders; other dataset keys default to
    the ``dataset:`` section's."""

    raw_dir: Path
    output_dir: Path
    training_output_dir: Path | None = Field(None, description="Default: <output_dir>/lora.")
    styles_csv: Path | None = None
    default_type: str | None = None
    default_characteristics: str | None = None
    caption_template: str | None = None
    min_valid_ratio: float | None = Field(None, ge=0.0, le=1.0)
    renders: CategoryRendersConfig | None = None


class AutomationConfig(_Strict):
    retrain_cron: str = Field("0 3 * * 1", description="When retrain_job runs (default: Mondays 03:00).")
    timezone: str = Field("UTC", description="IANA timezone of retrain_cron, e.g. Europe/Berlin.")
    sensor_interval_seconds: int = Field(60, ge=10, description="How often the new-photo sensor looks.")
    category_lock_timeout_s: float = Field(
        300.0,
        ge=0.0,
        description="How long a step waits for another run writing the same category folder before it fails "
        "naming that run (core/category_lock.py).",
    )
    gpu_slots: int = Field(
        1,
        ge=1,
        description="GPU steps that run at once (the Dagster `gpu` pool's limit, set on the instance: "
        "`dagster instance concurrency set gpu N`); each training child gets its own GPU(s).",
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r} (use an IANA name such as Europe/Berlin)") from None
        return v

    @field_validator("retrain_cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"retrain_cron must have 5 fields (minute hour day month weekday), got {v!r}")
        return v


class PipelineConfig(_Strict):
    dataset: DatasetConfig
    categories: dict[str, CategoryConfig] = Field(
        default_factory=dict, description="Further product categories; `dataset:` is the first one."
    )
    automation: AutomationConfig = AutomationConfig()
    training: TrainingConfig
    export: ExportConfig = ExportConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    renders: RendersConfig = RendersConfig()
    publish: PublishConfig = Field(default_factory=PublishConfig)
    device: Literal["auto", "mps", "cuda", "cpu"] = "auto"
    source_path: Path | None = Field(None, exclude=True, description="The YAML file this came from.")

    @model_validator(mode="after")
    def _resolution_of_the_family(self) -> PipelineConfig:
        # dataset.resolution unset: the base model family's native size (SD1.5 512, SDXL 1024) where the
        # family can be known from the config (core/families.py: family_hint); 512 otherwise.
        if "resolution" not in self.dataset.model_fields_set:
            from shoe_lora_pipeline.core.families import family_hint

            family = family_hint(self.training.base_model, self.training.model_family, self.training.revision)
            if family is not None and family.default_resolution != self.dataset.resolution:
                self.dataset.resolution = family.default_resolution
        return self

    @model_validator(mode="after")
    def _categories_are_distinct(self) -> PipelineConfig:
        names = [self.dataset.name, *self.categories]
        if len(set(names)) != len(names):
            raise ValueError(f"category {self.dataset.name!r} is both dataset.name and a categories key")
        for name in self.categories:
            DatasetConfig._safe_name(name)
        outputs: dict[Path, str] = {}
        for name in names:
            cat = self.for_category(name) if self.categories else self
            for folder in (cat.dataset.output_dir, cat.training.output_dir):
                if folder in outputs and outputs[folder] != name:
                    raise ValueError(
                        f"categories {outputs[folder]!r} and {name!r} share the output folder {folder}: "
                        "each category needs its own"
                    )
                outputs[folder] = name
        return self

    @model_validator(mode="after")
    def _hires_fits_profiles(self) -> PipelineConfig:
        hires = self.renders.hires
        if hires.enabled:
            side = round((self.renders.resolution or self.dataset.resolution) * hires.scale)
            for profile in self.publish.resolved_profiles():
                if side > profile.max_side:
                    raise ValueError(
                        f"renders.hires.scale {hires.scale:g} makes {side} px images, above profile "
                        f"{profile.name!r} max_side {profile.max_side}: lower the scale or the resolution"
                    )
        return self

    def c2pa_test_dir(self) -> Path:
        """Where ``publish.c2pa.test_certificate`` keeps its test CA and signer."""
        return self.training.output_dir / "c2pa-test"

    def category_names(self) -> list[str]:
        """The product categories, the ``dataset:`` section's first."""
        return [self.dataset.name, *self.categories]

    def for_category(self, name: str) -> PipelineConfig:
        """The configuration of one category: its dataset section and training output folder."""
        if name == self.dataset.name:
            return self.model_copy(update={"categories": {}})
        if name not in self.categories:
            raise ConfigError(f"unknown category {name!r}; configured: {', '.join(self.category_names())}")
        cat = self.categories[name]
        overrides = {
            k: v
            for k, v in cat.model_dump(exclude={"training_output_dir", "renders"}).items()
            if v is not None
        }
        dataset = self.dataset.model_copy(update={**overrides, "name": name})
        training = self.training.model_copy(
            update={"output_dir": cat.training_output_dir or cat.output_dir / "lora"}
        )
        # A specs sheet lists one category's SKUs: never inherit the first category's sheet.
        renders = self.renders.model_copy(
            update={"specs_csv": cat.renders.specs_csv if cat.renders else None}
        )
        return self.model_copy(
            update={"dataset": dataset, "training": training, "renders": renders, "categories": {}}
        )

    def config_hash(self) -> str:
        """Stable hash of the resolved configuration (paths included), for provenance and resume checks."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()

    def training_hash(self, family: str | None = None) -> str:
        """Hash of the settings that change training results; logging/validation cadence excluded.

        ``family`` is the base model's resolved family (``SDComponents.family.name``); without it,
        ``training.model_family`` where it insists. SD1.5 adds nothing, so SD1.5 hashes are those recorded
        before families existed; any other family adds its name, so its checkpoints never resume on SD1.5.
        """
        family = family or (None if self.training.model_family == "auto" else self.training.model_family)
        cadence = {
            "model_family",  # hashed below as the resolved family
            "vae",  # hashed below when set (a run without one keeps the hash it had before the option)
            "validation_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "log_every_steps",
            "validation_prompts",
            "num_validation_images",
            "validation_inference_steps",
            "validation_guidance_scale",
            "output_dir",
            "latent_encoding_batch_size",
            # Recomputes activations, same numbers: toggling it must not throw away a run's checkpoints.
            "gradient_checkpointing",
            # How the effective batch is cut into micro-batches, and the CUDA levers, change only the float
            # summation order; the effective batch itself is hashed below.
            "micro_batch_size",
            "train_batch_size",
            "gradient_accumulation_steps",
            "speed",
            # Where and on how many processes: the effective batch, hashed below, is global.
            "launcher",
            "num_processes",
            "k8s",
        }
        payload = self.training.model_dump(mode="json", exclude=cadence)
        payload["effective_batch_size"] = self.training.effective_batch_size
        payload["resolution"] = self.dataset.resolution
        if family is not None and family != "sd15":
            payload["model_family"] = family
        if self.training.vae is not None:
            payload["vae"] = self.training.vae
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_PATH_FIELDS = {
    "dataset": ("raw_dir", "output_dir", "styles_csv"),
    "training": ("output_dir",),
    "evaluation": ("inception_weights", "clip_model_dir"),
    "renders": ("specs_csv",),
}
_C2PA_PATH_FIELDS = ("cert_chain", "private_key")


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    sections = [(raw.get(section), keys) for section, keys in _PATH_FIELDS.items()]
    categories = raw.get("categories")
    if isinstance(categories, dict):
        cat_keys = ("raw_dir", "output_dir", "training_output_dir", "styles_csv")
        sections += [(cat, cat_keys) for cat in categories.values()]
        sections += [
            (cat.get("renders"), ("specs_csv",)) for cat in categories.values() if isinstance(cat, dict)
        ]
    publish = raw.get("publish")
    if isinstance(publish, dict):
        sections.append((publish.get("c2pa"), _C2PA_PATH_FIELDS))
    for sect, keys in sections:
        if not isinstance(sect, dict):
            continue
        for key in keys:
            value = sect.get(key)
            if isinstance(value, str | Path) and str(value):
                p = Path(os.path.expanduser(str(value)))
                sect[key] = p if p.is_absolute() else (base / p).resolve()
    base_model = raw.get("training", {}).get("base_model") if isinstance(raw.get("training"), dict) else None
    # A base_model that starts with ./ or ../ is a folder next to the config, not a hub id.
    if isinstance(base_model, str) and base_model.startswith(("./", "../")):
        raw["training"]["base_model"] = str((base / base_model).resolve())
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (value {e.get('input')!r}); check the spelling")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{key}'")
        else:
            lines.append(f"  - {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides such as ``training.max_train_steps=10`` (values parsed as YAML)."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            key, value = item.split("=", 1)
            parsed.append((key.strip(), yaml.safe_load(value)))
        items = parsed
    for dotted, value in items:
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    check_paths: bool = True,
) -> PipelineConfig:
    """Load, resolve and validate a pipeline config. Raises ConfigError naming the key and value.

    ``check_paths`` also requires ``dataset.raw_dir`` to exist (off for tools that only read outputs).
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH
    path = Path(path).expanduser()
    if not path.is_absolute():
        # Relative config paths are taken from the working directory, then from the repository.
        path = path.resolve() if path.exists() else (REPO_ROOT / path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (set {CONFIG_ENV_VAR} to a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    raw = _resolve_paths(raw, path.parent.resolve())
    try:
        cfg = PipelineConfig(**raw, source_path=path.resolve())
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None
    if check_paths:
        check_raw_dir(cfg)
    return cfg


def check_raw_dir(cfg: PipelineConfig) -> None:
    """Fail early, naming the key, when the raw photo folder does not exist."""
    raw_dir = cfg.dataset.raw_dir
    if not raw_dir.is_dir():
        raise ConfigError(f"dataset.raw_dir = {str(raw_dir)!r} in {cfg.source_path}: folder does not exist")
