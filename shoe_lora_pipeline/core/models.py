"""Base models: the real SD1.5 / SDXL loader and the tiny SD- and SDXL-shaped models built offline.

``tiny-sd`` has exactly the classes of Stable Diffusion 1.5 (UNet2DConditionModel with cross-attention
blocks, a 4-level AutoencoderKL so latents are 1/8 of the image side, CLIPTextModel with the real
49,408-token CLIP vocabulary, CLIPTokenizer, the SD1.5 scheduler config) at tiny widths. It is built
deterministically, saved as a diffusers folder in safetensors, and then loaded through the very same code
path as a real SD1.5 folder, so tests exercise the production loader. ``tiny-sdxl`` is the same for
SDXL: a UNet with ``text_time`` added conditions, CLIPTextModel + CLIPTextModelWithProjection (each with the
real vocabulary), the SDXL VAE scaling and the Euler scheduler, loadable by StableDiffusionXLPipeline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoe_lora_pipeline.core.families import SD15, SDXL, ModelFamily, family_of_folder, resolve_family
from shoe_lora_pipeline.core.fsutil import apply_umask_tree

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_SD = "tiny-sd"
# The pretrained demo base model (tiny-sd's classes and widths, trained on drawn shoes by
# scripts/pretrain_demo_model.py); its weights are committed in the repository, never built at run time.
TINY_SHOES = "tiny-shoes"
TINY_SHOES_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / TINY_SHOES
# Bump when the tiny model's architecture or init changes: it is part of the cache folder name and of
# the base-model identity recorded in checkpoints and exported files.
TINY_SD_VERSION = "2"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_SDXL = "tiny-sdxl"
TINY_SDXL_VERSION = "1"  # as TINY_SD_VERSION, for tiny-sdxl
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"

# The published SD1.5 component configs (unet/config.json, vae/config.json, text_encoder/config.json,
# scheduler/scheduler_config.json), kept here so the architecture can be checked offline.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# The published SDXL base 1.0 component configs (unet/config.json, vae/config.json, text_encoder_2/
# config.json, scheduler/scheduler_config.json; text_encoder is SD1.5's CLIP ViT-L), for the offline check.
SDXL_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 6 time_ids x 256 + the 1280-wide pooled embedding of text_encoder_2.
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # the SDXL VAE overflows in fp16
}
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    # No attention at the full latent resolution (4,096 tokens at 512 px): on a CPU that one block costs
    # 5× the rest of the model. Cross-attention runs at 1/2 and 1/4 of the latent side and in the mid block.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    # Four levels as in SD1.5 (three downsamplings): latents are 1/8 of the image side.
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 64,
}

# tiny-sdxl: SDXL's layout (no attention at the full latent side, more transformer layers deeper down,
# linear projections, text_time added conditions) at tiny-sd's widths. The UNet cross-attends to both text
# encoders' hidden states side by side (32 + 32), as SDXL's does to 768 + 1280.
TINY_SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **TINY_TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
}
TINY_SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **TINY_SDXL_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
}
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "cross_attention_dim": 64,
    "addition_embed_type_num_heads": 8,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "norm_num_groups": 16,
    "sample_size": 32,
}
TINY_SDXL_VAE_CONFIG: dict[str, Any] = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}


class BaseModelError(RuntimeError):
    """The base model could not be loaded; the message says what to do about it."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model (SD1.5 or SDXL, see ``family``) the pipeline uses.

    SDXL adds a second tokenizer and text encoder (``tokenizer_2`` / ``text_encoder_2``, the CLIP text model
    with projection whose pooled output conditions the UNet); for SD1.5 they are None.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin  # inference scheduler as shipped with the model
    identity: dict[str, Any]  # base model id, revision/hash, where it was loaded from, family
    family: ModelFamily = SD15
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        """The family's tokenizers in order (one for SD1.5, two for SDXL)."""
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The family's text encoders in order (one for SD1.5, two for SDXL)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def noise_scheduler(self) -> DDPMScheduler:
        """DDPM scheduler for training, with the model's own betas and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    def pipeline(
        self, unet: torch.nn.Module | None = None
    ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """The family's text-to-image pipeline of these components (``unet`` instead of the base one, e.g.
        with a LoRA), with a fresh copy of the scheduler: multistep schedulers (PNDM, DPM++) keep state
        between calls."""
        pipeline_class = self.family.text2img_pipeline_class()
        return pipeline_class(**self._pipeline_components(unet))

    def img2img_pipeline(
        self, unet: torch.nn.Module | None = None
    ) -> StableDiffusionImg2ImgPipeline | StableDiffusionXLImg2ImgPipeline:
        """The family's image-to-image pipeline of the same components (no extra weights)."""
        pipeline_class = self.family.img2img_pipeline_class()
        return pipeline_class(**self._pipeline_components(unet))

    def _pipeline_components(self, unet: torch.nn.Module | None) -> dict[str, Any]:
        parts: dict[str, Any] = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": unet if unet is not None else self.unet,
            "scheduler": type(self.scheduler).from_config(self.scheduler.config),
        }
        if self.family.uses_added_conditions:
            # No invisible watermark: published files carry the IPTC/C2PA marks instead, and an optional
            # package being installed must not change the pixels.
            parts.update(
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, add_watermarker=False
            )
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return parts

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def default_cache_dir() -> Path:
    env = os.environ.get("SHOE_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shoe_lora_pipeline"


def clip_tokenizer_files(target_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of the real CLIP BPE tokenizer from open_clip's vocab file."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    # Same slice as CLIP's reference tokenizer: 48,894 merges + 512 byte tokens + 2 specials = 49,408.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    target_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = target_dir / "vocab.json", target_dir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(vocab_file: Path, merges_file: Path, pad_token: str = "<|endoftext|>") -> Any:
    """CLIPTokenizer configured as SD1.5's: 77-token context, end-of-text as padding (SDXL's second: "!")."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)


def build_tiny_sd(target_dir: Path) -> Path:
    """Build the tiny SD-shaped pipeline deterministically and save it as a diffusers folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(*clip_tokenizer_files(Path(tmp)))

    # Each component gets its own seed so changing one never changes another's weights.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG))
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_model_folder(pipe, target_dir, ".tiny-sd-")


def tiny_sd_path(cache_dir: Path | None = None) -> Path:
    """Folder of the tiny model, built on first use."""
    path = (cache_dir or default_cache_dir()) / f"tiny-sd-v{TINY_SD_VERSION}"
    if not (path / "model_index.json").exists():
        build_tiny_sd(path)
    return path


def _save_model_folder(pipe: Any, target_dir: Path, prefix: str) -> Path:
    """Save a pipeline as a diffusers folder next to the target and rename it into place, so a concurrent
    or interrupted build never leaves half a model."""
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=target_dir.parent))
    try:
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        apply_umask_tree(tmp_dir)  # mkdtemp made it 0700 and safetensors writes 0600
        try:
            os.replace(tmp_dir, target_dir)
        except OSError:
            if not (target_dir / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target_dir


def build_tiny_sdxl(target_dir: Path) -> Path:
    """Build the tiny SDXL-shaped pipeline deterministically and save it as a diffusers folder."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        files = clip_tokenizer_files(Path(tmp))
        tokenizer = clip_tokenizer(*files)
        # SDXL's second tokenizer (OpenCLIP bigG's) pads with "!" (token 0), not with end-of-text.
        tokenizer_2 = clip_tokenizer(*files, pad_token="!")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_SDXL_VAE_CONFIG)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_CONFIG))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2_CONFIG))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _save_model_folder(pipe, target_dir, ".tiny-sdxl-")


def tiny_sdxl_path(cache_dir: Path | None = None) -> Path:
    """Folder of the tiny SDXL model, built on first use."""
    path = (cache_dir or default_cache_dir()) / f"tiny-sdxl-v{TINY_SDXL_VERSION}"
    if not (path / "model_index.json").exists():
        build_tiny_sdxl(path)
    return path


def _folder_fingerprint(folder: Path) -> str:
    """Content fingerprint of a diffusers folder: config files fully, weight files by size + header.

    Hashing every byte of a 4 GB checkpoint on each run would dominate small runs; the safetensors header
    (names, dtypes, shapes, offsets) plus the file size changes whenever the weights file is replaced.
    """
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        h.update(rel.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        if p.suffix in {".json", ".txt"} or size < 64 * 1024 * 1024:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            with p.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(header_len, 16 * 1024 * 1024)))
    return h.hexdigest()


# Weight files of a diffusers SD folder, one per trained component.
WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
)


def check_weight_files(folder: Path, what: str) -> dict[str, list[str]]:
    """Tensor names per weight file of a committed model; a missing or unreadable file raises.

    The committed demo model must never be replaced by freshly initialised weights: diffusers and
    transformers initialise randomly whatever a file lacks, so the files are checked before loading.
    """
    from safetensors import safe_open

    names: dict[str, list[str]] = {}
    for rel in WEIGHT_FILES:
        path = folder / rel
        if not path.is_file():
            raise BaseModelError(
                f"{what}: weight file {path} is missing (a fresh clone has it: `git checkout -- {path}`; "
                "or retrain with scripts/pretrain_demo_model.py --force)"
            )
        head = path.read_bytes()[:64]
        if head.startswith(b"version https://git-lfs"):
            raise BaseModelError(f"{what}: weight file {path} is a Git LFS pointer, not the weights")
        try:
            with safe_open(str(path), framework="pt") as f:
                names[rel] = list(f.keys())
                for key in names[rel]:
                    f.get_slice(key).get_shape()
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError for a bad file
            raise BaseModelError(
                f"{what}: weight file {path} is corrupt or truncated ({type(exc).__name__}: {exc})"
            ) from None
        if not names[rel]:
            raise BaseModelError(f"{what}: weight file {path} holds no tensors")
    return names


def tiny_shoes_path(folder: Path | None = None) -> Path:
    """Folder of the committed tiny-shoes model, its weight files checked (never a random fallback)."""
    folder = folder or TINY_SHOES_DIR
    what = f"base model {TINY_SHOES!r}"
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(
            f"{what}: {folder / 'model_index.json'} is missing; the model is committed under {folder} "
            "(restore it with git, or rebuild it with scripts/pretrain_demo_model.py)"
        )
    check_weight_files(folder, what)
    return folder


def resolve_base_model(base_model: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """Local folder holding the diffusers-layout base model (building tiny-sd or reading the hub cache)."""
    if base_model == TINY_SD:
        return tiny_sd_path(cache_dir)
    if base_model == TINY_SDXL:
        return tiny_sdxl_path(cache_dir)
    if base_model == TINY_SHOES:
        return tiny_shoes_path()
    candidate = Path(base_model).expanduser()
    if candidate.is_dir():
        if not (candidate / "model_index.json").exists() and not (candidate / "unet").is_dir():
            raise BaseModelError(
                f"training.base_model = {base_model!r} is a folder but not a diffusers model "
                "(no model_index.json / unet/): save it with StableDiffusionPipeline (or StableDiffusionXLPipeline)"
                ".save_pretrained"
            )
        return candidate
    if candidate.is_absolute() or base_model.startswith((".", "~")):
        raise BaseModelError(f"training.base_model = {base_model!r}: folder does not exist")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        return Path(
            snapshot_download(
                base_model,
                revision=revision,
                allow_patterns=["*.json", "*.txt", "*.safetensors"],
                ignore_patterns=["*.fp16.*", "*non_ema*", "*ema*", "safety_checker/*"],
                local_files_only=offline,
            )
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not here"
        raise BaseModelError(
            f"could not load base model {base_model!r}"
            f"{' at revision ' + revision if revision else ''}: {type(exc).__name__}: {exc}\n"
            "This machine has no copy of it and cannot download it"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Either download it first on a machine "
            f"with network access (`huggingface-cli download {base_model}`, then copy the cache or set "
            "HF_HOME), or set training.base_model to a local diffusers folder."
        ) from None


def resolve_vae(vae: str) -> Path:
    """Local folder of a separately configured VAE (``training.vae``): a folder holding an AutoencoderKL's
    config.json and safetensors, or a hub id in the local hub cache (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    candidate = Path(vae).expanduser()
    if candidate.is_dir() or candidate.is_absolute() or vae.startswith((".", "~")):
        if not (candidate / "config.json").is_file():
            raise BaseModelError(
                f"training.vae = {vae!r}: no AutoencoderKL folder there (config.json missing); save one with "
                "AutoencoderKL.save_pretrained"
            )
        return candidate
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(vae, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not here"
        raise BaseModelError(
            f"training.vae = {vae!r}: not in the local hub cache ({type(exc).__name__}: {exc}); download it on "
            f"a machine with network access (`huggingface-cli download {vae}`) or set a local folder"
        ) from None


def base_model_identity(
    base_model: str, folder: Path, revision: str | None = None, vae: str | None = None
) -> dict[str, Any]:
    """What an auditor needs to know which base model a LoRA was trained on (and the VAE that replaced
    its own, ``training.vae``: its fingerprint is then part of the base model's)."""
    ident: dict[str, Any] = {"base_model": base_model, "path": str(folder)}
    if base_model == TINY_SD:
        ident["revision"] = f"tiny-sd-v{TINY_SD_VERSION}"
    elif base_model == TINY_SDXL:
        ident["revision"] = f"tiny-sdxl-v{TINY_SDXL_VERSION}"
    elif base_model == TINY_SHOES:
        ident["revision"] = "committed in data/models/tiny-shoes (see its training.json)"
    elif folder.parent.name == "snapshots":
        # Hub cache layout: .../models--org--name/snapshots/<commit>/
        ident["revision"] = folder.name
    else:
        ident["revision"] = revision
    ident["fingerprint"] = _folder_fingerprint(folder)
    # SD1.5 identities stay as they were recorded before families existed; other families say theirs.
    if (folder / "unet" / "config.json").is_file() and (family := family_of_folder(folder)) is not SD15:
        ident["family"] = family.name
    if vae:
        vae_folder = resolve_vae(vae)
        vae_fingerprint = _folder_fingerprint(vae_folder)
        ident["vae"] = {"vae": vae, "path": str(vae_folder), "fingerprint": vae_fingerprint}
        ident["fingerprint"] = hashlib.sha256(f"{ident['fingerprint']}+vae:{vae_fingerprint}".encode()).hexdigest()
    return ident


def load_base_model(
    base_model: str,
    revision: str | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    model_family: str = "auto",
    vae: str | None = None,
) -> SDComponents:
    """Load the tokenizer(s), text encoder(s), VAE, UNet and scheduler from safetensors; frozen, in eval mode.

    The family (SD1.5 or SDXL) is read from the model folder; ``model_family`` (``training.model_family``)
    may insist on one, and a model of the other family is then an error naming the key and what was found.
    ``vae`` (``training.vae``) replaces the model's VAE, e.g. an fp16-fixed SDXL VAE; the identity then
    records it and its fingerprint is part of the base model's (latent caches are keyed by it).
    """
    import diffusers
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = resolve_base_model(base_model, revision, cache_dir)
    family = resolve_family(family_of_folder(folder), model_family, f"base model {base_model!r} ({folder})")
    try:
        tokenizers = [
            CLIPTokenizer.from_pretrained(folder, subfolder=sub) for sub in family.tokenizer_subfolders
        ]
        text_encoders = [
            family.text_encoder_class(i).from_pretrained(
                folder, subfolder=sub, use_safetensors=True, torch_dtype=dtype
            )
            for i, sub in enumerate(family.text_encoder_subfolders)
        ]
        vae_folder = resolve_vae(vae) if vae else None
        autoencoder = AutoencoderKL.from_pretrained(
            *((vae_folder,) if vae_folder else (folder,)),
            **({} if vae_folder else {"subfolder": "vae"}),
            use_safetensors=True,
            torch_dtype=dtype,
        )
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", use_safetensors=True, torch_dtype=dtype
        )
        # SD1.5 folders ship PNDM (as loaded since the first release); SDXL the scheduler its folder names.
        scheduler_class = PNDMScheduler
        if family is SDXL:
            scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            scheduler_class = getattr(
                diffusers, scheduler_config.get("_class_name", "EulerDiscreteScheduler")
            )
        scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, AttributeError) as exc:
        raise BaseModelError(
            f"base model folder {folder} is incomplete or not in safetensors format: {exc}"
        ) from None
    if base_model == TINY_SHOES and vae_folder is None:
        _check_all_weights_loaded(folder, {"text_encoder": text_encoders[0], "vae": autoencoder, "unet": unet})
    for module in (*text_encoders, autoencoder, unet):
        module.requires_grad_(False)
        module.eval()
    identity = base_model_identity(base_model, folder, revision, vae)
    return SDComponents(
        tokenizer=tokenizers[0],
        text_encoder=text_encoders[0],
        vae=autoencoder,
        unet=unet,
        scheduler=scheduler,
        identity=identity,
        family=family,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
        text_encoder_2=text_encoders[1] if len(text_encoders) > 1 else None,
    )


def _check_all_weights_loaded(folder: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Every parameter of a committed model must come from its file (a missing tensor would be random)."""
    names = check_weight_files(folder, f"base model at {folder}")
    for rel in WEIGHT_FILES:
        component = rel.split("/")[0]
        in_file = set(names[rel])
        missing = [n for n, _ in modules[component].named_parameters() if n not in in_file]
        if missing:
            raise BaseModelError(
                f"weight file {folder / rel} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}; "
                "they would be randomly initialised"
            )


def lora_config(
    rank: int, alpha: float, dropout: float, target_modules: list[str], init_lora_weights: bool | str = True
) -> LoraConfig:
    """The peft LoraConfig used for training (and to rebuild the adapter when loading)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights=init_lora_weights,
    )


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def sd15_unet_lora_parameter_counts(
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
) -> tuple[int, int]:
    """Build the SD1.5 UNet on the meta device (no memory, no weights), add the LoRA and count."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, 0.0, list(target_modules)))
    return count_parameters(unet)


def unet_lora_parameter_counts(
    unet_config: dict[str, Any],
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
) -> tuple[int, int, int]:
    """Build a UNet on the meta device (no memory, no weights), add the LoRA and count:
    (trainable, total, adapted attention layers, i.e. modules named ``to_q`` that got a LoRA)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, 0.0, list(target_modules)))
    trainable, total = count_parameters(unet)
    layers = sum(1 for name, m in unet.named_modules() if name.endswith("to_q") and hasattr(m, "lora_A"))
    return trainable, total, layers


def sdxl_unet_lora_parameter_counts(
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
) -> tuple[int, int, int]:
    """The SDXL base UNet's counts with the LoRA, on the meta device: (trainable, total, attention layers)."""
    return unet_lora_parameter_counts(SDXL_UNET_CONFIG, rank, alpha, target_modules)
