"""Captions core: styles.csv parsing, caption priority, colour estimation, captions.json format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from shoe_lora_pipeline.core.captions import (
    CaptionsFormatError,
    build_captions,
    colour_word,
    estimate_colour,
    load_styles,
    read_captions_json,
    render_caption,
    type_from_style,
    write_captions,
    write_captions_json,
)
from shoe_lora_pipeline.core.config import CAPTION_TEMPLATE, VALIDATION_PROMPTS

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


def shoe_image(
    colour: tuple[int, int, int], size: int = 128, outline: tuple[int, int, int] | None = None
) -> Image.Image:
    """A crude shoe (sole + upper + toe) in one colour on white, like a cleaned product photo."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = size / 128
    d.polygon(
        [
            (20 * s, 80 * s),
            (20 * s, 50 * s),
            (60 * s, 45 * s),
            (108 * s, 70 * s),
            (108 * s, 88 * s),
            (20 * s, 88 * s),
        ],
        fill=colour,
        outline=outline,
    )
    d.rectangle([18 * s, 86 * s, 110 * s, 92 * s], fill=outline or colour)
    return img


def write_styles(path: Path, lines: list[str]) -> Path:
    path.write_text(HEADER + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_dataset(tmp_path: Path, items: list[tuple[str, str, tuple[int, int, int]]]) -> tuple[Path, Path]:
    """cleaned_dir with manifest + PNGs, and raw_dir; items are (id, source, colour)."""
    raw, cleaned = tmp_path / "raw", tmp_path / "cleaned"
    (cleaned / "images").mkdir(parents=True)
    raw.mkdir()
    records = []
    for image_id, source, colour in items:
        (raw / source).parent.mkdir(parents=True, exist_ok=True)
        (raw / source).write_bytes(b"raw photo bytes " + image_id.encode())
        shoe_image(colour).save(cleaned / "images" / f"{image_id}.png")
        records.append(
            {
                "image_file": f"{image_id}.png",
                "id": image_id,
                "source": source,
                "source_sha256": f"{int(image_id):064x}" if image_id.isdigit() else "ab" * 32,
                "original_size": [600, 800],
                "original_mode": "RGB",
                "format": "jpg",
                "phash": "0" * 16,
                "near_duplicate_of": None,
            }
        )
    (cleaned / "manifest.json").write_text(json.dumps(records))
    return cleaned, raw


# ------------------------------------------------------------------------------------------------ styles


def test_load_styles_reports_bad_rows_and_never_follows_them(tmp_path: Path) -> None:
    csv_path = write_styles(
        tmp_path / "styles.csv",
        [
            "10001,Men,Footwear,Shoes,Casual Shoes,Brown,Summer,2012,Casual,Roadster Men Brown Casual Shoes",
            # extra comma in productDisplayName: 11 fields
            "10002,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,Puma Men, Black Shoes",
            "../../etc/passwd,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,x",
            "/abs/path,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,x",
            "abc,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,x",
            ",Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,x",
            "10001,Men,Footwear,Shoes,Casual Shoes,Red,Summer,2012,Casual,duplicate",
            "",
            '10003,Women,Footwear,Shoes,Heels,Red,Summer,2012,Casual,"Catwalk Women Red Heels, Peep Toe"',
        ],
    )
    table = load_styles(csv_path)
    assert sorted(table.rows) == ["10001", "10003"]
    assert table.rows["10001"].base_colour == "Brown"  # first of the duplicates wins
    assert table.rows["10003"].product_display_name == "Catwalk Women Red Heels, Peep Toe"  # quoted comma ok
    kinds = {(p["line"], p["kind"]) for p in table.problems}
    assert kinds == {
        (3, "malformed"),
        (4, "path_like_id"),
        (5, "path_like_id"),
        (6, "non_numeric_id"),
        (7, "missing_id"),
        (8, "duplicate_id"),
    }
    assert all({"line", "id", "problem"} <= set(p) for p in table.problems)
    bad = next(p for p in table.problems if p["line"] == 4)
    assert bad["id"] == "../../etc/passwd"


def test_load_styles_missing_file_is_a_note(tmp_path: Path) -> None:
    table = load_styles(tmp_path / "nope.csv")
    assert len(table) == 0 and table.problems == []
    assert len(table.notes) == 1 and "not found" in table.notes[0]


def test_load_styles_bom_and_bad_header(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes(
        ("\ufeff" + HEADER + "7,Men,Footwear,Shoes,Sports Shoes,Blue,Fall,2011,Sports,Nike\n").encode()
    )
    assert list(load_styles(p).rows) == ["7"]
    q = tmp_path / "nohdr.csv"
    q.write_text("foo,bar\n1,2\n")
    t = load_styles(q)
    assert len(t) == 0 and t.problems[0]["kind"] == "bad_header"


# ------------------------------------------------------------------------------------------------ words


@pytest.mark.parametrize(
    ("base", "word"),
    [
        ("Navy Blue", "navy"),
        ("Black", "black"),
        ("Off White", "off-white"),
        ("NA", None),
        ("", None),
        ("x;rm", None),
    ],
)
def test_colour_word(base: str, word: str | None) -> None:
    assert colour_word(base) == word


def test_validation_prompts_are_reachable() -> None:
    from shoe_lora_pipeline.core.captions import StyleRow

    def caption(colour: str, article: str, name: str) -> str:
        row = StyleRow(id="1", line=2, article_type=article, base_colour=colour, product_display_name=name)
        type_phrase, _ = type_from_style(row, "casual")
        from shoe_lora_pipeline.core.captions import material_from_name

        material = material_from_name(name)
        full = f"{material} {type_phrase}" if material else type_phrase
        return render_caption(CAPTION_TEMPLATE, colour_word(colour) or "", full, "side view")

    got = [
        caption("Black", "Casual Shoes", "Roadster Men Black Casual Shoes"),
        caption("Brown", "Casual Shoes", "Woodland Men Brown Leather Casual Shoes"),
        caption("White", "Casual Shoes", "Converse Unisex White Sneakers"),
        caption("Blue", "Casual Shoes", "Puma Men Blue Casual Shoes"),
    ]
    assert got == VALIDATION_PROMPTS


def test_render_caption_no_sneakers_shoes_and_empty_characteristics() -> None:
    assert "sandals on white" in render_caption(CAPTION_TEMPLATE, "red", "sandals", "side view")
    assert "casual shoes on white" in render_caption(CAPTION_TEMPLATE, "red", "casual", "side view")
    text = render_caption(CAPTION_TEMPLATE, "red", "casual", "")
    assert text == "A professional product photo of red casual shoes on white background, product photography"


# ------------------------------------------------------------------------------------------------ pixels


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((15, 15, 15), "black"),
        ((110, 70, 35), "brown"),
        ((35, 75, 190), "blue"),
        ((205, 25, 30), "red"),
        ((22, 30, 70), "navy"),
        ((128, 128, 128), "grey"),
    ],
)
def test_estimate_colour_known_shoes(rgb: tuple[int, int, int], name: str) -> None:
    got, details = estimate_colour(shoe_image(rgb, size=256))
    assert got == name, details
    assert 0.05 < details["foreground_fraction"] < 0.6
    assert details["median_rgb"] is not None and details["delta_e"] is not None


