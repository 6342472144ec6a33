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
from typing import Any

PROG = "shoe-lora"
EXIT_OK = 0
EXIT_ERROR = 2  # also what argparse uses for usage errors


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
        help="an exported file (*.safetensors, README.md, provenance.json), the lora_weights folder "
        "or the final_pipeline folder",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_audit_table(record: Mapping[str, Any]) -> str:
    """Sections (LoRA, Provenance, other) of ``key  value`` rows, keys aligned across the whole table."""
    sections = [
        ("LoRA", list(_flatten(record.get("lora") or {}))),
        ("Provenance", list(_flatten(record.get("provenance") or {}))),
        ("Other", list(_flatten(record.get("extra") or {}))),
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


# -- registry ------------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, Subcommand] = {
    "audit": Subcommand(
        help="show the provenance and LoRA settings stored in an exported file or folder",
        add_arguments=_audit_arguments,
        run=cmd_audit,
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
