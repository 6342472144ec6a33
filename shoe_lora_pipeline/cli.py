"""``shoe-lora`` command line.

Each subcommand is one entry in :data:`SUBCOMMANDS`: a help line, a function adding its arguments and a
function running it (returning the exit code). Add a subcommand by adding an entry; ``main`` needs no
change. Heavy imports stay inside the run functions so ``shoe-lora --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoe_lora_pipeline.lineage import Lineage

from shoe_lora_pipeline.core.markdown import one_line

PROG = "shoe-lora"
EXIT_OK = 0
EXIT_ERROR = 2  # also what argparse uses for usage errors
EXIT_NOTHING_PUBLISHED = 1  # render / publish: it ran, but nothing (render) or not everything (publish) was published


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _error(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# -- audit ---------------------------------------------------------------------------------------------


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        type=Path,
        help="an exported file (*.safetensors, README.md, provenance.json), the lora_weights folder, "
        "the final_pipeline folder or a published product render (.png or .jpg: also shows its XMP source "
        "type, C2PA state and signer)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.epilog = "For the Dagster materialisations that fed the LoRA, see `shoe-lora lineage`."


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _cell(value: Any) -> str:
    """One cell of an aligned text table; one line (core.markdown.one_line), so a hostile value cannot
    start a new row."""
    if value is None:
        return "-"
    if isinstance(value, bool):  # as --json writes it
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return one_line(", ".join(str(v) for v in value))
    if isinstance(value, float):
        return f"{value:g}"
    return one_line(value)


def format_audit_table(record: Mapping[str, Any]) -> str:
    """Sections (LoRA, Provenance, QA, other) of ``key  value`` rows, keys aligned across the whole table.

    For a published render the provenance is the LoRA's (its ``dagster_run_id`` is the training run) and
    the render's own facts (``publish_run_id``, ``render_run_id``, …) follow under "Render"."""
    render = record.get("format") == "render_png"
    sections = [
        ("LoRA", list(_flatten(record.get("lora") or {}))),
        (
            "Provenance of the LoRA (dagster_run_id: its training run)" if render else "Provenance",
            list(_flatten(record.get("provenance") or {})),
        ),
        ("QA (product-photo checks this image was published with)", list(_flatten(record.get("qa") or {}))),
        ("Render" if render else "Other", list(_flatten(record.get("extra") or {}))),
    ]
    head = [("path", record.get("path")), ("format", record.get("format"))]
    width = max(len(k) for k, _ in head + [row for _, rows in sections for row in rows])
    lines = [f"{k:<{width + 2}}  {_cell(v)}" for k, v in head]
    for title, rows in sections:
        if not rows:
            continue
        lines += ["", title]
        lines += [f"  {k:<{width}}  {_cell(v)}" for k, v in rows]
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the provenance stored in an exported file or folder (reads files only, no Dagster)."""
    from shoe_lora_pipeline.core.lora_io import ProvenanceError, read_provenance

    path: Path = args.path
    if not path.exists():
        return _error("audit", f"{path}: no such file or folder")
    try:
        record = read_provenance(path)
    except ProvenanceError as exc:
        return _error("audit", str(exc))
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True, default=str))
    else:
        print(format_audit_table(record))
    return EXIT_OK


# -- lineage -------------------------------------------------------------------------------------------

_LINEAGE_EPILOG = """\
Reads the Dagster instance's event log directly (no daemon or webserver). Rows, in pipeline order, each
with its role: every upstream materialisation that fed the LoRA (raw manifest, cleaned images, captions,
splits, latents, training), the LoRA itself, then the downstream ones built from it later (fused pipeline,
evaluation report). The link column says how a row is tied to its neighbour on the way to the LoRA:
"recorded" when Dagster recorded which materialisation the next step read, else "latest before" (the
latest materialisation before the one that used it).

The asset graph comes from the project's Dagster definitions; if those cannot be loaded, or no longer
contain the LoRA's asset, from the edges recorded in the instance (--graph chooses; the output says which).

examples:
  shoe-lora lineage --run 9b55636e-e12a-4bd5-90c6-a609bb10f0e2
  shoe-lora lineage outputs/demo/casual_shoes/lora/lora_weights --json
  shoe-lora lineage --run RUN_ID --category casual_shoes --dagster-home ~/.dagster_home
