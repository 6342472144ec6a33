#!/usr/bin/env python
"""Measure a base model with the project's weight-free QA: the four validation prompts x N seeds.

Usage: ``python scripts/measure_demo_model.py [--model data/models/tiny-shoes] [--seeds 16] [--out DIR]``

Prints (and writes ``qa.json`` into ``--out``) the shares the tiny-shoes model card quotes: a single
centred shoe-shaped object in the prompt's colour ("product shot"), white background, and each check.
Generation is the evaluation stage's own (:func:`generate_images`: one CPU generator per image seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from shoe_lora_pipeline.core.config import VALIDATION_PROMPTS
from shoe_lora_pipeline.core.evaluation.generate import generate_images
from shoe_lora_pipeline.core.evaluation.qa import run_qa
from shoe_lora_pipeline.core.models import TINY_SHOES_DIR, load_base_model

SHARES = (
    "product_shot_share",
    "white_background_share",
    "centred_share",
    "single_object_share",
    "fill_share",
    "colour_respected_share",
)


def measure(
    model: Path, seeds: int, steps: int, guidance: float, resolution: int, out: Path, seed: int = 0
) -> dict[str, object]:
    pipe = load_base_model(str(model)).pipeline()
    started = time.perf_counter()
    images = generate_images(
        pipe, VALIDATION_PROMPTS, seeds, seed, steps, guidance, resolution, resolution, out, "base"
    )
    summary = run_qa(images, VALIDATION_PROMPTS, 6.0)
    result = {
        "model": str(model),
        "images": len(images),
        "settings": {"seeds": seeds, "steps": steps, "guidance": guidance, "resolution": resolution},
        "seconds": round(time.perf_counter() - started, 1),
        **{k: getattr(summary, k) for k in SHARES},
        "per_prompt": [
            {k: p[k] for k in ("prompt", *SHARES, "measured_colours")} for p in summary.per_prompt
        ],
    }
    (out / "qa.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY_SHOES_DIR)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    # configs/demo.yaml's guidance (7.5 over-saturates this small v-prediction model's colours)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--card", action="store_true", help="write the numbers into the model's README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="tiny-shoes-qa-"))
    r = measure(args.model, args.seeds, args.steps, args.guidance, args.resolution, out)
    for k in SHARES:
        print(f"{k:24s} {r[k]}")
    for pp in r["per_prompt"]:
        print(pp["prompt"][:60], {k: pp[k] for k in SHARES})
    print(f"images and qa.json in {out} ({r['seconds']} s)")
    if args.card:
        write_card_section(args.model / "README.md", r, " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


CARD_HEADING = "## Measured with the project's QA"


def write_card_section(readme: Path, r: dict[str, object], args: str) -> None:
    """Replace the model card's measured section with these numbers."""
    text = readme.read_text()
    text = text.split(CARD_HEADING)[0].rstrip() + "\n\n"
    s = r["settings"]
    lines = [
        CARD_HEADING,
        "",
        f"`python scripts/measure_demo_model.py {args}`: the four validation prompts x {s['seeds']} seeds, "
        f"{s['steps']} PNDM steps (the folder's scheduler config: betas, prediction type, timestep spacing), "
        f"guidance {s['guidance']}, {s['resolution']} px, weight-free QA "
        '(core/evaluation/qa.py). "Product shot" = a single centred shoe-shaped object that fills the frame '
        "sensibly, in the prompt's colour, on any plain backdrop.",
        "",
        "| Prompt | Product shot | White background | Centred | Single object | Fill | Colour |",
        "|---|---|---|---|---|---|---|",
    ]

    def pct(v: object) -> str:
        return "—" if v is None else f"{100 * float(v):.0f}%"

    for pp in r["per_prompt"]:
        lines.append(
            f"| {pp['prompt']} | "
            + " | ".join(pct(pp[k]) for k in SHARES[:5])
            + f" | {pct(pp['colour_respected_share'])} |"
        )
    lines.append(f"| **all {r['images']} images** | " + " | ".join(f"**{pct(r[k])}**" for k in SHARES) + " |")
    readme.write_text(text + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
