"""Checklist, report files and metrics.json schema; one small end-to-end evaluate() on the tiny model."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from shoe_lora_pipeline.core.config import EvaluationConfig, EvaluationThresholds
from shoe_lora_pipeline.core.evaluation import qa
from shoe_lora_pipeline.core.evaluation.checks import CheckOutcome, check_descriptions
from shoe_lora_pipeline.core.evaluation.generate import GeneratedImage, image_seed
from shoe_lora_pipeline.core.evaluation.metrics import MetricResult
from shoe_lora_pipeline.core.evaluation.report import checklist, load_schema, write_report
from shoe_lora_pipeline.core.markdown import md_cell
from shoe_lora_pipeline_tests.support.evaluation import RED, random_cnn, shoe, varied_shoes
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

T = EvaluationThresholds()


# ----------------------------------------------------------------------------------------------
# A minimal JSON Schema validator (the subset metrics.schema.json uses), so the schema is enforced even
# where the `jsonschema` package is not installed; where it is, the test validates with both.
# ----------------------------------------------------------------------------------------------

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(instance: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (keywords: $ref type enum const required properties
    additionalProperties items anyOf minimum maximum)."""
    errors: list[str] = []
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        errors += validate(instance, node, root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            return errors + [f"{path}: {instance!r} is not of type {types}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: {instance!r} != {schema['const']!r}")
    if _is_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > {schema['maximum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(value, schema["additionalProperties"], root, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            errors += validate(value, schema["items"], root, f"{path}[{i}]")
    if "anyOf" in schema and not any(not validate(instance, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    return errors


def assert_valid(doc: dict[str, Any]) -> None:
    schema = load_schema()
    assert validate(doc, schema, schema) == []
    try:
        import jsonschema
    except ImportError:  # not a dependency (yet): the minimal validator above still ran
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


def test_minimal_validator_rejects_bad_documents() -> None:
    schema = load_schema()
    good_metric = {
        "name": "fid",
        "value": None,
        "status": "unavailable",
        "reason": "no weights",
        "n_generated": 4,
        "n_reference": 2,
        "compared": "x",
        "weights": None,
        "extras": {},
    }
    metric_schema = {"$ref": "#/$defs/metric"}
    assert validate(good_metric, metric_schema, schema) == []
    assert validate(dict(good_metric, status="ok"), metric_schema, schema)  # ok needs a number
    assert validate(dict(good_metric, status="maybe"), metric_schema, schema)
    assert validate({k: v for k, v in good_metric.items() if k != "reason"}, metric_schema, schema)
    check = {
        "name": "fid",
        "passed": True,
        "severity": "WARN",
        "value": None,
        "threshold": 30.0,
        "reason": "unavailable",
        "status": "unavailable",
        "comparator": "<",
    }
    assert validate(check, {"$ref": "#/$defs/check"}, schema)  # unavailable must not pass


# ----------------------------------------------------------------------------------------------
# Checklist
# ----------------------------------------------------------------------------------------------


def ok(name: str, value: float) -> MetricResult:
    return MetricResult(name, value, "ok", n_generated=8, n_reference=4, compared="LoRA vs test", weights="w")


def summary_of(
    images: list[Image.Image], prompts: list[str], tmp_path: Path, tag: str
) -> tuple[qa.QASummary, list[GeneratedImage]]:
    gens = []
    for k, img in enumerate(images):
        p, i = divmod(k, 2)
        path = tmp_path / tag / f"prompt{p}_img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        gens.append(GeneratedImage(p, i, prompts[p], path, image_seed(7, p, i)))
    return qa.run_qa(gens, prompts, T.diversity_min_hamming), gens


def test_checklist_outcomes_and_severities(tmp_path: Path) -> None:
    prompts = ["black shoes on white background", "red sneakers on white background"]
    good, _ = summary_of(
        [shoe(), shoe(centre=(60, 66), scale=0.8), shoe(RED), shoe(RED, (70, 60), 1.2)],
        prompts,
        tmp_path,
        "g",
    )
    metrics = {
        "fid": ok("fid", 12.0),
        "clip_score": ok("clip_score", 31.0),
        "inception_score": ok("inception_score", 7.0),
    }
    checks = {c.name: c for c in checklist(metrics, good, {"final_loss": 0.05, "smoothed_loss": 0.01}, T)}
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    assert checks["final_loss"].value == 0.01  # the smoothed loss is the one checked
    assert checks["white_background"].severity == "ERROR" and checks["fid"].severity == "WARN"

    bad_metrics = {"fid": ok("fid", 80.0), "clip_score": MetricResult("clip_score", None, "error", "boom")}
    grey = [shoe(bg=(150, 150, 150))] * 4  # grey background, and all four identical: mode collapse
    bad, _ = summary_of(grey, prompts, tmp_path, "b")
    checks = {c.name: c for c in checklist(bad_metrics, bad, {"final_loss": 0.5}, T)}
    assert checks["white_background"].passed is False and checks["white_background"].severity == "ERROR"
    assert checks["no_mode_collapse"].passed is False and checks["no_mode_collapse"].severity == "ERROR"
    assert "mode collapse" in checks["no_mode_collapse"].reason
    assert (
        checks["fid"].passed is False and checks["fid"].severity == "WARN" and checks["fid"].status == "fail"
    )
    assert checks["final_loss"].passed is False and checks["final_loss"].severity == "WARN"
    for name in ("clip_score", "inception_score"):  # error / missing -> unavailable, never passes
        assert checks[name].passed is False and checks[name].status == "unavailable"
        assert checks[name].severity == "WARN" and checks[name].value is None

    none = {c.name: c for c in checklist({}, None, None, T)}
    assert not any(c.passed for c in none.values())
    assert all(c.status == "unavailable" and c.severity == "WARN" for c in none.values())


def test_final_loss_of_a_v_prediction_base_is_judged_against_the_runs_own_start() -> None:
    """final_loss_max (0.02) is an epsilon-prediction number; a v-prediction run's loss has another scale,
    so the check compares its validation loss with the run's first one instead."""
    summary = {"final_loss": 0.25, "smoothed_loss": 0.251}  # v-prediction scale: far above 0.02
    fell = [
        {"step": 0, "val_loss": 0.1496},
        {"step": 75, "val_loss": 0.146},
        {"step": 150, "val_loss": 0.1441},
    ]
    rose = [{"step": 0, "val_loss": 0.1441}, {"step": 150, "val_loss": 0.1496}]

    def final(**kw: object) -> CheckOutcome:
        return {c.name: c for c in checklist({}, None, summary, T, **kw)}["final_loss"]

    eps = final(validation_losses=fell)  # an epsilon base: the absolute threshold, as before
    assert eps.passed is False and eps.value == 0.251 and eps.threshold == T.final_loss_max
    good = final(prediction_type="v_prediction", validation_losses=fell)
    assert good.passed is True and good.status == "pass" and good.severity == "WARN"
    assert good.value == pytest.approx(0.1441 / 0.1496) and good.threshold == T.final_val_loss_ratio_max
    assert "v_prediction objective" in good.reason and "0.1496 at step 0" in good.reason
    bad = final(prediction_type="v_prediction", validation_losses=rose)
    assert bad.passed is False and bad.status == "fail" and bad.value == pytest.approx(0.1496 / 0.1441)
    none = final(prediction_type="v_prediction", validation_losses=fell[:1])
    assert none.passed is False and none.status == "unavailable" and "epsilon-prediction" in none.reason
    assert "v-prediction base model" in check_descriptions(T)["final_loss"]


# ----------------------------------------------------------------------------------------------
# Report files
# ----------------------------------------------------------------------------------------------


def write_training_outputs(folder: Path, steps: int = 20) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    losses = folder / "losses.csv"
    with losses.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr", "grad_norm", "seconds"])
        for s in range(1, steps + 1):
            w.writerow([s, 0, 0.2 / s, 1e-4, 1.0, 0.1 * s])
    (folder / "training_summary.json").write_text(json.dumps({"final_loss": 0.01, "smoothed_loss": 0.015}))
    grids = []
    for step in (10, 2):  # written out of order: the report sorts by step
        g = folder / "validation" / f"grid_step{step:05d}.png"
        g.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (300, 150), (step * 20, 100, 100)).save(g)
        grids.append(g)
    return losses, grids


def test_write_report_files_and_schema(tmp_path: Path) -> None:
    prompts = ["black shoes on white background", "red sneakers on white background"]
    qa_lora, lora = summary_of(
        [shoe(), shoe(centre=(60, 66)), shoe(RED), shoe(RED, (70, 60), 1.2)], prompts, tmp_path, "lora"
    )
    qa_base, base = summary_of(varied_shoes(), prompts, tmp_path, "base")
    losses, grids = write_training_outputs(tmp_path / "train_out")
    # the held-out validation loss the trainer writes beside losses.csv
    (losses.parent / "validation_loss.csv").write_text("step,val_loss,t125\n2,0.5,0.4\n10,0.25,0.2\n")
    metrics_lora = {
        "fid": ok("fid", 25.5),
        "kid": MetricResult("kid", 0.01, "ok", extras={"kid_std": 0.002}),
        "inception_score": MetricResult(
            "inception_score",
            None,
            "unavailable",
            "Inception weights not found: looked for /x/y.pth",
            weights="/x/y.pth",
        ),
        "clip_score": MetricResult(
            "clip_score", None, "unavailable", "no CLIP model: evaluation.clip_model_dir is not set"
        ),
    }
    metrics_base = dict(metrics_lora, fid=ok("fid", 40.0))
    out = tmp_path / "evaluation"
    paths = write_report(
        out,
        metrics_lora=metrics_lora,
        metrics_base=metrics_base,
        qa_lora=qa_lora,
        qa_base=qa_base,
        thresholds=T,
        losses_csv=losses,
        validation_grids=grids,
        base_vs_lora_pairs=list(zip(base, lora, strict=True)),
        provenance={"git_commit": "abc123", "base_model": "tiny-sd"},
        training_summary=json.loads((tmp_path / "train_out" / "training_summary.json").read_text()),
    )
    for p in (
        paths.metrics_json,
        paths.report_md,
        paths.report_html,
        paths.loss_curve_png,
        *paths.comparison_grids,
    ):
        assert p is not None and p.is_file() and p.stat().st_size > 0
    assert len(paths.comparison_grids) == 2

    doc = json.loads(paths.metrics_json.read_text())
    assert_valid(doc)
    assert doc["metrics"]["lora"]["inception_score"]["status"] == "unavailable"
    assert doc["metrics"]["lora"]["inception_score"]["value"] is None
    assert doc["metrics"]["base"]["fid"]["value"] == 40.0
    checks = {c["name"]: c for c in doc["checks"]}
    assert (
        checks["inception_score"]["passed"] is False and checks["inception_score"]["status"] == "unavailable"
    )
    assert checks["fid"]["passed"] is True
    assert doc["artefacts"]["validation_grids"] == [str(grids[1]), str(grids[0])]  # step order

    html_text = paths.report_html.read_text()
    assert "<script" not in html_text and "<link" not in html_text
    assert not re.search(r"""(src|href)=['"]?(https?:|//|file:)""", html_text)
    srcs = re.findall(r"""src='([^']*)'""", html_text)
    # loss curve + 2 validation grids + 2 comparison grids, all inlined
    assert len(srcs) == 1 + 2 + 2 and all(s.startswith("data:image/") for s in srcs)
    assert html_text.index("step 2<") < html_text.index("step 10<")
    assert "How to get FID / IS / CLIP numbers" in html_text and "/x/y.pth" in html_text
    # The how-to box renders markdown code spans as <code>, not literal backticks.
    note_box = html_text[html_text.index("<div class='note'>") :]
    note_box = note_box[: note_box.index("</div>")]
    assert "`" not in note_box
    assert (
        "<code>pt_inception-2015-12-05-6726825d.pth</code>" in note_box
        and "<code>/x/y.pth</code>" in note_box
    )

    md = paths.report_md.read_text()
    assert (
        "lowest 0.25000 at step 10; last 0.25000 at step 10" in md
        and "lowest 0.25000 at step 10" in html_text
    )
    assert "| FID ↓ | 40.00 | 25.50 | < 30 | pass |" in md
    assert "unavailable (WARN)" in md and "![loss curve](loss_curve.png)" in md
    assert "`pt_inception-2015-12-05-6726825d.pth`" in md  # markdown keeps its code spans


# ----------------------------------------------------------------------------------------------
# End to end on the tiny model
# ----------------------------------------------------------------------------------------------


def make_lora_dir(base_folder: Path, out: Path) -> Path:
    """A real diffusers LoRA folder for the tiny model (peft adapter with random, non-zero B)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out


@pytest.mark.slow
def test_evaluate_end_to_end_on_tiny_model(tiny_sd_cache: Path, tmp_path: Path) -> None:
    import numpy as np

    from shoe_lora_pipeline.core.evaluation import evaluate
    from shoe_lora_pipeline.core.models import tiny_sd_path

    base_folder = tiny_sd_path(tiny_sd_cache)
    lora_dir = make_lora_dir(base_folder, tmp_path / "lora_weights")
    data = tmp_path / "dataset"
    for i, img in enumerate(varied_shoes()):
        (data / "test" / "images").mkdir(parents=True, exist_ok=True)
        (data / "train" / "images").mkdir(parents=True, exist_ok=True)
        img.save(data / "test" / "images" / f"t{i}.png")
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "train" / "images" / f"tr{i}.png")
    train_out = tmp_path / "run"
    write_training_outputs(train_out)
    cfg = EvaluationConfig(
        prompts=["A photo of red sneakers on white background", "A photo of navy shoes on white background"],
        num_inference_steps=2,
        images_per_prompt=2,
        resolution=64,
    )
    extractor = random_cnn()
    torch.manual_seed(123)
    global_rng = torch.get_rng_state()
    result = evaluate(
        lora=lora_dir,
        base=base_folder,
        config=cfg,
        test_dir=data / "test",
        train_dir=data / "train",
        training_output_dir=train_out,
        device="cpu",
        provenance={"base_model": "tiny-sd"},
        feature_extractor=extractor,
    )
    # CPU generators + fork_rng: the caller's RNG is untouched.
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert result.out_dir == train_out / "evaluation"
    assert len(result.generated_base) == len(result.generated_lora) == 4
    for b, lo in zip(result.generated_base, result.generated_lora, strict=True):
        assert (b.prompt_index, b.image_index, b.seed) == (lo.prompt_index, lo.image_index, lo.seed)
        expected = f"evaluation/images/lora/prompt{lo.prompt_index}_img{lo.image_index}.png"
        assert lo.path == train_out / expected
        with Image.open(b.path) as ib, Image.open(lo.path) as il:
            assert ib.size == il.size == (64, 64)
            # Same seed, different weights: the LoRA changes the picture.
            assert np.abs(np.asarray(ib, float) - np.asarray(il, float)).mean() > 0.5
    assert result.metrics_lora["fid"].status == "ok" and result.metrics_lora["kid"].status == "ok"
    assert result.metrics_lora["inception_score"].status == "unavailable"  # CNN gives no logits
    assert result.metrics_lora["clip_score"].status == "unavailable"
    assert "| FID ↓ |" in result.metric_table_markdown
    names = [c.name for c in result.checks]
    assert names[:8] == [
        "final_loss",
        "white_background",
        "centred",
        "colour_adherence",
        "no_mode_collapse",
        "fid",
        "clip_score",
        "inception_score",
    ]
    assert result.passed == (result.n_errors == 0)
    doc = json.loads(result.paths.metrics_json.read_text())
    assert_valid(doc)
    assert doc["settings"]["resolution"] == 64 and doc["settings"]["n_reference"] == 4
    assert result.paths.report_html.is_file() and len(result.paths.comparison_grids) == 2
    assert result.summary()["metrics_lora"]["clip_score"] == "unavailable"


# ----------------------------------------------------------------------------------------------
# One checklist table; reports from one context; readable grids
# ----------------------------------------------------------------------------------------------

CUSTOM = EvaluationThresholds(
    final_loss_max=0.5,
    white_background_min=0.8,
    centred_min=0.7,
    colour_adherence_min=0.6,
    diversity_min_hamming=3,
    fid_max=12.5,
    clip_score_min=21,
    inception_score_min=4,
)


def test_check_table_drives_checklist_descriptions_and_asset_checks() -> None:
    from shoe_lora_pipeline.assets.evaluation_report import CHECKLIST
    from shoe_lora_pipeline.core.evaluation.checks import CHECKS, check_descriptions

    names = [spec.name for spec in CHECKS]
    assert [c.name for c in checklist({}, None, None, T)] == names
    assert check_descriptions(T) == CHECKLIST and list(CHECKLIST) == names
    # Every configurable threshold is held by exactly one check of the table.
    fields = [f for spec in CHECKS for f in (spec.threshold_field, spec.alt_threshold_field) if f]
    assert sorted(fields) == sorted(EvaluationThresholds.model_fields)

    custom, default = check_descriptions(CUSTOM), check_descriptions(T)
    assert "< 12.5 (evaluation.thresholds.fid_max)" in custom["fid"]
    assert ">= 80% (evaluation.thresholds.white_background_min)" in custom["white_background"]
    assert ">= 95% (evaluation.thresholds.white_background_min)" in default["white_background"]
    assert "> 21 (evaluation.thresholds.clip_score_min)" in custom["clip_score"]
    assert "< 0.5 (evaluation.thresholds.final_loss_max)" in custom["final_loss"]
    for spec in CHECKS:  # the numbers come from the thresholds, not from the wording
        assert (custom[spec.name] != default[spec.name]) == bool(spec.threshold_field), spec.name
        assert spec.severity in custom[spec.name]

    fid = {"fid": ok("fid", 20.0)}
    assert {c.name: c for c in checklist(fid, None, None, T)}["fid"].passed
    strict = {c.name: c for c in checklist(fid, None, None, CUSTOM)}["fid"]
    assert not strict.passed and strict.threshold == 12.5 and strict.reason.startswith("20 is not < 12.5")


def test_reports_share_one_context_and_escape_hostile_text(tmp_path: Path) -> None:
    from markupsafe import escape

    from shoe_lora_pipeline.core.evaluation.report import Findings, render_report, report_context

    prompts = [
        "black shoes <script>alert(1)</script> on white background",
        "red | sneakers on white background",
    ]
    qa_lora, _ = summary_of(
        [shoe(), shoe(centre=(60, 66)), shoe(RED), shoe(RED, (70, 60), 1.2)], prompts, tmp_path, "l"
    )
    metrics = {"fid": ok("fid", 25.5)}
    checks = checklist(metrics, qa_lora, None, T)
    findings = Findings(
        metrics, {}, qa_lora, None, T, checks, provenance={"file": "x|y\nz <b>", "n": {"k": 1}}
    )
    context = report_context(tmp_path, findings, loss_png=None, validation_grids=[], comparisons=[])
    md, page = render_report("report.md.j2", context), render_report("report.html.j2", context)
    for table in ("checks", "metrics", "qa", "provenance"):
        for row in context[table]["rows"]:
            assert "| " + " | ".join(md_cell(c) for c in row) + " |" in md.splitlines()
            for c in row:
                assert f">{escape(c)}</td>" in page, c
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    verdict = "PASSED" if all(c.passed or c.severity == "WARN" for c in checks) else "FAILED"
    assert f"**{verdict} — " in md and f"class='verdict {verdict[:4].lower()}'" in page
    assert "_No losses.csv found._" in md and "<p>No generations.</p>" in page


def test_templates_are_package_data() -> None:
    import fnmatch

    from shoe_lora_pipeline.core.evaluation.report import TEMPLATES_DIR

    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["shoe_lora_pipeline.core.evaluation"]
    templates = sorted(TEMPLATES_DIR.glob("*"))
    assert {p.name for p in templates} == {"report.md.j2", "report.html.j2"}
    for p in templates:
        rel = p.relative_to(TEMPLATES_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
    assert "jinja2" in " ".join(pyproject["project"]["dependencies"])


def test_comparison_grid_tiles_have_gaps_and_labels_on_a_plain_band(tmp_path: Path) -> None:
    """Noisy tiles (what an undertrained model makes) come out intact — no label drawn over them — apart
    from each other, and every label sits on the plain background."""
    import numpy as np

    from shoe_lora_pipeline.core.evaluation.report import COMPARISON_BACKGROUND, comparison_grid

    rng = np.random.default_rng(0)
    tiles: dict[tuple[int, int], np.ndarray] = {}
    pairs = []
    for i in range(3):
        pair = []
        for row, tag in enumerate(("base", "lora")):
            tiles[row, i] = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            path = tmp_path / f"{tag}{i}.png"
            Image.fromarray(tiles[row, i]).save(path)
            pair.append(GeneratedImage(0, i, "noisy", path, 100 + i))
        pairs.append(tuple(pair))
    grid = np.asarray(comparison_grid(pairs, "prompt 0: noisy"))

    def find(tile: np.ndarray) -> tuple[int, int]:
        ys, xs = np.nonzero(np.all(grid == tile[0, 0], axis=-1))
        hits = [
            (y, x) for y, x in zip(ys, xs, strict=True) if np.array_equal(grid[y : y + 48, x : x + 48], tile)
        ]
        assert len(hits) == 1, "tile not found intact (a label drawn over it?)"
        return hits[0]

    pos = {key: find(tile) for key, tile in tiles.items()}
    background = np.all(grid == COMPARISON_BACKGROUND, axis=-1)
    for row in (0, 1):
        for i in (0, 1):  # a gap of plain background between neighbouring tiles
            (y, x0), (_, x1) = pos[row, i], pos[row, i + 1]
            assert x1 - (x0 + 48) >= 4 and background[y : y + 48, x0 + 48 : x1].all()
    for i in range(3):
        (y0, x), (y1, _) = pos[0, i], pos[1, i]
        assert y1 - (y0 + 48) >= 4 and background[y0 + 48 : y1, x : x + 48].all()
        band = grid[y0 - 20 : y0, x : x + 48]  # the seed label above the column
        plain = np.all(band == COMPARISON_BACKGROUND, axis=-1)
        assert 0.5 < plain.mean() < 1.0  # text, on the plain background
        # Label pixels are greys between the text and background colours, never tile colours.
        text = band[~plain].astype(int)
        assert (np.ptp(text, axis=-1) <= 12).all()
