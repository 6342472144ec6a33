"""The kohya/A1111/ComfyUI key names of SDXL LoRAs, checked at architecture level (meta-device UNets).

The expected tables are facts about the LDM/SGM UNet layout that the kohya SDXL trainer, A1111 and ComfyUI
share: input block 0 is conv_in; down block b contributes ``layers_per_block`` blocks and a downsampler,
each attention at ``<index>.1``; the middle block's attention is ``middle_block.1``; the up blocks have one
layer more. A1111 applies an SDXL LoRA by swapping ``lora_unet`` for ``diffusion_model`` in exactly these
names; for SD1.x it converts the diffusers names with input ``1 + 3b + i`` / output ``3b + i`` (the second
table). diffusers' own kohya reader (``lora_state_dict`` with the UNet config) is run on every name below.
"""

from __future__ import annotations

import re

import pytest
import torch

from shoe_lora_pipeline.core.families import SD15, SDXL
from shoe_lora_pipeline.core.kohya_keys import (
    KohyaKeyError,
    KohyaUnetNames,
    kohya_unet_names,
    ldm_attention_blocks,
)
from shoe_lora_pipeline.core.lora_io import peft_to_kohya
from shoe_lora_pipeline.core.models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, TINY_SDXL_UNET_CONFIG

TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

SDXL_BLOCKS = {
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.attentions.2": "output_blocks.5.1",
}
# Transformer depth of each SDXL attention block (transformer_layers_per_block [1, 2, 10]; the mid block
# and the up blocks repeat the deepest / their level's depth).
SDXL_DEPTH = {"input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10,
              "middle_block.1": 10, **{f"output_blocks.{i}.1": 10 for i in range(3)},
              **{f"output_blocks.{i}.1": 2 for i in range(3, 6)}}  # fmt: skip


def meta_unet(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def lora_modules(unet: torch.nn.Module) -> list[str]:
    return [n for n, _ in unet.named_modules() if re.search(r"\.attn[12]\.(to_k|to_q|to_v|to_out\.0)$", n)]


def test_sdxl_attention_blocks_are_the_ldm_blocks() -> None:
    assert ldm_attention_blocks(SDXL_UNET_CONFIG) == SDXL_BLOCKS
    # 70 transformer blocks of two attentions each: the 140 attention layers of the SDXL UNet.
    assert sum(SDXL_DEPTH.values()) * 2 == 140


def test_sd15_attention_blocks_follow_a1111s_conversion() -> None:
    expected = {
        f"down_blocks.{b}.attentions.{i}": f"input_blocks.{1 + 3 * b + i}.1"
        for b in range(3)
        for i in range(2)
    }
    expected["mid_block.attentions.0"] = "middle_block.1"
    expected |= {
        f"up_blocks.{b}.attentions.{i}": f"output_blocks.{3 * b + i}.1" for b in (1, 2, 3) for i in range(3)
    }
    assert ldm_attention_blocks(SD15_UNET_CONFIG) == expected


def test_every_sdxl_attention_layer_maps_one_to_one_and_back() -> None:
    unet = meta_unet(SDXL_UNET_CONFIG)
    modules = lora_modules(unet)
    assert len(modules) == 140 * len(TARGETS)
    names = kohya_unet_names(SDXL, unet.config)
    kohya = {names.kohya_name(m): m for m in modules}
    assert len(kohya) == len(modules)  # 1:1
    pattern = re.compile(
        r"^lora_unet_(input_blocks_[4578]_1|middle_block_1|output_blocks_[0-5]_1)_transformer_blocks_(\d+)_"
        r"attn[12]_(to_k|to_q|to_v|to_out_0)$"
    )
    for name, module in kohya.items():
        m = pattern.match(name)
        assert m, name
        block = m.group(1).replace("_", ".").replace("input.blocks", "input_blocks").replace(
            "output.blocks", "output_blocks").replace("middle.block", "middle_block")  # fmt: skip
        assert int(m.group(2)) < SDXL_DEPTH[block], name
        assert names.diffusers_path(names.module_path(module)) == module  # and back
    # The example a kohya SDXL file starts with.
    assert names.kohya_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k") == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"
    )
    assert names.kohya_name("mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0") == (
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0"
    )


def test_sd15_kohya_names_stay_diffusers_names() -> None:
    names = kohya_unet_names(SD15, SD15_UNET_CONFIG)
    assert names.style == "diffusers"
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names.kohya_name(module) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("config", [SDXL_UNET_CONFIG, TINY_SDXL_UNET_CONFIG], ids=["sdxl", "tiny-sdxl"])
def test_diffusers_kohya_reader_maps_every_sdxl_name_back(config: dict) -> None:
    """The file our export writes (peft_to_kohya with the SDXL names) read by diffusers' kohya reader
    (StableDiffusionXLPipeline.lora_state_dict with the UNet config): every layer comes back to its own
    module, with its alpha."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = meta_unet(config)
    modules = lora_modules(unet)
    peft = {}
    for i, module in enumerate(modules):  # tiny tensors: only the names are under test here
        peft[f"{module}.lora_A.weight"] = torch.full((1, 2), float(i))
        peft[f"{module}.lora_B.weight"] = torch.full((2, 1), float(i))
    kohya = peft_to_kohya(peft, alpha=2.0, names=kohya_unet_names(SDXL, unet.config))
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in kohya)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=unet.config)
    assert all(k.startswith("unet.") for k in state_dict)
    # diffusers' legacy layout (…attn1.processor.to_q_lora.down.weight) → PEFT keys, as its loader does.
    peft_back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    back: dict[str, set[int]] = {}
    for key, tensor in peft_back.items():
        module = re.sub(r"\.lora_[AB]\.weight$", "", key)
        back.setdefault(module, set()).add(int(tensor.flatten()[0].item()))
    assert back == {m: {i} for i, m in enumerate(modules)}
    assert len(alphas) == len(modules) and set(alphas.values()) == {2.0}


def test_a_lora_outside_attention_blocks_is_refused_by_name() -> None:
    names = kohya_unet_names(SDXL, SDXL_UNET_CONFIG)
    with pytest.raises(KohyaKeyError, match="down_blocks.0.resnets.0.conv1"):
        names.kohya_name("down_blocks.0.resnets.0.conv1")
    with pytest.raises(KohyaKeyError, match="input_blocks.1.1"):  # SDXL has no attention at input block 1
        names.diffusers_path("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert KohyaUnetNames(None).diffusers_path("anything.at.all") == "anything.at.all"