"""


def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _LINEAGE_EPILOG
    parser.add_argument(
        "path",
        type=Path,
        nargs="?",
        help="an exported file or folder (as for `audit`); its provenance's dagster_run_id is the run",
    )
    parser.add_argument("--run", metavar="RUN_ID", help="the Dagster run that materialised the LoRA")
    parser.add_argument(
        "--category",
        help="the category whose LoRA to trace when the run trained several (default: all of them; for "
        "PATH, the dataset named in its provenance)",
    )
    parser.add_argument(
        "--dagster-home",
        metavar="DIR",
        type=Path,
        help="the Dagster instance folder (default: $DAGSTER_HOME)",
    )
    parser.add_argument(
        "--graph",
        choices=["auto", "definitions", "instance"],
        default="auto",
        help="where the asset graph comes from (default: auto = definitions, else the instance's record)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _short(value: Any, limit: int = 16) -> str:
    text = _cell(value)
    if len(text) > limit and all(c in "0123456789abcdef" for c in text):
        return text[:limit] + "…"
    return text


def format_lineage_table(lineage: Lineage) -> str:
    """A header, one row per asset (role, asset, run, time, data/code version, link) with its identifying
    metadata indented under it, a legend, then notes."""
    from shoe_lora_pipeline.lineage import GRAPH_SOURCES, LINK_TARGET, ROLE_LABELS

    head = ["#", "role", "asset", "run id", "materialised (UTC)", "data version", "code", "link"]
    rows = [
        [
            str(i),
            ROLE_LABELS.get(r.role, r.role),
            r.asset_key,
            r.run_id or "(none)",
            r.timestamp or "-",
            _short(r.data_version, 12),
            _cell(r.code_version),
            "-" if r.link == LINK_TARGET else _cell(r.link),
        ]
        for i, r in enumerate(lineage.rows, 1)
    ]
    widths = [max(len(line[c]) for line in [head, *rows]) for c in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(f"{cell:<{w}}" for cell, w in zip(cells, widths, strict=True)).rstrip()

    graph = GRAPH_SOURCES.get(lineage.graph_source, lineage.graph_source)
    facts = [
        ("LoRA", lineage.lora_key),
        ("run", lineage.run_id),
        ("materialised", lineage.timestamp),
        ("graph from", graph + (f" ({lineage.graph_note})" if lineage.graph_note else "")),
    ]
    lines = [f"{k:<13} {v}" for k, v in facts] + ["", fmt(head)]
    indent = " " * (widths[0] + 4)
    for cells, r in zip(rows, lineage.rows, strict=True):
        lines.append(fmt(cells))
        lines += [f"{indent}{k}: {_short(v)}" for k, v in r.key_metadata.items()]
    lines += [
        "",
        "upstream = fed the LoRA, downstream = built from it. link, to the neighbour towards the LoRA:",
        "recorded = Dagster recorded which materialisation was read; latest before = no record, so the",
        "latest one before the reader.",
    ]
    if lineage.notes:
        lines += ["", "notes"] + [f"  - {n}" for n in lineage.notes]
    return "\n".join(lines)


def cmd_lineage(args: argparse.Namespace) -> int:
    """Upstream (and downstream) materialisations of a LoRA, read from the Dagster instance."""
    if (args.path is None) == (args.run is None):
        return _error("lineage", "give either PATH (an exported file or folder) or --run RUN_ID")
    run_id, prefer = args.run, None
    if args.path is not None:
        from shoe_lora_pipeline.core.lora_io import ProvenanceError, read_provenance

        if not args.path.exists():
            return _error("lineage", f"{args.path}: no such file or folder")
        try:
            provenance = read_provenance(args.path).get("provenance") or {}
        except ProvenanceError as exc:
            return _error("lineage", str(exc))
        run_id, prefer = provenance.get("dagster_run_id"), provenance.get("dataset_name")
        if not run_id:
            return _error(
                "lineage",
                f"{args.path}: its provenance has no dagster_run_id (exported outside Dagster? a weights "
                "file records its export run only in the provenance.json beside it: pass that folder, or "
                "--run RUN_ID)",
            )

    from shoe_lora_pipeline import lineage as lin

    try:
        with lin.open_instance(args.dagster_home) as instance:
            lineages = lin.run_lineages(
                instance, str(run_id), category=args.category, prefer_category=prefer, graph_mode=args.graph
            )
    except lin.LineageError as exc:
        return _error("lineage", str(exc))
    if args.json:
        print(json.dumps({"lineages": [x.to_json() for x in lineages]}, indent=2, default=str))
    else:
        print("\n\n".join(format_lineage_table(x) for x in lineages))
    return EXIT_OK


# -- render --------------------------------------------------------------------------------------------

_RENDER_EPILOG = """\
The same code as the `renders` assets (a one-row specs sheet: same validation, prompt template, seeds,
QA ranking, approval rule and PNG provenance), without Dagster. Needs the category's exported LoRA
(lora_weights; final_pipeline is used when it was fused from it). Writes only under --out, by default
<training.output_dir>/renders/oneoff/<sku>/; published images are in its published/<profile>/ folders
(hires pass, finishing, marking and checks as published_renders: see `shoe-lora publish`).

