"""A review-studio project for tests: a config with a specs sheet and a renders folder holding candidates in
product_renders' layout (index.json, candidates/<sku>/render.json and PNGs), written directly so a test
of the web app needs no model; and a studio served by uvicorn on a free loopback port in this process."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.renders.store import RenderPaths, pixels_sha256
from shoe_lora_pipeline.studio.app import StudioSettings, create_app
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.support.dagster_server import free_loopback_port

CATEGORY = "casual_shoes"
SPECS = "sku,colour,type,characteristics,count\nCS-1,black,casual,lace-up,1\nCS-2,white,sneakers,,2\n"


@dataclass(frozen=True)
class FakeSku:
    sku: str
    qa_passed: Sequence[bool]
    prompt: str = (
        "A professional product photo of black casual shoes on white background, product photography"
    )
    count: int = 1


def write_candidates(renders: Path, skus: Sequence[FakeSku]) -> RenderPaths:
    """``renders/`` as product_renders leaves it: one small distinct PNG per candidate, best first."""
    paths = RenderPaths(renders)
    index_skus = []
    for n, spec in enumerate(skus):
        key = f"k{n:03d}"
        folder = paths.sku_dir(spec.sku)
        folder.mkdir(parents=True, exist_ok=True)
        candidates = []
        for i, passed in enumerate(spec.qa_passed):
            # A drawn sneaker, shifted per candidate so that every candidate's pixels differ.
            image = white_sneaker(160, (25 + 6 * i, 62 + 4 * n, 115 + 6 * i, 100 + 4 * n))
            file = f"{i:03d}-{key}.png"
            image.save(folder / file)
            candidates.append(
                {
                    "index": i,
                    "file": file,
                    "rank": i + 1,
                    "seed": 1000 * n + i,
                    "image_sha256": pixels_sha256(image),
                    "qa": {
                        "passed": passed,
                        "score": round(0.9 - i / 10, 3),
                        "failed": [] if passed else ["background_white"],
                    },
                }
            )
        record = {
            "sku": spec.sku,
            "key": key,
            "row": {"prompt": spec.prompt, "negative_prompt": "blurry", "count": spec.count},
            "candidates": candidates,
        }
        (folder / "render.json").write_text(json.dumps(record), encoding="utf-8")
        index_skus.append({"sku": spec.sku, "key": key})
    paths.index_json.write_text(json.dumps({"skus": index_skus, "specs_sha256": "x"}), encoding="utf-8")
    return paths


def write_project(root: Path, specs: str | None = SPECS) -> Path:
    """A config whose renders folder is ``root/out/lora/renders`` and whose specs sheet is ``root/specs.csv``."""
    root.mkdir(parents=True, exist_ok=True)
    if specs is not None:
        (root / "specs.csv").write_text(specs, encoding="utf-8")
    cfg = root / "studio.yaml"
    cfg.write_text(
        f"""
dataset: {{name: {CATEGORY}, raw_dir: raw, output_dir: out, resolution: 64}}
training: {{base_model: tiny-sd, output_dir: out/lora}}
renders:
  specs_csv: specs.csv
  require_qa_pass: false
device: cpu
""",
        encoding="utf-8",
    )
    return cfg


def settings_for(cfg: Path, **overrides: object) -> StudioSettings:
    loaded = load_config(cfg, check_paths=False)
    return StudioSettings(cfg=loaded.for_category(CATEGORY), category=CATEGORY, **overrides)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_studio(settings: StudioSettings) -> Iterator[str]:
    """The studio served by uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    port = free_loopback_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the studio did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
