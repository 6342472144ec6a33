"""The data stage (raw_images → cleaned_images → captions → dataset_splits) against a naive PIL loop.

One command generates a catalogue-size photo set with a fixed seed (``catalogue_photos.py``: 2,010
JPEGs of 1080×1440 by default, plus ``--add`` more for the incremental run), then measures, in this one
run on this machine:

* **naive**: a plain single-process PIL loop over the same photos (open → EXIF transpose → RGB → pad to a
  white square → LANCZOS 512 → PNG), the baseline of every ratio;
* **core**: this project's four stage functions in a fresh process (seconds per stage, and the peak RSS of
  the process tree, pool workers included, against the same process's RSS after its imports);
* **dagster, full** and **dagster, +N photos**: ``dg launch`` of the four data assets
  (a fresh instance; the second run after adding the new photos and their styles.csv rows): wall time of
  the command, the steps' own time from Dagster's event log, the time from a step process being
  launched to its step starting (multiprocess executor only), and the peak RSS of the process tree;
* **levers**: each speed-up alone on a sample of the photos (JPEG draft mode with its pixel difference,
  PNG zlib level, the worker pool, colour estimate from the in-memory image).

Prints markdown tables (and writes them to ``--out``)::

    python benchmarks/data_stage.py                  # 2,010 photos + 10
    python benchmarks/data_stage.py --photos 20000   # the memory check
    python benchmarks/data_stage.py --smoke          # 40 small photos + 4: checks the machinery only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SEED = 1127
DATA_STAGES = ["raw_images", "cleaned_images", "captions", "dataset_splits"]
TEMPLATE = "A professional product photo of {colour} {type} shoes on white background, {characteristics}, product photography"


# --------------------------------------------------------------------------------------------------
# Measuring


class TreeUsage:
    """Peak RSS (MB) and CPU seconds of a process and all its descendants, sampled every 20 ms.

    CPU time is summed over every process seen (its last sample); on a shared machine it is the
    load-independent measure of work, while wall time depends on what else runs.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0.0
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error), p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
        self.peak = max(self.peak, total / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.02)

    def __enter__(self) -> TreeUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def naive_loop(photos: list[Path], out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the baseline loop."""
    from PIL import Image, ImageOps

    out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    for path in photos:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        side = max(im.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        square.resize((512, 512), Image.Resampling.LANCZOS).save(out / f"{path.stem}.png")
    return time.perf_counter() - start, time.process_time() - cpu


def core_run(raw: Path, out: Path) -> dict:
    """The four stage functions as the assets call them (run in a fresh process by --core-run)."""
    import resource

    import pandas as pd

    from shoe_lora_pipeline.core.captions import build_captions, load_styles, write_captions
    from shoe_lora_pipeline.core.cleaning import CleaningParams, clean_images
    from shoe_lora_pipeline.core.manifest import scan_raw_dir
    from shoe_lora_pipeline.core.splits import make_splits

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds: dict[str, float] = {}
    with TreeUsage(os.getpid()) as rss:
        t = time.perf_counter()
        scan = scan_raw_dir(raw)
        out.mkdir(parents=True, exist_ok=True)
        scan.manifest.to_csv(out / "raw_manifest.csv", index=False)
        seconds["raw_images"] = time.perf_counter() - t

        t = time.perf_counter()
        manifest = pd.read_csv(out / "raw_manifest.csv", dtype={"rel_path": str, "sha256": str})
        report = clean_images(manifest, out / "cleaned", CleaningParams(resolution=512), workers=0)
        seconds["cleaned_images"] = time.perf_counter() - t

        t = time.perf_counter()
        styles = load_styles(raw / "styles.csv")
        captions_json = out / "captions.json"
        result = build_captions(
            out / "cleaned", raw, styles, TEMPLATE, "casual", "side view", previous=captions_json
        )
        write_captions(result, captions_json)
        seconds["captions"] = time.perf_counter() - t

        t = time.perf_counter()
        make_splits(
            result.entries, out / "cleaned" / "images", out, (0.8, 0.1, 0.1), group_near_duplicates=False
        )
        seconds["dataset_splits"] = time.perf_counter() - t
    return {
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_tree_rss_mb": rss.peak,
        "cpu_s": rss.cpu_s,
        "processed": report.processed_count,
        "kept": report.valid_count,
        "near_duplicate_pairs": report.near_duplicate_count,
        "captioned": len(result.captioned),
        "caption_sources": result.source_counts,
    }


def run_core_child(raw: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--core-run", str(raw), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"core run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def write_config(work: Path, raw: Path) -> Path:
    cfg = work / "config.yaml"
    cfg.write_text(
        f"""dataset:
  name: benchmark_shoes
  raw_dir: {raw}
  output_dir: {work / "dagster_out"}
  resolution: 512
  default_characteristics: side view
  cleaning: {{workers: 0}}
training:
  base_model: tiny-sd
  output_dir: {work / "dagster_out" / "lora"}
device: cpu
""",
        encoding="utf-8",
    )
    return cfg


EXECUTORS = {  # --executor: run config for the Definitions' default executor (multi_or_in_process)
    "default": None,
    "in_process": {"execution": {"config": {"in_process": {}}}},
    "forkserver": {"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {}}}}}},
}


def dagster_materialize(work: Path, cfg: Path, executor: str) -> dict:
    """``dg launch --assets`` of the data assets (from the project folder, as the README runs it); wall time,
    step times and peak RSS."""
    home = work / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    cmd = [sys.executable, "-m", "dagster_dg_cli.cli", "launch", "--assets", ",".join(DATA_STAGES)]
    if EXECUTORS[executor] is not None:
        cmd += ["--config-json", json.dumps(EXECUTORS[executor])]
    env = _env(DAGSTER_HOME=str(home), SHOE_LORA_CONFIG=str(cfg))
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with TreeUsage(proc.pid) as rss:
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dg launch failed:\n{output[-6000:]}")
    return {"wall": wall, "peak_tree_rss_mb": rss.peak, "cpu_s": rss.cpu_s, **_step_times(home)}


def _step_times(home: Path) -> dict:
    """Per step: its own duration (STEP_SUCCESS) and launch-to-start time, from the newest run."""
    import dagster as dg
    from dagster._core.events import DagsterEventType
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        run = instance.get_runs(limit=1)[0]
        steps: dict[str, float] = {}
        launched: dict[str, float] = {}
        started: dict[str, float] = {}
        run_times: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is None:
                continue
            kind = ev.event_type_value
            if kind == "STEP_SUCCESS":
                steps[ev.step_key] = ev.event_specific_data.duration_ms / 1000
            elif kind == "STEP_WORKER_STARTING":
                launched[ev.step_key] = entry.timestamp
            elif kind == "STEP_START":
                started[ev.step_key] = entry.timestamp
            elif ev.event_type in (DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS):
                run_times[ev.event_type.name] = entry.timestamp
    step_start = {k: started[k] - launched[k] for k in launched if k in started}
    run_s = run_times.get("RUN_SUCCESS", 0) - run_times.get("RUN_START", 0)
    return {"steps": steps, "step_start": step_start, "run": run_s}


# --------------------------------------------------------------------------------------------------
# Levers, each alone on a sample


def levers(photos: list[Path], work: Path) -> dict:
    import numpy as np
    from PIL import Image, JpegImagePlugin

    from shoe_lora_pipeline.core import normalise
    from shoe_lora_pipeline.core.captions import estimate_colour
    from shoe_lora_pipeline.core.cleaning import CleaningParams, clean_one

    params = CleaningParams(resolution=512)
    out: dict = {"photos": len(photos)}

    def timed_clean() -> tuple[float, list[Image.Image]]:
        start = time.process_time()  # CPU time: single-process work on a shared machine
        images = [clean_one(p, params).image for p in photos]
        return time.process_time() - start, images

    with_draft, drafted = timed_clean()
    original = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
    try:
        without_draft, full = timed_clean()
    finally:
        JpegImagePlugin.JpegImageFile.draft = original  # type: ignore[method-assign]
    diffs = [
        np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)) for a, b in zip(drafted, full, strict=True)
    ]
    out["draft"] = {
        "ms_off": 1000 * without_draft / len(photos),
        "ms_on": 1000 * with_draft / len(photos),
        "max_diff": int(max(d.max() for d in diffs)),
        "mean_diff": float(np.mean([d.mean() for d in diffs])),
        "p999_diff": float(np.mean([np.percentile(d, 99.9) for d in diffs])),
    }

    png = work / "lever_png"
    png.mkdir(exist_ok=True)
    settings = {}
    for level, strategy in (
        (0, "default"),
        (1, "default"),
        (6, "default"),
        (9, "default"),
        (1, "RLE"),
        (6, "RLE"),
    ):
        start = time.process_time()  # CPU time: the write is CPU-bound and the machine is shared
        total = 0
        for i, img in enumerate(drafted):
            path = png / f"{i}.png"
            ctype = zlib.Z_RLE if strategy == "RLE" else -1
            img.save(path, format="PNG", compress_level=level, compress_type=ctype, optimize=False)
            total += path.stat().st_size
        ms = 1000 * (time.process_time() - start) / len(photos)
        settings[f"{level}, {strategy}"] = {"ms": ms, "kb": total / len(photos) / 1024}
    out["png"] = settings
    shutil.rmtree(png)

    start = time.process_time()
    for img in drafted:
        estimate_colour(img)
    in_memory = time.process_time() - start
    pngs = work / "lever_colour"  # what captions did before: open each written PNG again
    pngs.mkdir(exist_ok=True)
    for i, img in enumerate(drafted):
        img.save(pngs / f"{i}.png", compress_level=normalise.PNG_COMPRESS_LEVEL)
    start = time.process_time()
    for i in range(len(drafted)):
        with Image.open(pngs / f"{i}.png") as again:
            estimate_colour(again)
    reread = time.process_time() - start
    shutil.rmtree(pngs)
    out["colour"] = {"ms_reread": 1000 * reread / len(photos), "ms_in_memory": 1000 * in_memory / len(photos)}
    return out


def pool_lever(raw: Path, work: Path, n: int) -> dict:
    """clean_images on the first n photos with one worker vs one per core (cold caches, fresh outputs)."""
    from shoe_lora_pipeline.core.cleaning import CleaningParams, clean_images
    from shoe_lora_pipeline.core.manifest import scan_raw_dir
    from shoe_lora_pipeline.core.pool import effective_workers

    manifest = scan_raw_dir(raw).manifest
    manifest = manifest[manifest["kind"] == "image"].head(n)
    times = {}
    for workers in (1, 0):
        out = work / f"lever_pool_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        clean_images(manifest, out, CleaningParams(resolution=512), workers=workers)
        times[workers] = time.perf_counter() - start
        shutil.rmtree(out)
    return {
        "photos": len(manifest),
        "s_one": times[1],
        "s_pool": times[0],
        "workers": effective_workers(0, n),
    }


# --------------------------------------------------------------------------------------------------
# Photo set


def prepare_photos(work: Path, n: int, add: int, size: tuple[int, int], workers: int) -> tuple[Path, Path]:
    """work/raw with n photos + catalogue files, work/extra with the next 2 × ``add`` photos (cached)."""
    import catalogue_photos as cp

    raw, extra = work / "raw", work / "extra"
    stamp = work / f"photos-{SEED}-{n}-{add}-{size[0]}x{size[1]}.json"
    if stamp.exists():
        return raw, extra
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(extra, ignore_errors=True)
    facts = cp.write_photos(raw, SEED, 0, n, size, workers)
    cp.write_catalogue_files(raw, facts)
    facts += cp.write_photos(extra, SEED, n, 2 * add, size, workers)  # two batches of new photos
    stamp.write_text(json.dumps(facts))
    return raw, extra


def add_photos(work: Path, raw: Path, extra: Path, batch: int, add: int) -> None:
    """New photos (batch 0 or 1 of ``add``) arrive with their styles.csv rows (catalogue files rewritten)."""
    import catalogue_photos as cp

    for p in sorted(extra.glob("*.jpg"))[batch * add : (batch + 1) * add]:
        shutil.copy2(p, raw / p.name)
    (stamp,) = work.glob(f"photos-{SEED}-*.json")
    present = {int(p.stem) - cp.FIRST_ID for p in raw.glob("*.jpg")}
    cp.write_catalogue_files(raw, [tuple(f) for f in json.loads(stamp.read_text()) if f[0] in present])


# --------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    import PIL

    # The package's CPU-name reader (called after the measurements: that module imports torch).
    from shoe_lora_pipeline.core.device import _cpu_name

    return (
        f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, Pillow {PIL.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.2f} (1 min) / {five:.2f} (5 min)"
    except OSError:  # pragma: no cover
        return "n/a"


def report(args: argparse.Namespace, r: dict) -> str:
    naive, ncpu, cf = r["naive"], r["naive_cpu"], r["core_full"]
    full, inc = r["dagster_full"], r["dagster_add"]
    full_steps, inc_steps = sum(full["steps"].values()), sum(inc["steps"].values())
    n, add = args.photos, args.add
    lines = [
        f"Run {r['date']} on {r['machine']}; load average before {r['load_before']}, after {r['load_after']}.",
        f"{n:,} generated {args.size[0]}×{args.size[1]} JPEG photos (seed {SEED}), then +{add}.",
        "",
        "| measurement | seconds | ratio to naive | goal | CPU s, process tree (ratio) |",
        "| --- | --- | --- | --- | --- |",
        f"| naive PIL loop, {n:,} photos, 1 process | {naive:.1f} | 1.00× | | {ncpu:.1f} (1.00×) |",
        f"| data stage step time, full (4 Dagster steps) | {full_steps:.1f} | {full_steps / naive:.3f}× | ≤ 0.3× | |",
        f"| `dg launch`, full, wall | {full['wall']:.1f} | {full['wall'] / naive:.3f}× | | "
        f"{full['cpu_s']:.1f} ({full['cpu_s'] / ncpu:.2f}×) |",
        f"| data stage step time, +{add} photos | {inc_steps:.2f} | {inc_steps / naive:.4f}× | ≤ 0.03× | |",
        f"| `dg launch`, +{add} photos, wall | {inc['wall']:.1f} | {inc['wall'] / naive:.3f}× | "
        f"≤ 0.15× | {inc['cpu_s']:.1f} |",
        f"| core functions, full, in a fresh process | {sum(cf['seconds'].values()):.1f} | "
        f"{sum(cf['seconds'].values()) / naive:.3f}× | | {cf['cpu_s']:.1f} ({cf['cpu_s'] / ncpu:.2f}×) |",
        "",
        "| step | full: step s | full: launch→start s | +new: step s | +new: launch→start s | core, full s | core, +new s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in DATA_STAGES:
        cells = [
            f"{full['steps'].get(stage, float('nan')):.2f}",
            f"{full['step_start'].get(stage, 0.0):.2f}" if full["step_start"] else "in-process",
            f"{inc['steps'].get(stage, float('nan')):.2f}",
            f"{inc['step_start'].get(stage, 0.0):.2f}" if inc["step_start"] else "in-process",
            f"{r['core_full']['seconds'][stage]:.2f}",
            f"{r['core_add']['seconds'][stage]:.2f}",
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    cmp = r["dagster_add_compare"]
    cmp_steps = sum(cmp["steps"].values())
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in cmp["step_start"].items()) or "none"
    lines += [
        "",
        f"The same +{add} photos once more with the {args.compare_executor} executor: wall {cmp['wall']:.1f} s "
        f"({cmp['wall'] / naive:.3f}× naive), steps {cmp_steps:.2f} s, step process launch→start: {starts}.",
        "",
        f"Executor: {args.executor}. Dagster run (RUN_START→RUN_SUCCESS) {full['run']:.1f} s full, "
        f"{inc['run']:.1f} s +{add}; the rest of the wall time is the CLI's own start (imports, code "
        "location, instance).",
        f"Core run: {cf['kept']:,} kept, {cf['near_duplicate_pairs']:,} near-duplicate pairs (pHash ≤ 4), "
        f"caption sources {cf['caption_sources']}; +{add}: {r['core_add']['processed']} decoded, "
        f"{r['core_add']['captioned']} captioned.",
        "",
        "| memory | MB |",
        "| --- | --- |",
        f"| core run: RSS after imports (baseline) | {cf['baseline_rss_mb']:.0f} |",
        f"| core run: peak RSS of the process tree (pool workers included) | {cf['peak_tree_rss_mb']:.0f} |",
        f"| `dg launch`, full: peak RSS of the process tree | {full['peak_tree_rss_mb']:.0f} |",
        f"| `dg launch`, +{add}: peak RSS of the process tree | {inc['peak_tree_rss_mb']:.0f} |",
    ]
    if "levers" in r:
        lv, pool = r["levers"], r["pool"]
        d = lv["draft"]
        lines += [
            "",
            f"Levers, each alone ({lv['photos']} photos; CPU ms per photo, the pool in wall seconds):",
            "",
            "| lever | without | with | note |",
            "| --- | --- | --- | --- |",
            f"| JPEG draft (decode at 1/2..1/8 DCT scale) before LANCZOS | {d['ms_off']:.1f} | {d['ms_on']:.1f} | "
            f"pixel difference to the non-draft output: max {d['max_diff']}, mean {d['mean_diff']:.3f}, "
            f"99.9th percentile {d['p999_diff']:.1f} (0–255) |",
            f"| colour estimate from the in-memory image (vs re-reading the PNG) | {lv['colour']['ms_reread']:.1f} | "
            f"{lv['colour']['ms_in_memory']:.1f} | |",
            f"| process pool, {pool['workers']} workers (clean_images, {pool['photos']} photos, s) | "
            f"{pool['s_one']:.1f} | {pool['s_pool']:.1f} | |",
            "",
            "| PNG zlib level, strategy | CPU ms / photo | KB / photo |",
            "| --- | --- | --- |",
        ]
        for level, v in lv["png"].items():
            lines.append(f"| {level} | {v['ms']:.1f} | {v['kb']:.0f} |")
    return "\n".join(lines) + "\n"


def memory_report(args: argparse.Namespace, r: dict) -> str:
    cf, full = r["core_full"], r["dagster_full"]
    return (
        "\n".join(
            [
                f"Run {r['date']} on {r['machine']}; load average before {r['load_before']}, after {r['load_after']}.",
                f"{args.photos:,} generated {args.size[0]}×{args.size[1]} JPEG photos (seed {SEED}), memory only.",
                "",
                "| run | seconds | CPU s | baseline RSS MB | peak RSS of the process tree MB |",
                "| --- | --- | --- | --- | --- |",
                f"| core functions, fresh process | {sum(cf['seconds'].values()):.1f} | {cf['cpu_s']:.1f} | "
                f"{cf['baseline_rss_mb']:.0f} | {cf['peak_tree_rss_mb']:.0f} |",
                f"| `dg launch` ({args.executor}) | {full['wall']:.1f} | {full['cpu_s']:.1f} | | "
                f"{full['peak_tree_rss_mb']:.0f} |",
                "",
                f"Core run: {cf['kept']:,} kept, {cf['near_duplicate_pairs']:,} near-duplicate pairs; seconds by "
                "stage: " + ", ".join(f"{k} {v:.1f}" for k, v in cf["seconds"].items()),
            ]
        )
        + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=2010)
    ap.add_argument("--add", type=int, default=10, help="photos added for the incremental run")
    ap.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(1080, 1440))
    ap.add_argument(
        "--smoke", action="store_true", help="40 photos of 540×720 + 4: a quick check of the machinery"
    )
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "data_stage_bench")
    ap.add_argument("--no-levers", action="store_true")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the full core run and the full dagster run (peak RSS at catalogue size; no naive loop)",
    )
    ap.add_argument(
        "--executor",
        choices=sorted(EXECUTORS),
        default="in_process",
        help="executor of the measured runs (default: in_process, as dataset_job runs); "
        "'default' is what the Definitions ship, the others are passed as run config",
    )
    ap.add_argument(
        "--compare-executor",
        choices=sorted(EXECUTORS),
        default="default",
        help="executor of a second +N run, for comparison",
    )
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--core-run", nargs=2, type=Path, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.core_run:
        print(json.dumps(core_run(*args.core_run)))
        return
    if args.smoke:
        args.photos, args.add, args.size = 40, 4, (540, 720)

    from shoe_lora_pipeline.core.pool import effective_workers

    work = args.workdir / f"n{args.photos}-{args.size[0]}x{args.size[1]}"
    work.mkdir(parents=True, exist_ok=True)
    raw, extra = prepare_photos(work, args.photos, args.add, args.size, effective_workers(0, 1 << 30))
    for d in ("naive", "core", "dagster_out", "dagster_home", "raw_run"):
        shutil.rmtree(work / d, ignore_errors=True)
    run_raw = work / "raw_run"  # the set the runs see; photos are added to this copy
    shutil.copytree(raw, run_raw, copy_function=os.link)

    r: dict = {"date": datetime.date.today().isoformat(), "load_before": load()}
    if args.memory_only:
        r["core_full"] = run_core_child(run_raw, work / "core")
        r["dagster_full"] = dagster_materialize(work, write_config(work, run_raw), args.executor)
        r["load_after"], r["machine"] = load(), machine()
        print(memory_report(args, r))
        return
    photos = sorted(run_raw.glob("*.jpg"))
    print(f"naive loop over {len(photos)} photos ...", file=sys.stderr)
    r["naive"], r["naive_cpu"] = naive_loop(photos, work / "naive")
    shutil.rmtree(work / "naive")
    print("core run ...", file=sys.stderr)
    r["core_full"] = run_core_child(run_raw, work / "core")
    print("dagster, full ...", file=sys.stderr)
    cfg = write_config(work, run_raw)
    r["dagster_full"] = dagster_materialize(work, cfg, args.executor)
    add_photos(work, run_raw, extra, 0, args.add)
    print(f"dagster, +{args.add} ...", file=sys.stderr)
    r["dagster_add"] = dagster_materialize(work, cfg, args.executor)
    r["core_add"] = run_core_child(run_raw, work / "core")
    add_photos(work, run_raw, extra, 1, args.add)
    print(f"dagster, +{args.add} more, {args.compare_executor} executor ...", file=sys.stderr)
    r["dagster_add_compare"] = dagster_materialize(work, cfg, args.compare_executor)
    if not args.no_levers:
        print("levers ...", file=sys.stderr)
        r["levers"] = levers(photos[: min(200, len(photos))], work)
        r["pool"] = pool_lever(run_raw, work, min(200, len(photos)))
    r["load_after"] = load()
    r["machine"] = machine()
    text = report(args, r)
    print(text)
    (work / "result.json").write_text(json.dumps(r, indent=2, default=str))
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
