"""Specs sheet validation (hostile rows refused and named, the rest go on), renders config, reviews.csv."""

import csv
from pathlib import Path

import pytest

from shoe_lora_pipeline.core.config import CAPTION_TEMPLATE, ConfigError, load_config
from shoe_lora_pipeline.core.renders import ReviewsError, SpecsError, candidate_seed, parse_specs_text
from shoe_lora_pipeline.core.renders.pnginfo import a1111_parameters, parse_a1111_parameters
from shoe_lora_pipeline.core.renders.review import (
    Review,
    decide,
    merge_reviews,
    read_reviews,
    write_reviews,
)
from shoe_lora_pipeline.core.renders.specs import read_specs, write_rejected

RULES = {
    "template": CAPTION_TEMPLATE,
    "default_characteristics": "side view",
    "default_negative_prompt": "blurry",
    "max_per_sku": 4,
}
HEADER = "sku,colour,type,characteristics,count,view,prompt,negative_prompt\n"


def parse(body: str, header: str = HEADER):  # noqa: ANN201
    return parse_specs_text(header + body, **RULES)


def test_good_rows_get_the_training_caption_template() -> None:
    rows, rejected, _ = parse(
        "A-1,black,casual,lace-up,2,side,,\n"
        "B-2,white,casual sneakers,,1,,,\n"
        "Ü-ß 3,navy,loafers,suede,1,,,no text\n"
        "C-4,red,casual,,1,,A red shoe floating in space,\n"
    )
    assert not rejected
    a, b, u, c = rows
    assert a.prompt == (
        "A professional product photo of black casual shoes on white background, side view, lace-up, "
        "product photography"
    )
    # A footwear noun swallows the template's "shoes"; no characteristics → dataset default.
    assert b.prompt.startswith(
        "A professional product photo of white casual sneakers on white background, side view"
    )
    assert u.sku == "Ü-ß 3" and u.negative_prompt == "no text" and a.negative_prompt == "blurry"
    assert c.prompt == "A red shoe floating in space" and c.prompt_source == "sheet"
    assert a.row_hash() != b.row_hash()


HOSTILE = {
    "../x": "path separator",
    "a/b": "path separator",
    "a\\b": "path separator",
    "..": "starts with '.'",
    ".hidden": "starts with '.'",
    "nul\x00byte": "control character",
    "x" * 101: "bytes long",
    "é" * 51: "bytes long",  # 102 bytes of UTF-8
    "=HYPERLINK(1)": "formula",
    "a:b": "refuse",
    "trailing.": "ends with",
}


def test_hostile_skus_are_refused_and_named_the_rest_go_on(tmp_path: Path) -> None:
    body = "GOOD-1,black,casual,,1,,,\n"
    body += "".join(f'"{sku}",black,casual,,1,,,\n' for sku in HOSTILE)
    body += "GOOD-2,brown,casual,,1,,,\n"
    rows, rejected, _ = parse(body)
    assert [r.sku for r in rows] == ["GOOD-1", "GOOD-2"]
    assert len(rejected) == len(HOSTILE)
    for r, (sku, why) in zip(rejected, HOSTILE.items(), strict=True):
        assert r.sku == sku and why in r.problem, (sku, r.problem)
    assert rejected[0].line == 3  # physical line in the file (header is line 1)

    out = write_rejected(rejected, tmp_path / "rejected_specs.csv")
    with out.open(newline="", encoding="utf-8") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(HOSTILE)
    assert "\x00" not in out.read_text(encoding="utf-8")  # escaped, so the file stays one row per line
    assert next(w for w in written if "formula" in w["problem"])["sku"].startswith("'=")


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("S,,casual,,1,,,", "missing colour"),
        ("S,black,,,1,,,", "missing type"),
        ("S,black,casual,,0,,,", "at least 1"),
        ("S,black,casual,,-2,,,", "at least 1"),
        ("S,black,casual,,5,,,", "max_per_sku = 4"),
        ("S,black,casual,,two,,,", "not a whole number"),
        ("S,black,casual,,1.5,,,", "not a whole number"),
        (",black,casual,,1,,,", "missing sku"),
        ('S,"bla\nck",casual,,1,,,', "control character"),
        ("S,black,casual,,1,,,,extra", "fields"),
        ("S,black,casual,,1,,", "fields"),
        ("S,black,casual," + "x" * 201 + ",1,,,", "characteristics is 201"),
    ],
)
def test_bad_rows(row: str, why: str) -> None:
    rows, rejected, _ = parse(row + "\nOK,black,casual,,1,,,\n")
    assert [r.sku for r in rows] == ["OK"]
    assert len(rejected) == 1 and why in rejected[0].problem, rejected[0].problem


