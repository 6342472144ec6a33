"""Images/s of product renders: our batched path against a plain ``StableDiffusionPipeline.__call__``.

Both sides get the same prompts (one per image, SKUs × candidates), the same per-image seeds, the same
scheduler (DPM++ 2M), steps, size, guidance and dtype, and the same LoRA (r=8 on to_q/k/v/out.0, random):

* ``plain``: the LoRA loaded the usual diffusers way (``pipe.load_lora_weights``: peft layers run at every
  step), one ``pipe(prompt=[B prompts], …)`` call per batch of B images;
* ``plain per SKU`` (B=8 only): the natural loop, one call per SKU with its 4 candidates;
* ``ours``: ``core.renders``' path: the LoRA fused into the weights (what ``final_pipeline`` holds),
  ``optimise_pipeline``'s levers (CUDA: channels_last, fused QKV projections; SDPA is the default on both
  sides) and ``render_batches`` with B images per call across SKUs;
* ``ours + compile`` (CUDA): plus ``torch.compile`` of the UNet; its warm-up (compile) time is reported.

Each variant: one 2-step warm-up call (kernel selection; the compile for ``+ compile``), then timed calls
with the full settings; the median call gives images/s. ``ratio`` = images/s over ``plain`` at the same B.
``Δ vs plain`` = mean absolute pixel difference (0–255) of the same seeds against ``plain`` (0 up to
rounding in fp32; bf16 + fused weights drift further on random weights, which amplify differences).

    python benchmarks/renders.py --smoke --out /tmp/bench            # tiny widths, CPU fp32, ~1 min
    python benchmarks/renders.py --out DIR --tokenizer-dir TOK        # SD1.5 architecture, CUDA bf16

The CUDA run needs no network and no open_clip: write the CLIP tokenizer files once on a machine that has
open_clip (``python benchmarks/renders.py --write-tokenizer TOK``) and carry ``TOK``. ``--budget-s``
(default 110) skips variants that would not fit; progress is printed as it goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sd15_gpu import random_sd15  # noqa: E402

from shoe_lora_pipeline.core import models  # noqa: E402
from shoe_lora_pipeline.core.renders.generate import (  # noqa: E402
    RenderJob,
    candidate_seed,
    compile_pipeline_unet,
    optimise_pipeline,
    render_batches,
    set_sampler,
)

CANDIDATES_PER_SKU = 4
COLOURS = ["black", "brown", "white", "navy", "red", "grey", "beige", "green"]
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
STARTED = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {msg}", flush=True)


def build_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    pipe = random_sd15(args.tokenizer_dir, device, dtype, smoke=args.smoke).pipeline()
    set_sampler(pipe, "dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(unet: Any, rank: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (``unet.<module>.lora_A/B.weight``) for every attention projection."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if ".attn" in name and name.endswith(LORA_TARGETS) and isinstance(module, torch.nn.Linear):
            a = torch.randn(rank, module.in_features, generator=gen) * 0.02
            b = torch.randn(module.out_features, rank, generator=gen) * 0.02
            out[f"unet.{name}.lora_A.weight"] = a.to(module.weight.dtype)
            out[f"unet.{name}.lora_B.weight"] = b.to(module.weight.dtype)
    return out


def jobs_for(batch: int) -> list[RenderJob]:
    """``batch`` images: SKUs of CANDIDATES_PER_SKU candidates each, as product_renders makes them."""
    out = []
    for i in range(batch):
        sku = f"BENCH-{i // CANDIDATES_PER_SKU}"
        colour = COLOURS[(i // CANDIDATES_PER_SKU) % len(COLOURS)]
        prompt = f"A professional product photo of {colour} casual shoes on white background, side view"
        out.append(RenderJob(sku, i % CANDIDATES_PER_SKU, prompt, "blurry, text", candidate_seed(0, sku, i)))
    return out


def plain_call(pipe: Any, jobs: list[RenderJob], args: argparse.Namespace, steps: int) -> list[Any]:
    return pipe(
        prompt=[j.prompt for j in jobs],
        negative_prompt=[j.negative_prompt for j in jobs],
        height=args.size,
        width=args.size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
        output_type="pil",
    ).images


def plain_per_sku(pipe: Any, jobs: list[RenderJob], args: argparse.Namespace, steps: int) -> list[Any]:
    images = []
    for start in range(0, len(jobs), CANDIDATES_PER_SKU):
        images += plain_call(pipe, jobs[start : start + CANDIDATES_PER_SKU], args, steps)
    return images


def ours_call(pipe: Any, jobs: list[RenderJob], args: argparse.Namespace, steps: int) -> list[Any]:
    images: list[Any] = []
    render_batches(
        pipe,
        jobs,
        steps=steps,
        guidance_scale=7.5,
        size=args.size,
        batch_size=len(jobs),
        on_batch=lambda _jobs, imgs: images.extend(imgs),
    )
    return images


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(
    variants: list[tuple[str, Any, Any]], batch: int, args: argparse.Namespace, reps: int
) -> list[dict[str, Any]]:
    """Time ``variants`` (name, call, pipeline) at one batch size, interleaved call by call (A B A B …), so
    load from other processes on a shared machine hits every variant alike."""
    jobs = jobs_for(batch)
    rows = {name: {"variant": name, "batch": batch, "calls": []} for name, _, _ in variants}
    for name, fn, pipe in variants:
        say(f"{name} B={batch}: warm-up")
        t0 = time.perf_counter()
        fn(pipe, jobs, args, 2)
        sync()
        rows[name]["warmup_s"] = round(time.perf_counter() - t0, 1)
    for r in range(reps):
        for name, fn, pipe in variants:
            t0 = time.perf_counter()
            rows[name]["_images"] = fn(pipe, jobs, args, args.steps)
            sync()
            rows[name]["calls"].append(round(time.perf_counter() - t0, 3))
            say(f"{name} B={batch}: call {r + 1}/{reps} {rows[name]['calls'][-1]:.2f}s")
    for row in rows.values():
        sec = statistics.median(row["calls"])
        row.update(s_per_batch=round(sec, 3), images_per_s=round(batch / sec, 3))
        print(json.dumps({k: v for k, v in row.items() if k != "_images"}), flush=True)
    return list(rows.values())


def mean_abs_diff(a: list[Any], b: list[Any]) -> float:
    return round(
        float(
            np.mean(
                [
                    np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean()
                    for x, y in zip(a, b, strict=True)
                ]
            )
        ),
        3,
    )


def fits(need_s: float, args: argparse.Namespace, name: str) -> bool:
    left = args.budget_s - (time.perf_counter() - STARTED)
    if left < need_s:
        say(f"skipping {name}: needs ~{need_s:.0f}s, {left:.0f}s of --budget-s left")
        return False
    return True


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    say(f"building the {'tiny' if args.smoke else 'SD1.5'} pipeline on {device} ({dtype})")
    plain = build_pipeline(args, device, dtype)
    ours = copy.deepcopy(plain)  # the same weights; each side gets the same LoRA its own way
    lora = random_lora(plain.unet)
    plain.load_lora_weights(lora)  # peft layers at inference: how diffusers applies a LoRA
    ours.load_lora_weights(lora)
    ours.fuse_lora()
    ours.unload_lora_weights()  # as final_pipeline / load_render_pipeline: fused weights, no peft layers
    levers = optimise_pipeline(ours, torch.device(device)) or ["no further levers on CPU"]
    say(f"ours: fused LoRA + {', '.join(levers)}")
    rows: list[dict[str, Any]] = []
    last_s = 5.0  # seconds per call guessed before the first measurement

    for batch in args.batches:
        variants = [("plain", plain_call, plain), ("ours", ours_call, ours)]
        if batch == args.batches[0]:
            variants.insert(1, (f"plain per SKU ({CANDIDATES_PER_SKU}/call)", plain_per_sku, plain))
        if fits(last_s * batch / args.batches[0] * len(variants) * (args.reps + 1), args, f"B={batch}"):
            rows += measure(variants, batch, args, args.reps)
            last_s = rows[-1]["s_per_batch"] * args.batches[0] / batch
            write_results(rows, args)

    if args.smoke and not args.compile_on_cpu:
        say("ours + compile: CUDA only (--compile-on-cpu to try it here)")
    else:
        compile_pipeline_unet(ours)
        for batch in args.batches:
            need = args.compile_estimate_s + last_s * batch / args.batches[0] * args.reps
            if fits(need, args, f"ours + compile B={batch}"):
                rows += measure([("ours + compile", ours_call, ours)], batch, args, args.reps)
                write_results(rows, args)

    return rows


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Ratios against ``plain`` at the same batch, then the markdown + JSON files (rewritten after every
    group, so a run stopped by a time limit keeps what it measured)."""
    base = {r["batch"]: r for r in rows if r["variant"] == "plain"}
    for r in rows:
        b = base.get(r["batch"])
        r["ratio"] = round(r["images_per_s"] / b["images_per_s"], 2) if b else None
        if "_images" in r:
            r["delta_vs_plain"] = mean_abs_diff(r["_images"], b["_images"]) if b and "_images" in b else None
    text = report(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "renders_bench.md").write_text(text)
    clean = [{k: v for k, v in r.items() if k != "_images"} for r in rows]
    (args.out / "renders_bench.json").write_text(json.dumps({"smoke": args.smoke, "rows": clean}, indent=2))
    return text


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "none (CPU)"
    import diffusers

    header = (
        f"{'tiny-sd widths, CPU fp32' if args.smoke else 'SD1.5 architecture (random init), CUDA bf16'}; "
        f"{args.steps} steps DPM++ 2M, {args.size}x{args.size}, CFG 7.5, LoRA r=8; GPU: {gpu}; "
        f"CPU threads: {torch.get_num_threads()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}\n\n"
    )
    cols = ["variant", "batch", "s_per_batch", "images_per_s", "ratio", "warmup_s", "delta_vs_plain"]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        table += "| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n"
    return header + table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--smoke", action="store_true", help="tiny widths on the CPU (checks the script)")
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="vocab.json + merges.txt (see above)")
    ap.add_argument("--write-tokenizer", type=Path, metavar="DIR", help="write the tokenizer files and exit")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=None, help="default 512 (CUDA) / 128 (--smoke)")
    ap.add_argument(
        "--reps", type=int, default=None, help="timed calls per variant (default 3 CUDA, 2 smoke)"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="default 110 (CUDA) / 600 (--smoke)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 with --smoke)")
    ap.add_argument("--compile-estimate-s", type=float, default=50.0, help="assumed compile warm-up")
    ap.add_argument("--compile-on-cpu", action="store_true")
    args = ap.parse_args()
    if args.write_tokenizer:
        models.clip_tokenizer_files(args.write_tokenizer)
        print(f"tokenizer files written to {args.write_tokenizer}")
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    args.size = args.size or (128 if args.smoke else 512)
    args.reps = args.reps or (3 if args.smoke else 2)
    args.budget_s = args.budget_s or (600.0 if args.smoke else 110.0)
    if args.threads or args.smoke:
        # One thread: on a shared small CPU, two busy processes with 2 threads each slow down ~10x.
        torch.set_num_threads(args.threads or 1)
    args.tokenizer_dir = args.tokenizer_dir or Path(tempfile.mkdtemp(prefix="clip-tok-"))
    if args.smoke:
        torch.manual_seed(0)
    rows = run(args)
    print(write_results(rows, args), flush=True)
    say("done")


if __name__ == "__main__":
    main()
