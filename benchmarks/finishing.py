"""Time per image of the marketplace finishing step against a plain PIL resize + save of the same image.

The input is what the hires pass hands to finishing: a 1024 × 1024 RGB render of a white sneaker, small and
off-centre, with a contact shadow, on an off-white backdrop (drawn here; each image a little different).
For each profile:

* ``baseline``: ``Image.resize(profile size, LANCZOS)`` + ``save`` in the profile's format (JPEG q 92 /
  PNG), to memory — the least any tool does to hand a marketplace a file of the right size;
* ``finish``: ``core.finishing.finish`` (mask grown from the border, shadow, framing, resampling, snap);
* ``finish + mark``: plus ``core.marking.encode_marked`` (sRGB ICC, XMP, A1111 parameters, JSON provenance:
  the same encoder as the baseline's save, with metadata);
* ``+ C2PA``: plus signing the manifest (c2pa-python, ES256 with a local test certificate);
* ``+ check``: plus ``core.compliance.check_file`` reading the written file back (decode, re-measure,
  exiftool-independent XMP parse, C2PA validation) — what ``published_renders`` does per file.

Variants run interleaved for ``--rounds`` rounds of ``--images`` images each; the median per-image time per
round and the median over rounds are reported, with the ratio to ``baseline`` per round (the shared
machine's load drifts; ratios compare runs seconds apart). The goal (issue 20) is ``finish + mark`` ≤ 3×
``baseline``; C2PA and the check are reported beside it, not counted in the goal.

    python benchmarks/finishing.py                       # ≈ 2 minutes on 2 CPU cores
    python benchmarks/finishing.py --images 4 --rounds 1 # smoke
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shoe_lora_pipeline.core.compliance import check_file
from shoe_lora_pipeline.core.finishing import finish
from shoe_lora_pipeline.core.marketplace import BUILTIN_PROFILES, MarketplaceProfile
from shoe_lora_pipeline.core.marking import (
    SigningCredentials,
    c2pa_manifest,
    c2pa_sign,
    encode_marked,
    make_test_certificate,
)

PARAMETERS = (
    "A professional product photo of white casual sneakers on white background, side view, product "
    "photography\nNegative prompt: blurry, text\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, "
    'Size: 512x512, Denoising strength: 0.35, Hires upscale: 2, Hires steps: 25, Hires upscaler: Lanczos, Lora hashes: "casual_shoes_lora: 0123456789ab"'
)
RENDER = {"sku": "BENCH-1", "lora_sha256": "ab" * 32, "dagster_run_id": "bench", "seed": 1}


def drawn_render(i: int, size: int = 1024) -> Image.Image:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (size, size), (238, 236, 230))
    d = ImageDraw.Draw(img)
    w, h = int(size * rng.uniform(0.35, 0.5)), int(size * rng.uniform(0.15, 0.22))
    x0, y0 = int(size * rng.uniform(0.15, 0.3)), int(size * rng.uniform(0.35, 0.5))
    x1, y1 = x0 + w, y0 + h
    d.ellipse((x0 - w // 18, y1 - h // 11, x1 + w // 6, y1 + h // 6), fill=(205, 204, 200))
    d.rounded_rectangle(
        (x0, y0, x1, y1), h // 5, fill=(252, 252, 252), outline=(170, 170, 170), width=w // 60
    )
    d.rectangle((x0 + 6, y1 - h // 6, x1 - 6, y1 - h // 22), fill=(120, 120, 125))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-2, 3, (size, size, 3))  # render noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def variants(
    profile: MarketplaceProfile, credentials: SigningCredentials, scratch: Path
) -> dict[str, Callable[[Image.Image], object]]:
    fmt = "JPEG" if profile.format == "jpeg" else "PNG"

    def baseline(img: Image.Image) -> object:
        buf = io.BytesIO()
        kwargs = {"quality": profile.quality} if fmt == "JPEG" else {}
        img.resize(profile.target_size, Image.Resampling.LANCZOS).save(buf, fmt, **kwargs)
        return buf

    def finish_only(img: Image.Image) -> object:
        return finish(img, profile)

    def finish_mark(img: Image.Image) -> bytes:
        done = finish(img, profile)
        assert done.image is not None, done.reasons
        return encode_marked(
            done.image, profile, parameters=PARAMETERS, render=RENDER, creator_tool="shoe_lora_pipeline bench"
        )

    def with_c2pa(img: Image.Image) -> bytes:
        manifest = c2pa_manifest(title="x", mime_type=profile.mime_type, version="bench", assertion=RENDER)
        return c2pa_sign(finish_mark(img), profile.mime_type, manifest, credentials)

    def with_check(img: Image.Image) -> list[str]:
        path = scratch / f"x{profile.suffix}"
        path.write_bytes(with_c2pa(img))
        problems = check_file(path, profile, c2pa_on=True)
        assert not problems, problems
        return problems

    return {
        "baseline": baseline,
        "finish": finish_only,
        "finish + mark": finish_mark,
        "+ C2PA": with_c2pa,
        "+ check": with_check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=list(BUILTIN_PROFILES))
    args = parser.parse_args()
    images = [drawn_render(i) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        chain, key = make_test_certificate(Path(tmp) / "cert")
        credentials = SigningCredentials(chain, key, "es256")
        print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, ", end="")
        print(f"{args.images} images × {args.rounds} rounds, input 1024×1024\n")
        print("| profile | variant | ms / image: median (per round) | vs baseline: median (per round) |")
        print("| --- | --- | --- | --- |")
        for name in args.profiles:
            profile = BUILTIN_PROFILES[name]
            fns = variants(profile, credentials, Path(tmp))
            for fn in fns.values():  # warm-up: imports, ICC profile, c2pa library
                fn(images[0])
            per_round: dict[str, list[float]] = {v: [] for v in fns}
            for _ in range(args.rounds):
                for variant, fn in fns.items():
                    times = []
                    for img in images:
                        t = time.perf_counter()
                        fn(img)
                        times.append(time.perf_counter() - t)
                    per_round[variant].append(statistics.median(times) * 1000)
            base = per_round["baseline"]
            for variant, ms in per_round.items():
                ratios = [m / b for m, b in zip(ms, base, strict=True)]
                print(
                    f"| {name} {profile.format.upper()} {profile.target_size[0]}² | {variant} | "
                    f"{statistics.median(ms):.0f} ({', '.join(f'{m:.0f}' for m in ms)}) | "
                    f"{statistics.median(ratios):.2f}× ({', '.join(f'{r:.2f}' for r in ratios)}) |"
                )


if __name__ == "__main__":
    main()