example:
  shoe-lora render --sku CS-2001 --colour navy --type casual --characteristics lace-up --count 2
"""


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _RENDER_EPILOG
    parser.add_argument("--sku", required=True)
    parser.add_argument("--colour", required=True)
    parser.add_argument("--type", required=True, help='e.g. casual, "casual sneakers", loafers')
    parser.add_argument("--characteristics", default="", help='e.g. "lace-up"')
    parser.add_argument("--view", default="", help='e.g. side, "three-quarter"')
    parser.add_argument("--count", type=int, default=1, help="images wanted (default 1)")
    parser.add_argument("--prompt", default="", help="use this prompt instead of the caption template")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--config", help="pipeline config (default: $SHOE_LORA_CONFIG or configs/demo.yaml)")
    parser.add_argument("--category", help="product category (default: the config's first)")
    parser.add_argument("--device", choices=["auto", "mps", "cuda", "cpu"], help="default: the config's")
    parser.add_argument("--out", type=Path, help="output folder (default: under the category's renders/)")


def cmd_render(args: argparse.Namespace) -> int:
    """Render, QA-rank, auto-review and publish one SKU; prints the published files."""
    import contextlib
    import csv
    import hashlib
    import io
    import os

    from shoe_lora_pipeline.core import category_lock
    from shoe_lora_pipeline.core.category_lock import CategoryLockedError
    from shoe_lora_pipeline.core.config import ConfigError, load_config
    from shoe_lora_pipeline.core.device import DeviceError, choose_device
    from shoe_lora_pipeline.core.fsutil import DiskFullError
    from shoe_lora_pipeline.core.layout import Layout
    from shoe_lora_pipeline.core.models import BaseModelError, resolve_base_model
    from shoe_lora_pipeline.core.renders import (
        RenderPaths,
        RenderSettings,
        RenderSourceError,
        SpecsSheet,
        lora_source,
        parse_specs_text,
        pipeline_loader,
        publish_renders,
        render_dtype,
        render_sheet,
        review_renders,
        spec_rules,
    )
    from shoe_lora_pipeline.core.renders.hires import HiresPass, HiresSettings
    from shoe_lora_pipeline.core.renders.publish import PublishOptions

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    stack = contextlib.ExitStack()
    try:
        cfg = load_config(args.config, check_paths=False)
        cfg = cfg.for_category(args.category or cfg.dataset.name)
        buf = io.StringIO()
        row = [args.sku, args.colour, args.type, args.characteristics, args.count, args.view, args.prompt]
        csv.writer(buf).writerows(
            [
                ["sku", "colour", "type", "characteristics", "count", "view", "prompt", "negative_prompt"],
                [*row, args.negative_prompt],
            ]
        )
        rows, rejected, _ = parse_specs_text(buf.getvalue(), **spec_rules(cfg), source="command line")
        if rejected:
            return _error("render", f"refused: {rejected[0].problem}")
        sheet = SpecsSheet(None, hashlib.sha256(buf.getvalue().encode()).hexdigest(), rows, [])
        layout = Layout.of(cfg)
        out = args.out or layout.renders_dir / "oneoff" / rows[0].sku
        device = choose_device(args.device or cfg.device, cfg.training.mixed_precision)
        lora = lora_source(layout.lora_weights_dir, layout.final_pipeline_dir)
        load = pipeline_loader(
            lora,
            lambda: resolve_base_model(cfg.training.base_model, cfg.training.revision),
            device.torch_device,
            render_dtype(device.type, cfg.renders.precision),
            sampler=cfg.renders.sampler,
            lora_scale=cfg.export.fuse_lora_scale,
            compile_unet=cfg.renders.compile,
        )
        # The category's folders have one writer at a time, Dagster runs and this command alike.
        holder = f"shoe-lora render (pid {os.getpid()})"
        folders = [cfg.dataset.output_dir, cfg.training.output_dir]
        category_lock.acquire_all(folders, holder, cfg.automation.category_lock_timeout_s)
        # Released when the command ends (the kernel would too), also when it is called in-process.
        stack.callback(category_lock.release_run, holder)
        render_sheet(sheet, out, RenderSettings.from_config(cfg), lora, load, log=log)
        paths = RenderPaths(out)
        review_renders(
            paths, auto_approve=cfg.renders.auto_approve, require_qa_pass=cfg.renders.require_qa_pass
        )
        settings = HiresSettings.from_config(cfg)
        hires = HiresPass(settings, out / "hires", load, log=log) if settings else None
        result = publish_renders(
            paths,
            options=PublishOptions.from_config(cfg),
            config_hash=cfg.config_hash(),
            run_id=None,
            hires=hires,
            log=log,
        )
    except (
        ConfigError,
        DeviceError,
        BaseModelError,
        RenderSourceError,
        CategoryLockedError,
        DiskFullError,
    ) as exc:
        return _error("render", str(exc))
    finally:
        stack.close()
    for r in result.rows:
        for name in result.profiles:
            where = r[name]
            shown = where if where.startswith("flagged: ") else str(result.published_dir / where)
            print(f"{shown}\tprofile={name}\tqa_score={r['qa_score']}\tqa_passed={str(r['qa_passed']).lower()}")
    log(f"contact sheet: {paths.contact_sheet}")
    if not any(o.published for o in result.profiles.values()):
        log(
            "nothing published: no candidate passed QA (see the contact sheet), auto_approve is off, or "
            "every image failed its marketplace profile (the lines above say why)"
        )
        return EXIT_NOTHING_PUBLISHED
    return EXIT_OK


# -- publish -------------------------------------------------------------------------------------------

_PUBLISH_EPILOG = """\
The same finishing, marking and checks as published_renders, on given images: the background is snapped
to pure white from the border, the image framed to the profile's aspect and fill and resampled to its
size, and every file is marked as AI-generated (XMP Iptc4xmpExt:DigitalSourceType trainedAlgorithmicMedia,
the A1111 parameters and JSON provenance the input carries, an sRGB ICC profile and, with publish.c2pa in
the config or --c2pa-test-cert, a signed C2PA manifest). Writes DIR/<profile>/<image stem>.<jpg|png>; an
image that fails a profile is not written there and the reason is printed. Inputs are only read.

