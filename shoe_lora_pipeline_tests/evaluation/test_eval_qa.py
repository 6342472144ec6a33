"""Weight-free product-photo QA on images whose answer is known by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

from shoe_lora_pipeline.core.config import EvaluationThresholds
from shoe_lora_pipeline.core.evaluation import qa
from shoe_lora_pipeline.core.evaluation.checks import checklist
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage
from shoe_lora_pipeline.core.imagehash import phash
from shoe_lora_pipeline_tests.support.evaluation import BLACK, RED, WHITE, draw_shoe, shoe, varied_shoes


def test_centred_black_shoe_on_white_passes_everything() -> None:
    img = shoe()
    r = qa.image_qa(img, "A professional product photo of black casual shoes on white background")
    assert r.white_background.passed and r.white_background.value == 1.0
    assert r.centring.passed and r.centring.value <= 0.05
    assert r.single_object.passed and r.single_object.value == 1
    assert r.colour.passed and r.colour.details["measured"] == "black"
    assert r.sharpness.passed


def test_shoe_in_a_corner_fails_centring() -> None:
    r = qa.centring(shoe(centre=(30, 28), scale=0.5))
    assert r.passed is False
    assert r.value > qa.CENTRE_OFFSET_MAX
    assert r.details["dx"] < 0 and r.details["dy"] < 0  # up-left of centre


def test_grey_background_fails_whiteness() -> None:
    r = qa.white_background(shoe(bg=(150, 150, 150)))
    assert r.passed is False and r.value == 0.0
    assert r.details["border_median_rgb"] == [150, 150, 150]


def test_off_white_but_near_white_background_passes() -> None:
    assert qa.white_background(shoe(bg=(245, 244, 246))).passed


def test_blank_image_fails_centring_with_a_reason() -> None:
    r = qa.centring(Image.new("RGB", (128, 128), WHITE))
    assert r.passed is False and r.value is None
    assert "no foreground" in r.details["reason"]
    assert qa.single_object(Image.new("RGB", (64, 64), WHITE)).passed is False


def test_colour_adherence_red_shoe() -> None:
    img = shoe(RED)
    blue = qa.colour_adherence(img, "A professional product photo of blue casual shoes on white background")
    red = qa.colour_adherence(img, "A professional product photo of red casual sneakers on white background")
    assert blue.passed is False and blue.value > qa.COLOUR_DELTA_E_MAX
    assert red.passed is True and red.details["measured"] == "red"


def test_prompt_colour_parsing_ignores_the_white_background_phrase() -> None:
    assert qa.prompt_colours("A photo of red casual sneakers on white background, side view") == ["red"]
    assert qa.prompt_colours("white casual sneakers on a pure white background") == ["white"]
    assert qa.prompt_colours("navy blue loafers on white backdrop") == ["navy"]
    assert qa.prompt_colours("gray shoes") == ["grey"]
    assert qa.prompt_colours("off-white sneakers") == ["off-white"]
    assert qa.prompt_colours("a shoe on white background") == []


def test_prompt_without_colour_is_not_scored() -> None:
    r = qa.colour_adherence(shoe(RED), "a professional product photo of casual shoes on white background")
    assert r.passed is None and r.value is None
    assert "no colour" in r.details["reason"]


def test_colour_alias_without_palette_entry() -> None:
    # "maroon" has no palette prototype; it may be measured as red.
    assert qa.colour_adherence(shoe((150, 25, 30)), "maroon loafers").passed is True


def test_two_separate_blobs_fail_single_object_touching_pair_passes() -> None:
    img = Image.new("RGB", (160, 128), WHITE)
    d = ImageDraw.Draw(img)
    draw_shoe(d, BLACK, (40, 64), 0.6)
    draw_shoe(d, BLACK, (120, 64), 0.6)
    r = qa.single_object(img)
    assert r.passed is False and r.value == 2

    pair = Image.new("RGB", (160, 128), WHITE)
    d = ImageDraw.Draw(pair)
    draw_shoe(d, BLACK, (60, 60), 0.7)
    draw_shoe(d, BLACK, (95, 70), 0.7)  # overlaps the first: one product
    assert qa.single_object(pair).passed is True


def test_specks_are_ignored() -> None:
    img = shoe()
    ImageDraw.Draw(img).rectangle([110, 5, 111, 6], fill=BLACK)  # 4-pixel speck in a corner
    assert qa.single_object(img).passed is True
    assert qa.centring(img).passed is True


def test_blur_lowers_sharpness() -> None:
    sharp = qa.sharpness(shoe())
    blurred = qa.sharpness(shoe().filter(ImageFilter.GaussianBlur(4)))
    assert sharp.value > 5 * blurred.value
    assert sharp.passed and not blurred.passed


def test_identical_images_are_mode_collapse_varied_are_not() -> None:
    same = [phash(shoe()) for _ in range(4)]
    d_same = qa.diversity(same, 6.0)
    assert d_same.value == 0.0 and d_same.passed is False
    d_varied = qa.diversity([phash(i) for i in varied_shoes()], 6.0)
    assert d_varied.value > 6.0 and d_varied.passed is True
    assert qa.diversity(same[:1], 6.0).passed is None  # one image: not assessable


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_memorisation_finds_the_planted_copy(tmp_path: Path) -> None:
    train = tmp_path / "train" / "images"
    for i, img in enumerate(varied_shoes()):
        _save(img, train / f"train{i}.png")
    generated = shoe(RED, (50, 70), 0.6)  # same as train1
    # The planted copy is a re-encoded, slightly shifted version: a near duplicate, not a byte copy.
    _save(generated.resize((120, 120)).resize((128, 128)), train / "planted.png")
    hashes = qa.hash_folder(train)
    name, dist = qa.nearest_training_image(phash(generated), hashes)
    assert name in {"planted.png", "train1.png"} and dist <= qa.MEMORISATION_MAX_DISTANCE
    fresh = shoe((40, 130, 60), (70, 60), 1.2).rotate(-20, fillcolor=WHITE)
    _, fresh_dist = qa.nearest_training_image(phash(fresh), hashes)
    assert fresh_dist > qa.MEMORISATION_MAX_DISTANCE


def test_run_qa_summary_shares_and_flags(tmp_path: Path) -> None:
    prompts = ["black casual shoes on white background", "blue casual shoes on white background"]
    imgs = {
        (0, 0): shoe(BLACK),
        (0, 1): shoe(BLACK),  # identical to (0, 0): prompt 0 collapses
        (1, 0): shoe(RED, (30, 30), 0.5),  # wrong colour, off-centre
        # grey background (flipped: pHash is colour-blind, so the same silhouette would match copy.png)
        (1, 1): shoe((40, 80, 180), bg=(120, 120, 120)).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }
    gens = [
        GeneratedImage(p, i, prompts[p], _save(img, tmp_path / f"prompt{p}_img{i}.png"), 1000 * p + i)
        for (p, i), img in imgs.items()
    ]
    train = tmp_path / "train"
    _save(shoe(BLACK), train / "copy.png")
    summary = qa.run_qa(gens, prompts, 6.0, qa.hash_folder(train))
    assert summary.n_images == 4
    assert summary.white_background_share == 0.75
    assert summary.centred_share == 0.75
    # black, black pass; red-vs-blue fails; the blue shoe on a grey backdrop is measured against that
    # backdrop (not against white), so its colour passes although its background fails.
    assert summary.colour_respected_share == 0.75
    assert summary.n_colour_scored == 4
    assert summary.mode_collapse_prompts == [0]
    assert summary.min_diversity == 0.0
    assert {Path(m["image"]).name for m in summary.memorised} == {"prompt0_img0.png", "prompt0_img1.png"}
    # The check names the near-copies and, for context, how many the base model made on the same seeds.
    checks = {c.name: c for c in checklist({}, summary, None, EvaluationThresholds(), qa_base=summary)}
    mem = checks["no_memorisation"]
    assert mem.passed is False and mem.value == 2 and mem.severity == "WARN"
    assert "prompt0_img0.png≈copy.png" in mem.reason and mem.reason.endswith("on the same seeds: 2")
    pp = summary.per_prompt[1]
    assert pp["prompt_colours"] == ["blue"] and pp["colour_respected_share"] == 0.5
    d = summary.to_dict()
    assert d["images"][0]["white_background"]["passed"] is True


@pytest.mark.parametrize("side", [64, 512])
def test_results_do_not_depend_on_resolution(side: int) -> None:
    img = shoe().resize((side, side), Image.Resampling.LANCZOS)
    assert qa.centring(img).passed and qa.white_background(img).passed and qa.single_object(img).passed