def test_estimate_colour_white_shoes() -> None:
    # A light shoe with a grey outline: the light body must dominate, not the outline.
    got, details = estimate_colour(shoe_image((238, 238, 236), outline=(120, 120, 120)))
    assert got == "white", details
    # Invisible on white (no foreground at all): white, low confidence.
    got, details = estimate_colour(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert got == "white" and details["confidence"] == "low"


# ------------------------------------------------------------------------------------------------ build


def test_caption_priority_sidecar_styles_pixels(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(
        tmp_path,
        [
            ("10001", "extra/10001.jpg", (110, 70, 35)),  # sidecar + styles row -> sidecar
            ("10002", "10002.jpg", (15, 15, 15)),  # styles row -> styles
            ("10003", "10003.jpg", (35, 75, 190)),  # nothing -> pixels: blue
            ("10004", "10004.jpg", (205, 25, 30)),  # empty sidecar -> reported, falls to pixels
        ],
    )
    (raw / "extra" / "10001.txt").write_text(
        "  A hand-written caption\nof a brown shoe  \n", encoding="utf-8"
    )
    (raw / "10004.txt").write_text("   \n")
    styles = load_styles(
        write_styles(
            tmp_path / "styles.csv",
            [
                "10001,Men,Footwear,Shoes,Casual Shoes,Tan,Summer,2012,Casual,Roadster Men Tan Shoes",
                "10002,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,Red Tape Men Black Leather Lace-Up Shoes",
                "99999,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,not in the images",
                "10005,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,Bad, Row",
            ],
        )
    )
    res = build_captions(cleaned, raw, styles, CAPTION_TEMPLATE, "casual", "side view")
    by = {e["image_file"]: e for e in res.entries}
    assert [e["image_file"] for e in res.entries] == ["10001.png", "10002.png", "10003.png", "10004.png"]
    assert by["10001.png"]["caption"] == "A hand-written caption of a brown shoe"
    assert by["10001.png"]["metadata"]["caption_source"] == "sidecar"
    assert by["10002.png"]["caption"] == (
        "A professional product photo of black leather casual shoes on white background, lace-up, product photography"
    )
    assert by["10002.png"]["metadata"]["caption_source"] == "styles"
    assert by["10003.png"]["caption"] == (
        "A professional product photo of blue casual shoes on white background, side view, product photography"
    )
    assert by["10003.png"]["metadata"]["caption_source"] == "estimated"
    assert by["10004.png"]["metadata"]["colour"] == "red"
    assert res.source_counts == res.counts_by_source == {"sidecar": 1, "styles": 1, "estimated": 2}
    kinds = sorted((p["kind"], p.get("id") or p.get("image_file")) for p in res.problems)
    assert kinds == [("bad_sidecar", "10004.png"), ("malformed", "10005"), ("unmatched", "99999")]
    assert res.colour_counts["black"] == 1 and res.type_counts["casual"] == 4
    assert res.styles_matched == 2


ROWS = {
    "10001": "10001,Men,Footwear,Shoes,Casual Shoes,Brown,Summer,2012,Casual,Roadster Men Brown Shoes",
    "10002": "10002,Men,Footwear,Shoes,Sneakers,White,Summer,2012,Casual,Streetline Men White Sneakers",
    "10003": "10003,Men,Footwear,Shoes,Casual Shoes,Black,Summer,2012,Casual,Roadster Men Black Shoes",
}


def _caption_run(cleaned: Path, raw: Path, tmp_path: Path, rows: dict[str, str]):  # noqa: ANN202
    styles = load_styles(write_styles(tmp_path / "styles.csv", list(rows.values())))
    out = tmp_path / "captions.json"
    res = build_captions(cleaned, raw, styles, CAPTION_TEMPLATE, "casual", "side view", previous=out)
    write_captions(res, out)
    return res, json.loads(out.read_text())


def test_captions_are_incremental_by_photo_and_sources(tmp_path: Path) -> None:
    items = [
        ("10001", "10001.jpg", (110, 70, 35)),
        ("10002", "a/10002.jpg", (238, 238, 236)),
        ("10002", "b/10002.jpg", (35, 75, 190)),  # same id (stem) in another folder: same styles row
        ("10003", "10003.jpg", (15, 15, 15)),
    ]
    cleaned, raw = make_dataset(tmp_path, items[:1] + items[3:])
    # make_dataset names images by id; give the two 10002 photos distinct files as the cleaner would.
    records = json.loads((cleaned / "manifest.json").read_text())
    for suffix, (image_id, source, colour) in zip(("", "_b"), items[1:3], strict=True):
        (raw / source).parent.mkdir(parents=True, exist_ok=True)
        (raw / source).write_bytes(source.encode())
        shoe_image(colour).save(cleaned / "images" / f"{image_id}{suffix}.png")
        records.append(
            {**records[0], "image_file": f"{image_id}{suffix}.png", "id": image_id, "source": source}
        )
        records[-1]["source_sha256"] = f"{len(records):064x}"
    (cleaned / "manifest.json").write_text(json.dumps(records))

    first, first_json = _caption_run(cleaned, raw, tmp_path, ROWS)
    assert sorted(first.captioned) == ["10001.png", "10002.png", "10002_b.png", "10003.png"]

    again, again_json = _caption_run(cleaned, raw, tmp_path, ROWS)
    assert again.captioned == [] and again.reused_count == 4 and again_json == first_json

    # An edited styles.csv row re-captions exactly the photos with that id, nothing else.
    edited = {**ROWS, "10002": ROWS["10002"].replace("White", "Red")}
    changed, changed_json = _caption_run(cleaned, raw, tmp_path, edited)
    assert sorted(changed.captioned) == ["10002.png", "10002_b.png"] and changed.reused_count == 2
    by = {e["image_file"]: e for e in changed_json}
    assert by["10002.png"]["caption"].startswith("A professional product photo of red ")
    assert [e for e in changed_json if e["image_file"] in ("10001.png", "10003.png")] == [
        e for e in first_json if e["image_file"] in ("10001.png", "10003.png")
    ]

    # A sidecar written for one photo re-captions that photo only.
    (raw / "10003.txt").write_text("A hand-written caption of a black shoe\n", encoding="utf-8")
    sidecar, _ = _caption_run(cleaned, raw, tmp_path, edited)
    assert sidecar.captioned == ["10003.png"]

    # A new photo is the only one captioned.
    shoe_image((35, 75, 190)).save(cleaned / "images" / "10004.png")
    records.append({**records[0], "image_file": "10004.png", "id": "10004", "source": "10004.jpg"})
    records[-1]["source_sha256"] = "cd" * 32
    (cleaned / "manifest.json").write_text(json.dumps(records))
    added, _ = _caption_run(cleaned, raw, tmp_path, edited)
    assert added.captioned == ["10004.png"] and added.reused_count == 4

    # captions.json edited by hand: nothing is trusted, everything is captioned again.
    out = tmp_path / "captions.json"
    out.write_text(out.read_text().replace("hand-written", "hand written"))
    redo, _ = _caption_run(cleaned, raw, tmp_path, edited)
    assert len(redo.captioned) == 5


def test_metadata_jsonl_captions_between_sidecar_and_styles(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(
        tmp_path,
        [
            ("10001", "10001.jpg", (110, 70, 35)),  # sidecar + metadata + styles -> sidecar
            ("10002", "sub/10002.jpg", (15, 15, 15)),  # metadata + styles -> metadata
            ("10003", "10003.jpg", (35, 75, 190)),  # empty metadata text + styles -> styles
        ],
    )
    (raw / "10001.txt").write_text("A hand-written caption\n", encoding="utf-8")
    lines = [
        {"file_name": "10001.jpg", "text": "from the jsonl, loses to the sidecar"},
        {"file_name": "./sub/10002.jpg", "text": "  a black shoe,\n from metadata.jsonl ", "split": "train"},
        {"file_name": "10003.jpg", "text": "   "},
        {"file_name": "gone.jpg", "text": "a photo cleaning rejected"},
    ]
    (raw / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n", encoding="utf-8")
    styles = load_styles(write_styles(tmp_path / "styles.csv", list(ROWS.values())))
    res = build_captions(cleaned, raw, styles, CAPTION_TEMPLATE, "casual", "side view")
    by = {e["image_file"]: e for e in res.entries}
    assert by["10001.png"]["metadata"]["caption_source"] == "sidecar"
    assert by["10002.png"]["caption"] == "a black shoe, from metadata.jsonl"
    assert by["10002.png"]["metadata"]["caption_source"] == "metadata"
    assert by["10002.png"]["metadata"]["metadata_line"] == 2
    assert by["10003.png"]["metadata"]["caption_source"] == "styles"
    assert res.source_counts == {"sidecar": 1, "metadata": 1, "styles": 1, "estimated": 0}
    problems = {(p["kind"], p.get("line")) for p in res.problems}
    assert problems == {("bad_metadata", 3), ("unmatched_metadata", 4)}


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"file_name": "10001.jpg", "text": "unterminated}', "line 2: not valid JSON"),
        ('["10001.jpg", "a caption"]', "line 2: expected a JSON object"),
        ('{"text": "no file name"}', "line 2: file_name None must be a relative path"),
        ('{"file_name": "../outside.jpg", "text": "x"}', "line 2: file_name '../outside.jpg'"),
        ('{"file_name": "10002.jpg", "caption": "wrong column"}', "line 2: 'text' must be a string"),
        (
            '{"file_name": "10001.jpg", "text": "again"}',
            "line 2: duplicate file_name '10001.jpg' (first on line 1)",
        ),
    ],
)
def test_bad_metadata_jsonl_names_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    cleaned, raw = make_dataset(tmp_path, [("10001", "10001.jpg", (110, 70, 35))])
    path = raw / "metadata.jsonl"
    path.write_text(
        json.dumps({"file_name": "10001.jpg", "text": "fine"}) + "\n" + line + "\n", encoding="utf-8"
    )
    with pytest.raises(CaptionsFormatError) as err:
        build_captions(cleaned, raw, load_styles(None), CAPTION_TEMPLATE, "casual", "side view")
    assert str(path) in str(err.value) and needle in str(err.value)


def test_sidecar_escaping_raw_dir_is_reported(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(tmp_path, [("10001", "10001.jpg", (15, 15, 15))])
    outside = tmp_path / "secret.txt"
    outside.write_text("leaked text")
    (raw / "10001.txt").symlink_to(outside)
    res = build_captions(cleaned, raw, load_styles(None), CAPTION_TEMPLATE, "casual", "side view")
    entry = res.entries[0]
    assert "leaked" not in entry["caption"] and entry["metadata"]["caption_source"] == "estimated"
    assert [p["kind"] for p in res.problems] == ["bad_sidecar"]
    assert "outside raw_dir" in res.problems[0]["problem"]


def test_manifest_source_with_dotdot_is_not_followed(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(tmp_path, [("10001", "10001.jpg", (15, 15, 15))])
    (tmp_path / "evil.txt").write_text("leaked")
    records = json.loads((cleaned / "manifest.json").read_text())
    records[0]["source"] = "../evil.jpg"
    (cleaned / "manifest.json").write_text(json.dumps(records))
    res = build_captions(cleaned, raw, load_styles(None), CAPTION_TEMPLATE, "casual", "side view")
    assert "leaked" not in res.entries[0]["caption"]
    assert res.problems[0]["kind"] == "bad_sidecar"


def test_sneakers_type_from_styles(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(tmp_path, [("10001", "10001.jpg", (240, 240, 240))])
    styles = load_styles(
        write_styles(
            tmp_path / "styles.csv",
            [
                "10001,Unisex,Footwear,Shoes,Casual Shoes,White,Summer,2012,Casual,Converse Unisex White Sneakers"
            ],
        )
    )
    e = build_captions(cleaned, raw, styles, CAPTION_TEMPLATE, "casual", "side view").entries[0]
    assert e["caption"].startswith(
        "A professional product photo of white casual sneakers on white background"
    )
    assert e["metadata"]["type"] == "casual sneakers"


# ------------------------------------------------------------------------------------------------ json


def test_captions_json_exact_format_and_round_trip(tmp_path: Path) -> None:
    cleaned, raw = make_dataset(
        tmp_path, [("10002", "10002.jpg", (15, 15, 15)), ("10001", "a/10001.jpg", (35, 75, 190))]
    )
    entries = build_captions(cleaned, raw, load_styles(None), CAPTION_TEMPLATE, "casual", "side view").entries
    out = write_captions_json(entries, tmp_path / "out" / "captions.json")
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [e["image_file"] for e in data] == ["10001.png", "10002.png"]
    for e in data:
        assert list(e) == ["image_file", "caption", "metadata"]
        assert list(e["metadata"])[:2] == ["original_size", "processed"]
        assert e["metadata"]["original_size"] == [600, 800] and e["metadata"]["processed"] is True
        assert isinstance(e["caption"], str) and e["caption"]
    assert data[0]["metadata"]["source"] == "a/10001.jpg"
    first = out.read_bytes()
    write_captions_json(list(reversed(entries)), out)
    assert out.read_bytes() == first  # deterministic
    assert read_captions_json(out) == data
    assert [p.name for p in out.parent.iterdir()] == ["captions.json"]  # no temp file left


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (
            {
                "image_file": "../x.png",
                "caption": "c",
                "metadata": {"original_size": [1, 1], "processed": True},
            },
            "plain file name",
        ),
        (
            {"image_file": "x.png", "caption": "", "metadata": {"original_size": [1, 1], "processed": True}},
            "caption",
        ),
        ({"image_file": "x.png", "caption": "c", "metadata": {"processed": True}}, "original_size"),
        ({"image_file": "x.png", "caption": "c", "metadata": {"original_size": [1, 1]}}, "processed"),
    ],
)
def test_read_captions_json_names_file_and_entry(tmp_path: Path, bad: dict, needle: str) -> None:
    good = {"image_file": "a.png", "caption": "c", "metadata": {"original_size": [1, 1], "processed": True}}
    p = tmp_path / "captions.json"
    p.write_text(json.dumps([good, bad]))
    with pytest.raises(CaptionsFormatError) as err:
        read_captions_json(p)
    assert str(p) in str(err.value) and "entry 1" in str(err.value) and needle in str(err.value)
