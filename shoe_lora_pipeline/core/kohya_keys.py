"""kohya / A1111 / ComfyUI key names of a UNet LoRA, for each model family.

A kohya-format LoRA names each adapted module ``lora_unet_<module path, dots as underscores>``. Which module
path depends on the family, because kohya-ss trains each on a different UNet implementation:

* SD1.x: kohya's UNet keeps diffusers' names, so ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_
  attn1_to_q`` (what ``diffusers.utils.convert_state_dict_to_kohya`` writes; A1111 and ComfyUI map it).
* SDXL: kohya's ``sdxl_train_network.py`` trains the original (LDM/SGM) UNet, so the files name its blocks:
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k``, ``lora_unet_middle_block_1_…``,
  ``lora_unet_output_blocks_2_1_…``. A1111 applies an SDXL LoRA only under these names (it swaps
  ``lora_unet`` for ``diffusion_model`` and looks the module up); ComfyUI and diffusers accept both.

Inside a block the LDM and diffusers transformers share every name (``transformer_blocks.N.attn1.to_q``,
``to_out.0``, ``proj_in``, ``norm``), so the map is one of block prefixes, derived from the UNet config
(``layers_per_block`` and the block types) and not a fixed table, which makes it hold for the
real SDXL UNet and for tiny-sdxl alike:

* ``down_blocks.{b}.attentions.{i}`` → ``input_blocks.{n}.1`` with ``n = 1 + Σ_{c<b} (layers_c + 1) + i``
  (input block 0 is ``conv_in``; each down block has ``layers`` blocks plus a downsampler slot);
* ``mid_block.attentions.0`` → ``middle_block.1`` (``middle_block.0`` / ``.2`` are its resnets);
* ``up_blocks.{b}.attentions.{i}`` → ``output_blocks.{n}.1`` with ``n = Σ_{c<b} (layers_c + 1) + i``, the
  up blocks' layer counts being the down blocks' reversed, plus one.

``shoe_lora_pipeline_tests/export/test_kohya_keys.py`` holds the SDXL table these rules give and reads
every name back through diffusers' own kohya reader. Only attention blocks are mapped: a LoRA on a resnet,
sampler or embedding is refused, by name, rather than written under a name no client finds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.families import ModelFamily

KOHYA_UNET_PREFIX = "lora_unet_"
_CROSS_ATTN = (
    "CrossAttn"  # diffusers' block types with attentions: CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, …
)
_DIFFUSERS_BLOCK = re.compile(
    r"^(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)\."
)
_LDM_BLOCK = re.compile(r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.")


class KohyaKeyError(ValueError):
    """A LoRA module has no kohya name in this UNet (or a kohya name no module); the message names it."""


def _per_block(value: Any, blocks: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * blocks


def ldm_attention_blocks(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers → LDM/SGM name of every attention block of a ``UNet2DConditionModel`` config, e.g.
    ``{"down_blocks.1.attentions.0": "input_blocks.4.1", "mid_block.attentions.0": "middle_block.1", …}``."""
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _per_block(unet_config.get("layers_per_block", 2), len(down_types))
    blocks: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for b, block_type in enumerate(down_types):
        for i in range(layers[b]):
            if _CROSS_ATTN in block_type:
                blocks[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{index + i}.1"
        index += layers[b] + 1  # the block's layers, then its downsampler's slot
    mid_type = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if _CROSS_ATTN in mid_type:
        blocks["mid_block.attentions.0"] = "middle_block.1"
    index = 0
    for b, (block_type, n_layers) in enumerate(zip(up_types, reversed(layers), strict=True)):
        for i in range(n_layers + 1):
            if _CROSS_ATTN in block_type:
                blocks[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{index + i}.1"
        index += n_layers + 1
    return blocks


@dataclass(frozen=True)
class KohyaUnetNames:
    """UNet module path (diffusers) ⇄ kohya module name (without the ``.lora_down.weight`` part)."""

    ldm_blocks: dict[str, str] | None  # diffusers → LDM attention blocks; None: kohya keeps diffusers names

    @property
    def style(self) -> str:
        return "ldm" if self.ldm_blocks is not None else "diffusers"

    def module_path(self, diffusers_module: str) -> str:
        """The module path kohya's UNet has for ``diffusers_module`` (``down_blocks.1.attentions.0.…``)."""
        if self.ldm_blocks is None:
            return diffusers_module
        m = _DIFFUSERS_BLOCK.match(diffusers_module)
        if not m or m.group(1) not in self.ldm_blocks:
            raise KohyaKeyError(
                f"LoRA module {diffusers_module!r} is not inside an attention block of this UNet; the kohya "
                "SDXL (LDM) names are written for attention blocks only"
            )
        return self.ldm_blocks[m.group(1)] + diffusers_module[m.end(1) :]

    def diffusers_path(self, module_path: str) -> str:
        """The inverse of :meth:`module_path`."""
        if self.ldm_blocks is None:
            return module_path
        m = _LDM_BLOCK.match(module_path)
        inverse = {v: k for k, v in self.ldm_blocks.items()}
        if not m or m.group(1) not in inverse:
            raise KohyaKeyError(f"kohya module {module_path!r} is not an attention block of this UNet")
        return inverse[m.group(1)] + module_path[m.end(1) :]

    def kohya_name(self, diffusers_module: str) -> str:
        """``lora_unet_<path with _>`` for a diffusers module path."""
        return KOHYA_UNET_PREFIX + self.module_path(diffusers_module).replace(".", "_")

    def rename(self, peft_state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT UNet keys (``<module>.lora_A.weight``) with kohya's module paths, ready for diffusers'
        ``convert_state_dict_to_kohya`` (which only swaps the dots)."""
        out = {}
        for key, value in peft_state_dict.items():
            module, _, tail = key.partition(".lora_")
            out[f"{self.module_path(module)}.lora_{tail}"] = value
        return out


def kohya_unet_names(family: ModelFamily, unet_config: Mapping[str, Any]) -> KohyaUnetNames:
    """The naming kohya files of ``family`` use, for the UNet of ``unet_config``
    (:attr:`ModelFamily.kohya_names_ldm_blocks`)."""
    return KohyaUnetNames(ldm_attention_blocks(unet_config) if family.kohya_names_ldm_blocks else None)