def test_duplicates_unicode_normalisation_and_case() -> None:
    rows, rejected, _ = parse(
        "CAFÉ-1,black,casual,,1,,,\n"
        "CAFE\u0301-1,brown,casual,,1,,,\n"  # the same SKU, decomposed
        "café-1,red,casual,,1,,,\n"  # one folder on macOS / Windows
        "OTHER,red,casual,,1,,,\n"
    )
    assert [r.sku for r in rows] == ["CAFÉ-1", "OTHER"]
    assert [r.problem for r in rejected] == ["duplicate sku: line 2 has it"] * 2


def test_whole_sheet_problems_are_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecsError, match="lacks the column"):
        parse("A,black,casual,1\n", header="sku,colour,type,count\n")
    with pytest.raises(SpecsError, match="empty file"):
        parse("", header="")
    with pytest.raises(SpecsError, match="file not found"):
        read_specs(tmp_path / "nope.csv", **RULES)
    sheet = tmp_path / "specs.csv"
    sheet.write_bytes(
        b"\xef\xbb\xbfSKU,Colour,Type,Characteristics,Count,Extra\nA,black,casual,,1,x\nB,bl\xffack,casual,,1,x\n"
    )
    parsed = read_specs(sheet, **RULES)
    assert [r.sku for r in parsed.rows] == ["A"]  # BOM and header case handled
    assert "UTF-8" in parsed.rejected[0].problem
    assert parsed.notes == [f"{sheet}: columns ignored: extra"]