exit status: 0 every image published to every profile, 1 some were flagged, 2 error.

example:
  shoe-lora publish shoe.png --profile amazon_main --profile shopify --out published/
"""


def _publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _PUBLISH_EPILOG
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME",
        help="marketplace profile (repeatable; default: the config's publish.profiles); a name the config "
        "overrides uses the config's keys",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--config", help="pipeline config (default: $SHOE_LORA_CONFIG or configs/demo.yaml)")
    parser.add_argument("--shadow", choices=["keep", "remove"], help="default: the config's publish.shadow")
    parser.add_argument(
        "--c2pa-test-cert",
        action="store_true",
        help="sign C2PA manifests with a local test CA made under DIR/.c2pa-test (valid, not trusted)",
    )


def cmd_publish(args: argparse.Namespace) -> int:
    """Finish, mark and check IMAGEs for marketplace profiles."""
    import dataclasses
    import hashlib

    from PIL import Image, UnidentifiedImageError

    from shoe_lora_pipeline.core.config import ConfigError, load_config
    from shoe_lora_pipeline.core.marketplace import ProfileError, resolve_profile
    from shoe_lora_pipeline.core.marking import (
        MarkingError,
        SigningCredentials,
        make_test_certificate,
        read_marking,
    )
    from shoe_lora_pipeline.core.provenance import utc_now_iso
    from shoe_lora_pipeline.core.renders.publish import PublishOptions, publish_image

    try:
        cfg = load_config(args.config, check_paths=False)
        options = PublishOptions.from_config(cfg)
        if args.profiles:
            configured = {p.name: p for p in options.profiles}
            profiles = tuple(configured.get(n) or resolve_profile(n) for n in args.profiles)
            options = dataclasses.replace(options, profiles=profiles)
        if args.shadow:
            options = dataclasses.replace(options, shadow=args.shadow)
        if args.c2pa_test_cert:
            chain, key = make_test_certificate(args.out / ".c2pa-test")
            options = dataclasses.replace(options, credentials=SigningCredentials(chain, key, "es256"))
    except (ConfigError, ProfileError, MarkingError) as exc:
        return _error("publish", str(exc))
    if options.credentials is None:
        print(
            "publish: C2PA signing is off (no publish.c2pa): files carry the XMP marking only",
            file=sys.stderr,
        )
    flagged = 0
    for path in args.images:
        try:
            data = path.read_bytes()
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
            carried = read_marking(path)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            print(f"{path}\tflagged: unreadable image ({exc})")
            flagged += 1
            continue
        if carried["icc"] and "srgb" not in carried["icc"].lower():
            # Tagging its pixels sRGB would shift every colour; converting is the caller's choice.
            print(
                f"{path}\tflagged: embedded ICC profile {carried['icc']!r} is not sRGB (convert it to sRGB first)"
            )
            flagged += 1
            continue
        render = carried["render"] if isinstance(carried["render"], dict) else {}
        render = {
            **render,
            "source_file": path.name,
            "source_sha256": hashlib.sha256(data).hexdigest(),
            "published_with": "shoe-lora publish",
            "published_at": utc_now_iso(),
        }
        waive = () if carried["parameters"] else ("a1111_parameters",)
        for profile in options.profiles:
            dest = args.out / profile.name / f"{path.stem}{profile.suffix}"
            problems, facts = publish_image(
                image, profile, dest, options, parameters=carried["parameters"], render=render, waive=waive
            )
            if problems:
                flagged += 1
                print(f"{path}\t{profile.name}\tflagged: {'; '.join(problems)}")
            else:
                print(f"{dest}\t{profile.name}\tfill={facts['fill']}\tbytes={facts['bytes']}")
        if waive:
            print(f"{path}: no A1111 parameters in the input: published without them", file=sys.stderr)
    return EXIT_NOTHING_PUBLISHED if flagged else EXIT_OK


# -- studio --------------------------------------------------------------------------------------------


def _studio_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline config (default: $SHOE_LORA_CONFIG or configs/demo.yaml)")
    parser.add_argument("--category", help="product category (default: the config's first)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    parser.add_argument(
        "--dagster-url",
        default="http://127.0.0.1:3000",
        help="the Dagster webserver that runs renders and publishing",
    )
    parser.add_argument(
        "--token",
        help="access token, required for any --host but loopback (default: $SHOE_LORA_STUDIO_TOKEN); "
        "open the printed address once, the browser keeps it in a cookie",
    )
    parser.epilog = (
        "Reads the same config and writes the same files (the specs sheet, reviews.csv) as the renders "
        "assets; Render and Publish launch them through the Dagster webserver's GraphQL API."
    )


def cmd_studio(args: argparse.Namespace) -> int:
    """Serve the review studio for one category until interrupted."""
    from shoe_lora_pipeline.studio.serve import StudioConfigError, serve, studio_settings

    try:
        settings = studio_settings(args.config, args.category, args.host, args.dagster_url, args.token)
    except StudioConfigError as exc:
        return _error("studio", str(exc))
    serve(settings, args.host, args.port)
    return EXIT_OK


# -- registry ------------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, Subcommand] = {
    "audit": Subcommand(
        help="show the provenance and LoRA settings stored in an exported file or folder",
        add_arguments=_audit_arguments,
        run=cmd_audit,
    ),
    "lineage": Subcommand(
        help="list the Dagster materialisations that fed a LoRA (by run id or exported file), in pipeline order",
        add_arguments=_lineage_arguments,
        run=cmd_lineage,
    ),
    "publish": Subcommand(
        help="finish, mark as AI-generated and check images for marketplace profiles (Amazon, Google, Shopify)",
        add_arguments=_publish_arguments,
        run=cmd_publish,
    ),
    "render": Subcommand(
        help="render, QA-rank and publish product photos of one SKU with the category's LoRA",
        add_arguments=_render_arguments,
        run=cmd_render,
    ),
    "studio": Subcommand(
        help="serve the review studio: upload specs, render, approve and publish from one local web page",
        add_arguments=_studio_arguments,
        run=cmd_studio,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="shoe_lora_pipeline tools (product-photo LoRA for Stable Diffusion 1.5)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(p)
        p.set_defaults(_run=sub.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
