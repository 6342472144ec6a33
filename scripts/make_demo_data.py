#!/usr/bin/env python
"""Draw the bundled demo data set: ~100 synthetic side-view shoe "product photos" plus edge cases.

Usage: ``python scripts/make_demo_data.py [--out data/casual_shoes/raw]``

Every random choice comes from fixed seeds and nothing time-dependent is written (no EXIF dates,
no PNG time chunks), so two runs produce byte-identical files with the same Pillow/libjpeg/libwebp
builds. The script only writes its own file names and never deletes anything. See data/README.md
for what the files are and which ones are deliberately broken. The shoes are drawn by
``shoe_drawing.py``; the unusual and the broken files come from ``hostile_files.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from hostile_files import encode, invalid_files
from PIL import Image
from shoe_drawing import ARTICLES, ShoeSpec, compose, luminance, make_spec, on_white

from shoe_lora_pipeline.core.styles import STYLES_COLUMNS  # importable once shoe_drawing is

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "casual_shoes" / "raw"

SEED = 20240611
FIRST_ID = 10001
N_VALID = 100

STYLES_HEADER = ",".join(STYLES_COLUMNS)
# Invented brand names: the demo should not look like it ships anyone's catalogue.
BRANDS = ["Fieldcraft", "Urban Step", "Northwalk", "Maple & Co", "Streetline", "Cobblestone", "Kestrel"]
SEASONS = ["Summer", "Fall", "Winter", "Spring"]
# How many of the 100 valid images get each colour: the recipe's colours dominate.
COLOUR_COUNTS = {
    "Black": 18,
    "Brown": 18,
    "White": 17,
    "Blue": 17,
    "Grey": 7,
    "Navy Blue": 7,
    "Red": 6,
    "Beige": 5,
    "Green": 5,
}
# Loafers in white/red/green are rare in a casual catalogue; keep the types plausible per colour.
TYPE_WEIGHTS: dict[str, tuple[float, float, float]] = {  # (Casual Shoes, Sneakers, Loafers)
    "Black": (0.45, 0.30, 0.25),
    "Brown": (0.50, 0.10, 0.40),
    "White": (0.35, 0.65, 0.0),
    "Blue": (0.45, 0.45, 0.10),
    "Grey": (0.45, 0.55, 0.0),
    "Navy Blue": (0.40, 0.35, 0.25),
    "Red": (0.40, 0.60, 0.0),
    "Beige": (0.45, 0.15, 0.40),
    "Green": (0.55, 0.45, 0.0),
}


# --------------------------------------------------------------------------------------------
# Data set plan
# --------------------------------------------------------------------------------------------

ASPECTS = [  # (w, h, weight): mostly landscape product-shot framings
    (4, 3, 30),
    (3, 2, 22),
    (16, 10, 6),
    (5, 4, 6),
    (1, 1, 20),
    (3, 4, 10),
    (2, 3, 6),
]


@dataclass(frozen=True)
class Item:
    id: int
    spec: ShoeSpec
    size: tuple[int, int]
    kind: str  # how it is saved, see save_item
    subdir: str = ""
    quality: int = 90

    @property
    def ext(self) -> str:
        return {"gif": "gif", "webp": "webp", "webp_lossless": "webp", "webp_anim": "webp"}.get(
            self.kind, "jpg" if self.kind.startswith("jpeg") else "png"
        )

    @property
    def relpath(self) -> str:
        name = f"{self.id}.{self.ext}"
        return f"{self.subdir}/{name}" if self.subdir else name


# Special valid cases pinned to ids so data/README.md can name them.
SPECIAL: dict[int, tuple[str, str]] = {
    10007: ("png_rgba", ""),
    10031: ("png_rgba", ""),
    10058: ("png_rgba", ""),
    10015: ("png_la", ""),
    10072: ("png_la", ""),
    10023: ("png_p_transparent", ""),
    10066: ("png_p_transparent", ""),
    10019: ("jpeg_l", ""),
    10083: ("jpeg_l", ""),
    10027: ("jpeg_cmyk", ""),
    10091: ("jpeg_cmyk", ""),
    10035: ("png_i16", ""),
    10077: ("png_i16", ""),
    10042: ("jpeg_exif6", ""),
    10088: ("jpeg_exif8", ""),
    10050: ("gif", ""),
    10097: ("gif", ""),
    10062: ("webp_anim", ""),
    10095: ("webp_anim", ""),
    10044: ("webp_lossless", ""),
    10099: ("png", "extra"),
    10100: ("jpeg", "extra"),
    10005: ("jpeg", ""),  # source of the exact duplicate
    10012: ("jpeg", ""),  # source of the near duplicate
}
EXACT_DUP_OF = 10005
NEAR_DUP_OF = 10012
SIDECAR_IDS = (10010, 10060)
MALFORMED_ROW_ID = 10021  # its styles.csv row has an extra field, so it is effectively row-less


def plan(seed: int = SEED) -> list[Item]:
    rng = random.Random(seed)
    colours = [c for c, n in COLOUR_COUNTS.items() for _ in range(n)]
    assert len(colours) == N_VALID
    rng.shuffle(colours)
    items = []
    for i, colour in enumerate(colours):
        iid = FIRST_ID + i
        r = random.Random(seed * 1_000_003 + iid)  # per-image stream: editing one image moves no other
        article = r.choices(ARTICLES, weights=TYPE_WEIGHTS[colour])[0]
        spec = make_spec(r, colour, article)
        aw, ah, _ = r.choices(ASPECTS, weights=[a[2] for a in ASPECTS])[0]
        kind, subdir = SPECIAL.get(iid, ("", ""))
        if not kind:
            kind = r.choices(["jpeg", "png", "webp"], weights=[72, 12, 16])[0]
        # PNG is lossless and big: keep those frames small so the folder stays a few MB.
        lo, hi = (300, 640) if kind.startswith("png") or kind in ("gif", "webp_anim") else (320, 1200)
        long_side = round(lo + (hi - lo) * r.random() ** 1.6)
        if aw >= ah:
            size = (long_side, round(long_side * ah / aw))
        else:
            size = (round(long_side * aw / ah), long_side)
        items.append(Item(iid, spec, size, kind, subdir, quality=r.randint(85, 92)))
    return items


def variant_frames(item: Item, first: Image.Image) -> list[Image.Image]:
    """Frames 2-3 of an animation: the same shoe turned around, then in a sibling colour."""
    r = random.Random(item.id * 7 + 1)
    flipped = replace(item.spec, facing_left=not item.spec.facing_left)
    other = make_spec(r, "Grey" if item.spec.colour != "Grey" else "Blue", item.spec.article)
    return [
        first,
        on_white(compose(flipped, item.size, random.Random(item.id * 7 + 2))),
        on_white(compose(other, item.size, random.Random(item.id * 7 + 3))),
    ]


# --------------------------------------------------------------------------------------------
# Metadata: styles.csv + sidecar captions
# --------------------------------------------------------------------------------------------


def styles_rows(items: list[Item], no_row: set[int]) -> list[str]:
    rows = []
    for it in items:
        if it.id in no_row:
            continue
        r = random.Random(it.id * 13)
        gender = r.choices(["Men", "Women", "Unisex"], weights=[6, 3, 1])[0]
        brand = r.choice(BRANDS)
        name = f"{brand} {gender} {it.spec.colour} {it.spec.article}"
        fields = [
            str(it.id),
            gender,
            "Footwear",
            "Shoes",
            it.spec.article,
            it.spec.colour,
            r.choice(SEASONS),
            str(r.randint(2011, 2018)),
            "Casual",
            name,
        ]
        if it.id == MALFORMED_ROW_ID:
            # The real Kaggle file has exactly this defect: an unquoted comma in the display name.
            fields[-1] = f"{brand} {gender} {it.spec.colour}, Tan {it.spec.article}"
        rows.append(",".join(fields))
    # Problem rows, spliced in among the good ones rather than appended, as in messy real exports.
    bad = [
        "../../etc/passwd,Men,Footwear,Shoes,Casual Shoes,Black,Fall,2012,Casual,Path Traversal Men Black Casual Shoes",
        "abc123,Women,Footwear,Shoes,Sneakers,White,Summer,2016,Casual,Streetline Women White Sneakers",
        "19001,Men,Footwear,Shoes,Casual Shoes,Brown,Winter,2014,Casual,Northwalk Men Brown Casual Shoes",
        "19002,Unisex,Footwear,Shoes,Sneakers,Blue,Spring,2017,Casual,Kestrel Unisex Blue Sneakers",
    ]
    for k, line in enumerate(bad):
        rows.insert(min(len(rows), 15 + 20 * k), line)
    return [STYLES_HEADER, *rows]


def pick_rowless(items: list[Item]) -> set[int]:
    """~10 ordinary colour images without a styles.csv row, covering the main colours, so colour
    estimation from pixels is exercised on black/brown/white/blue and a few others."""
    wanted = ["Black", "Brown", "White", "Blue", "Red", "Grey", "Navy Blue", "Beige", "Green", "White"]
    chosen: set[int] = set()
    for colour in wanted:
        for it in items:
            if (
                it.spec.colour == colour
                and it.id not in chosen
                and it.id not in SPECIAL
                and it.id not in SIDECAR_IDS
                and it.id != MALFORMED_ROW_ID
                and it.id % 3 == 1  # spread them out instead of taking the first of each colour
            ):
                chosen.add(it.id)
                break
    return chosen


def sidecar_text(it: Item) -> str:
    """A hand-written-style caption that is more specific than the template (it must win)."""
    sp = it.spec
    sole = "white" if luminance(sp.sole) > 200 else "gum" if sp.sole[0] - sp.sole[2] > 80 else "dark"
    what = {
        "Sneakers": f"low-top lace-up sneakers with {sole} rubber cupsoles",
        "Loafers": f"penny loafers with moccasin stitching and {sole} soles",
        "Casual Shoes": f"lace-up derby shoes with {sole} rubber soles",
    }[sp.article]
    return f"A professional product photo of {sp.colour.lower()} {what} on white background, side view, product photography\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def describe(path: Path) -> str:
    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            return f"{im.format} {im.mode}" + (" animated" if n > 1 else "")
    except Exception:
        return "invalid"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default %(default)s)")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    items = plan()
    by_id = {it.id: it for it in items}
    files: dict[str, bytes] = {}
    near_dup_source: Image.Image | None = None
    taken: list[int] = []  # perceptual hashes so far, to keep unrelated images apart
    for n, it in enumerate(items, 1):
        layer = compose(it.spec, it.size, random.Random(it.id * 31 + 7), taken)
        files[it.relpath] = encode(it.kind, layer, it.quality, lambda first, it=it: variant_frames(it, first))
        if it.id == NEAR_DUP_OF:
            near_dup_source = on_white(layer)
        if n % 25 == 0:
            print(f"  drew {n}/{len(items)} images", file=sys.stderr)
    assert near_dup_source is not None
    invalid = invalid_files(
        SEED, (EXACT_DUP_OF, files[by_id[EXACT_DUP_OF].relpath]), (NEAR_DUP_OF, near_dup_source)
    )
    files.update(invalid)

    rowless = pick_rowless(items)
    files["styles.csv"] = ("\n".join(styles_rows(items, rowless)) + "\n").encode()
    for sid in SIDECAR_IDS:
        it = by_id[sid]
        files[str(Path(it.relpath).with_suffix(".txt"))] = sidecar_text(it).encode()

    # Write only our own names; anything else in --out is left alone but mentioned.
    foreign = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and str(p.relative_to(out)) not in files
    )
    for rel, data in sorted(files.items()):
        write(out / rel, data)

    valid = {it.relpath for it in items}
    kinds = Counter(describe(out / rel) for rel in valid)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files to {out} ({total / 1e6:.2f} MB)")
    print(f"  {len(valid)} valid images by format/mode:")
    for k, n in sorted(kinds.items()):
        print(f"    {n:3d}  {k}")
    print(f"  {len(invalid)} deliberately bad/duplicate files: {', '.join(sorted(invalid))}")
    print(
        f"  styles.csv: {len(items) - len(rowless) - 1} good rows + 1 malformed ({MALFORMED_ROW_ID}) + 4 problem rows"
    )
    print(f"  images without a usable row: {sorted(rowless | {MALFORMED_ROW_ID})}")
    print(f"  sidecar captions: {', '.join(f'{i}.txt' for i in SIDECAR_IDS)}")
    if foreign:
        print(f"  note: {len(foreign)} other file(s) in {out} were left untouched: {foreign[:5]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