def test_seeds_depend_on_sku_and_index_only() -> None:
    seeds = [candidate_seed(0, "A-1", i) for i in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [candidate_seed(0, "A-1", i) for i in range(8)]
    assert candidate_seed(0, "A-2", 0) != seeds[0] and candidate_seed(1, "A-1", 0) != seeds[0]


def test_config_renders_section_and_categories(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        """
dataset: {name: shoes, raw_dir: raw, output_dir: out/shoes}
categories:
  boots: {raw_dir: raw, output_dir: out/boots, renders: {specs_csv: sheets/boots.csv}}
  sandals: {raw_dir: raw, output_dir: out/sandals}
training: {output_dir: out/shoes/lora}
renders: {specs_csv: sheets/shoes.csv, candidates_per_image: 3}
"""
    )
    cfg = load_config(cfg_file)
    assert cfg.renders.specs_csv == tmp_path / "sheets" / "shoes.csv"
    boots = cfg.for_category("boots")
    assert boots.renders.specs_csv == tmp_path / "sheets" / "boots.csv"
    assert boots.renders.candidates_per_image == 3
    assert cfg.for_category("sandals").renders.specs_csv is None  # never another category's sheet
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(cfg_file, overrides=["renders.resolution=100"])
    demo = load_config("configs/demo.yaml", check_paths=False)
    assert demo.renders.specs_csv is not None and demo.renders.specs_csv.is_file()
    assert demo.renders.require_qa_pass is True  # tiny-shoes draws shoes: only QA-passing renders publish


def test_a1111_parameters_round_trip() -> None:
    text = a1111_parameters(
        prompt="A photo of navy shoes, side view",
        negative_prompt="blurry, text",
        steps=25,
        sampler="DPM++ 2M",
        cfg_scale=7.5,
        seed=123,
        size=512,
        model_hash="abcdef0123",
        model="org/model",
        lora_name="casual_shoes_lora",
        lora_hash="0123456789ab",
    )
    assert text.splitlines()[2].startswith(
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 123, Size: 512x512"
    )
    parsed = parse_a1111_parameters(text)
    assert (
        parsed["prompt"] == "A photo of navy shoes, side view" and parsed["negative_prompt"] == "blurry, text"
    )
    assert parsed["Lora hashes"] == "casual_shoes_lora: 0123456789ab" and parsed["Seed"] == "123"


# -- reviews.csv -----------------------------------------------------------------------------------


def record(sku: str, count: int, passed: list[bool]) -> dict:
    cands = [
        {
            "index": i,
            "file": f"{i:03d}-k.png",
            "rank": i + 1,
            "seed": i,
            "qa": {"passed": p, "score": 1 - i / 10},
        }
        for i, p in enumerate(passed)
    ]
    return {"sku": sku, "row": {"count": count}, "candidates": cands}


def decisions(reviews: list[Review]) -> list[tuple[str, str, str, str]]:
    return [(r.sku, r.file, r.decision, r.note) for r in reviews]


def with_images(rec: dict, prefix: str = "k") -> dict:
    """``rec`` whose candidates carry an image hash, as product_renders writes them."""
    for c in rec["candidates"]:
        c["image_sha256"] = f"img-{rec['sku']}-{c['seed']}"
        c["file"] = f"{c['index']:03d}-{prefix}.png"
    return rec


def test_decision_follows_the_image_through_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    records = [with_images(record("A", 1, [True, True, True]))]
    write_reviews(merge_reviews(read_reviews(path), records), path)
    assert path.read_text().splitlines()[0] == "sku,file,decision,note,seed,image_sha256"
    path.write_text(path.read_text().replace("A,000-k.png,,", "A,000-k.png,reject,blurry"))

    # The same images re-rendered under new names (e.g. after a re-export): the reject stays on its row.
    renamed = [with_images(record("A", 1, [True, True, True]), prefix="new")]
    merged = merge_reviews(read_reviews(path), renamed)
    assert decisions(merged) == [
        ("A", "000-new.png", "reject", "blurry"),
        ("A", "001-new.png", "", ""),
        ("A", "002-new.png", "", ""),
    ]
    assert merged[0].image_sha256 == "img-A-0" and merged[0].seed == "0"
    approved = decide(renamed, merged, auto_approve=True, require_qa_pass=True)
    assert [a["file"] for a in approved["A"]] == ["001-new.png"]

    # An image identical to a rejected one is never approved automatically, whatever its name or row.
    copy = with_images(record("A", 1, [True, True]), prefix="copy")
    copy["candidates"][1]["image_sha256"] = "img-A-0"  # same pixels as the rejected image
    copy["candidates"][0]["image_sha256"] = "img-A-0"
    approved = decide([copy], merged, auto_approve=True, require_qa_pass=False)
    assert approved["A"] == []


def test_old_reviews_csv_is_migrated_by_file_name(tmp_path: Path) -> None:
    """A reviews.csv without seed / image_sha256 (written by an earlier version): its rows get the image of
    the file they name, also when a re-render renamed that file (render.json ``previous``)."""
    path = tmp_path / "reviews.csv"
    path.write_text(
        "sku,file,decision,note\nA,000-old.png,reject,scuffed\nA,001-k.png,approve,\nB,000-gone.png,reject,x\n"
    )
    rec = with_images(record("A", 1, [True, True, True]))
    rec["previous"] = [{"file": "000-old.png", "seed": 0, "image_sha256": "img-A-0"}]
    merged = merge_reviews(read_reviews(path), [rec])
    assert decisions(merged) == [
        ("A", "000-k.png", "reject", "scuffed"),
        ("A", "001-k.png", "approve", ""),
        ("A", "002-k.png", "", ""),
        ("B", "000-gone.png", "reject", "x"),  # no image known: kept at the end, as before
    ]
    write_reviews(merged, path)
    assert "A,000-k.png,reject,scuffed,0,img-A-0" in path.read_text()
    approved = decide([rec], read_reviews(path), auto_approve=True, require_qa_pass=True)
    assert [(a["file"], a["source"]) for a in approved["A"]] == [("001-k.png", "review")]

    # Two rows naming the same image with opposite decisions cannot both hold.
    path.write_text("sku,file,decision,note\nA,000-old.png,reject,\nA,000-k.png,approve,\n")
    with pytest.raises(ReviewsError, match="same image with different decisions"):
        merge_reviews(read_reviews(path), [rec])


def test_reviews_round_trip_keeps_decisions_and_notes(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    records = [record("A", 1, [True, True, False]), record("B", 1, [False, False])]
    write_reviews(merge_reviews(read_reviews(path), records), path)
    rows = read_reviews(path)
    assert [(r.sku, r.file, r.decision) for r in rows][:2] == [("A", "000-k.png", ""), ("A", "001-k.png", "")]

    # A reviewer edits it (as Excel saves it: BOM, semicolons, other case).
    text = (
        path.read_text()
        .replace("A,000-k.png,,", "A,000-k.png,Rejected,too dark")
        .replace("B,001-k.png,,", "B,001-k.png,approve,")
    )
    path.write_text("\ufeff" + text.replace(",", ";"), encoding="utf-8")
    reviews = read_reviews(path)
    assert ("A", "000-k.png", "reject", "too dark") in decisions(reviews)

    # Re-run with A re-rendered (new files): decisions on vanished files with a note are kept at the end.
    records2 = [record("A", 1, [True]), record("B", 1, [False, False])]
    records2[0]["candidates"][0]["file"] = "000-new.png"
    merged = merge_reviews(reviews, records2)
    write_reviews(merged, path)
    again = read_reviews(path)
    assert decisions(again)[-1] == ("A", "000-k.png", "reject", "too dark")
    assert ("B", "001-k.png", "approve", "") in decisions(again)
    assert len(again) == 4


def test_approval_rule() -> None:
    recs = [record("A", 2, [True, True, True]), record("B", 1, [False, False]), record("C", 1, [True, True])]
    reviews = [Review("A", "000-k.png", "reject"), Review("C", "001-k.png", "approve")]
    strict = decide(recs, reviews, auto_approve=True, require_qa_pass=True)
    assert [a["file"] for a in strict["A"]] == ["001-k.png", "002-k.png"]  # best not rejected
    assert strict["B"] == []  # nothing passes QA
    assert [(a["file"], a["source"]) for a in strict["C"]] == [("001-k.png", "review")]  # count reached
    lax = decide(recs, reviews, auto_approve=True, require_qa_pass=False)
    assert [a["file"] for a in lax["B"]] == ["000-k.png"]
    manual = decide(recs, reviews, auto_approve=False, require_qa_pass=False)
    assert manual["A"] == [] and len(manual["C"]) == 1


def test_bad_reviews_stop_with_line_and_value(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("sku,file,decision,note\nA,000-k.png,rejct,\n")
    with pytest.raises(ReviewsError, match=r"line 2: decision 'rejct'"):
        read_reviews(path)
    path.write_text("sku,file,decision\nA,0.png,approve\nA,0.png,reject\n")
    with pytest.raises(ReviewsError, match="different decisions"):
        read_reviews(path)
    path.write_text("sku,decision\nA,approve\n")
    with pytest.raises(ReviewsError, match="lacks the column"):
        read_reviews(path)
