"""``shoe-lora lineage``: the materialisations that fed a LoRA, read from a throwaway Dagster instance.

Stand-in assets with the real graph's keys (``<category>/<stage>``) and edges but trivial bodies keep this
fast; each materialisation's metadata and data version carry the run's ``batch`` tag, so a row's values
show which run it came from.
"""

# No `from __future__ import annotations`: Dagster inspects the asset bodies' real annotations.

import json
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline import cli, lineage
from shoe_lora_pipeline.assets import STAGE_NAMES

STAGES = STAGE_NAMES  # the real stage order; the stand-ins below only mimic the bodies
DATASET = STAGES[:4]
TRAINING = ["training_latents", "lora_training", "lora_weights"]
EXPORT = ["final_pipeline", "evaluation_report"]


def _key(category: str, stage: str) -> dg.AssetKey:
    return dg.AssetKey([category, stage])


def _stage_metadata(stage: str, category: str, batch: str) -> dict:
    meta = {
        "config_hash": f"cfg-{batch}",
        "config_file": dg.MetadataValue.path("/configs/demo.yaml"),
        "summary": dg.MetadataValue.md(f"# {stage} ({batch})"),  # not identifying: left out
    }
    out = f"/out/{category}/{batch}"
    meta.update(
        {
            "raw_images": {
                "manifest_hash": f"manifest-{batch}",
                "manifest": dg.MetadataValue.path(f"{out}/m.csv"),
            },
            "cleaned_images": {"valid_count": 40 + len(batch)},
            "captions": {"num_captions": 40},
            "dataset_splits": {"train_images": 32},
            "training_latents": {"items": 32},
            "lora_training": {"global_step": 100, "final_loss": 0.0125},
            "lora_weights": {
                "checkpoint": "checkpoint-100",
                "step": 100,
                "lora_weights_dir": dg.MetadataValue.path(f"{out}/lora_weights"),
            },
            "final_pipeline": {"final_pipeline_dir": dg.MetadataValue.path(f"{out}/final_pipeline")},
            "evaluation_report": {"report_html": dg.MetadataValue.path(f"{out}/report.html")},
        }[stage]
    )
    return meta


def stand_in(category: str, stage: str, with_deps: bool = True) -> dg.AssetsDefinition:
    """An asset keyed and wired like the real stage, returning metadata + data version only."""
    i = STAGES.index(stage)
    deps = [_key(category, STAGES[i - 1])] if i and with_deps else []

    @dg.asset(key=_key(category, stage), deps=deps, code_version=f"v{i}")
    def body(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        batch = context.run.tags["batch"]
        return dg.MaterializeResult(
            metadata=_stage_metadata(stage, category, batch), data_version=dg.DataVersion(f"{stage}-{batch}")
        )

    return body


CATEGORIES = ["casual_shoes", "formal_shoes", "boots"]
ALL_ASSETS = [stand_in(c, s) for c in CATEGORIES for s in STAGES]
FAKE_GRAPH = dg.Definitions(assets=ALL_ASSETS).resolve_asset_graph()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs, in order (batch tag = name):

    casual_shoes and formal_shoes:
      a    dataset stages of both categories
      a2   casual raw_images again (before training, but nothing downstream used it)
      b    training stages of both categories: the LoRAs under test
      c    casual raw_images + cleaned_images again, after the LoRA (must not be listed)
      d    casual final_pipeline + evaluation_report (built from LoRA b)
      e    casual lora_weights again (a newer LoRA from training b)
      f    casual final_pipeline + evaluation_report (built from LoRA e, not b)
    boots (a LoRA materialised without recorded input pointers):
      bt1  dataset + latents + training
      bt2  lora_weights defined without deps: no dagster/input_event_pointer tags
      bt3  lora_training again, after the LoRA
    """
    home = tmp_path_factory.mktemp("dagster_home")
    instance = dg.DagsterInstance.local_temp(str(home))
    by_key = {a.key: a for a in ALL_ASSETS}

    def run(batch: str, keys: list[dg.AssetKey], assets: list | None = None) -> str:
        result = dg.materialize(
            assets or ALL_ASSETS, instance=instance, selection=keys, tags={"batch": batch}
        )
        assert result.success
        return result.run_id

    casual_formal = ["casual_shoes", "formal_shoes"]
    runs = {
        "a": run("a", [_key(c, s) for c in casual_formal for s in DATASET]),
        "a2": run("a2", [_key("casual_shoes", "raw_images")]),
        "b": run("b", [_key(c, s) for c in casual_formal for s in TRAINING]),
        "c": run("c", [_key("casual_shoes", s) for s in ("raw_images", "cleaned_images")]),
        "d": run("d", [_key("casual_shoes", s) for s in EXPORT]),
        "e": run("e", [_key("casual_shoes", "lora_weights")]),
        "f": run("f", [_key("casual_shoes", s) for s in EXPORT]),
        "bt1": run("bt1", [_key("boots", s) for s in STAGES[:6]]),
    }
    loose_lora = stand_in("boots", "lora_weights", with_deps=False)
    runs["bt2"] = run("bt2", [loose_lora.key], [loose_lora])
    runs["bt3"] = run("bt3", [_key("boots", "lora_training")], [by_key[_key("boots", "lora_training")]])
    instance.dispose()
    return {"home": home, "runs": runs}


@pytest.fixture(autouse=True)
def fake_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI loads the project's definitions lazily; here it gets the stand-in graph instead."""
    monkeypatch.setattr(lineage, "load_definitions_graph", lambda: FAKE_GRAPH)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def run_json(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    assert cli.main(["lineage", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["lineages"]


def lineage_of(capsys: pytest.CaptureFixture, history: dict, batch: str, *extra: str) -> dict:
    found = run_json(capsys, "--run", history["runs"][batch], "--dagster-home", str(history["home"]), *extra)
    assert len(found) == 1
    return found[0]


def test_upstream_rows_are_what_fed_the_lora(history: dict, capsys: pytest.CaptureFixture) -> None:
    runs = history["runs"]
    got = lineage_of(capsys, history, "b", "--category", "casual_shoes")
    assert got["lora_asset"] == "casual_shoes/lora_weights" and got["run_id"] == runs["b"]
    assert got["asset_graph"] == "definitions" and got["asset_graph_note"] is None
    rows = got["rows"]
    assert [r["asset_key"] for r in rows] == [f"casual_shoes/{s}" for s in STAGES]
    assert [r["role"] for r in rows] == ["upstream"] * 6 + ["lora"] + ["downstream"] * 2
    # Dataset from run a (not a2's re-scan, nor run c after the LoRA), training from b, export from d.
    assert [r["run_id"] for r in rows] == [runs[b] for b in "aaaabbbdd"]
    assert [r["data_version"] for r in rows] == [f"{s}-{b}" for s, b in zip(STAGES, "aaaabbbdd", strict=True)]
    assert [r["code_version"] for r in rows] == [f"v{i}" for i in range(len(STAGES))]
    assert {r["link"] for r in rows if r["role"] != "lora"} == {lineage.LINK_POINTER}
    timestamps = [r["timestamp"] for r in rows]
    assert timestamps == sorted(timestamps) and all(t.endswith("+00:00") for t in timestamps)
    raw, cleaned, training, weights = rows[0], rows[1], rows[5], rows[6]
    assert raw["metadata"]["manifest_hash"] == "manifest-a"
    assert raw["metadata"]["manifest"] == "/out/casual_shoes/a/m.csv"
    assert "summary" not in raw["metadata"]  # markdown is descriptive, not identifying
    assert cleaned["metadata"]["valid_count"] == 41
    assert training["metadata"]["global_step"] == 100 and training["metadata"]["final_loss"] == 0.0125
    assert weights["metadata"]["checkpoint"] == "checkpoint-100"
    assert weights["inputs"]["casual_shoes/lora_training"]["storage_id"] == training["storage_id"]
    assert weights["inputs"]["casual_shoes/lora_training"]["data_version"] == "lora_training-b"
    # The raw manifest re-scanned before training (run a2) is reported, not listed as an input.
    assert any("casual_shoes/raw_images" in n and runs["a2"] in n for n in got["notes"])


def test_downstream_stops_at_the_next_lora(history: dict, capsys: pytest.CaptureFixture) -> None:
    runs = history["runs"]
    newer = lineage_of(capsys, history, "e")
    assert [r["run_id"] for r in newer["rows"]] == [runs[b] for b in "aaaabbeff"]
    # Run c re-made the dataset after LoRA b, before LoRA e; LoRA e was still trained on run a's.
    notes = sorted(newer["notes"])
    assert [n.split()[0] for n in notes] == ["casual_shoes/cleaned_images", "casual_shoes/raw_images"]
    assert all(f"again before this LoRA (run {runs['c']}," in n for n in notes)


def test_run_with_two_categories_lists_both(history: dict, capsys: pytest.CaptureFixture) -> None:
    runs = history["runs"]
    both = run_json(capsys, "--run", runs["b"], "--dagster-home", str(history["home"]))
    assert [x["lora_asset"] for x in both] == ["casual_shoes/lora_weights", "formal_shoes/lora_weights"]
    formal = both[1]
    assert [r["asset_key"] for r in formal["rows"]] == [f"formal_shoes/{s}" for s in STAGES[:7]]
    assert [r["run_id"] for r in formal["rows"]] == [runs[b] for b in "aaaabbb"]
    assert formal["notes"] == ["formal_shoes/final_pipeline: not materialised from this LoRA"]


def test_without_input_pointers_the_latest_earlier_materialisation_fed_it(
    history: dict, capsys: pytest.CaptureFixture
) -> None:
    runs = history["runs"]
    got = lineage_of(capsys, history, "bt2")
    rows = got["rows"]
    assert [r["asset_key"] for r in rows] == [f"boots/{s}" for s in STAGES[:7]]
    assert [r["run_id"] for r in rows] == [runs["bt1"]] * 6 + [runs["bt2"]]  # not bt3's retraining
    assert rows[5]["link"] == lineage.LINK_LATEST
    assert {r["link"] for r in rows[:5]} == {lineage.LINK_POINTER}


def test_graph_recorded_in_the_instance_gives_the_same_rows(
    history: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_defs = lineage_of(capsys, history, "b", "--category", "casual_shoes")
    from_instance = lineage_of(capsys, history, "b", "--category", "casual_shoes", "--graph", "instance")
    assert from_instance["asset_graph"] == "instance"
    assert from_instance["rows"] == from_defs["rows"]

    def broken() -> None:
        raise ModuleNotFoundError("No module named 'shoe_lora_pipeline.automation'")

    monkeypatch.setattr(lineage, "load_definitions_graph", broken)
    auto = lineage_of(capsys, history, "b", "--category", "casual_shoes")
    assert auto["asset_graph"] == "instance" and "ModuleNotFoundError" in auto["asset_graph_note"]
    assert auto["rows"] == from_defs["rows"]
    assert (
        cli.main(
            [
                "lineage",
                "--run",
                history["runs"]["b"],
                "--dagster-home",
                str(history["home"]),
                "--graph",
                "definitions",
            ]
        )
        == 2
    )
    assert "ModuleNotFoundError" in capsys.readouterr().err


def test_lineage_from_an_exported_file(
    history: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    exported = tmp_path / "provenance.json"
    provenance = {"dagster_run_id": history["runs"]["b"], "dataset_name": "formal_shoes"}
    exported.write_text(json.dumps({"provenance": provenance}))
    monkeypatch.setenv("DAGSTER_HOME", str(history["home"]))
    (got,) = run_json(capsys, str(exported))  # the run trained two categories; the file names its own
    assert got["lora_asset"] == "formal_shoes/lora_weights" and got["run_id"] == history["runs"]["b"]


def test_lineage_from_a_published_jpeg(
    history: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marketplace JPEG carries the render provenance in its XMP: lineage follows it like a PNG."""
    from PIL import Image

    from shoe_lora_pipeline.core.marketplace import BUILTIN_PROFILES
    from shoe_lora_pipeline.core.marking import encode_marked

    lora_provenance = {"dagster_run_id": history["runs"]["b"], "dataset_name": "formal_shoes"}
    jpg = tmp_path / "CS-1.jpg"
    jpg.write_bytes(
        encode_marked(
            Image.new("RGB", (64, 64), "white"),
            BUILTIN_PROFILES["amazon_main"],
            parameters="shoe\nNegative prompt: \nSteps: 2",
            render={"sku": "CS-1", "lora_provenance": lora_provenance},
            creator_tool="test",
        )
    )
    monkeypatch.setenv("DAGSTER_HOME", str(history["home"]))
    (got,) = run_json(capsys, str(jpg))
    assert got["lora_asset"] == "formal_shoes/lora_weights" and got["run_id"] == history["runs"]["b"]


def test_table(history: dict, capsys: pytest.CaptureFixture) -> None:
    runs = history["runs"]
    args = [
        "lineage",
        "--run",
        runs["b"],
        "--category",
        "casual_shoes",
        "--dagster-home",
        str(history["home"]),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    print(out)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert lines[header].split()[:4] == ["#", "role", "asset", "run"]
    assert lines[header].split()[-1] == "link"
    table = [line.split() for line in lines[header + 1 :] if line[:1].isdigit()]
    # Say what each row is to the LoRA: nothing after the LoRA is called an input.
    assert [r[1] for r in table] == ["upstream"] * 6 + ["LoRA"] + ["downstream"] * 2
    assert [r[2] for r in table] == [f"casual_shoes/{s}" for s in STAGES]
    assert [r[3] for r in table] == [runs[b] for b in "aaaabbbdd"]
    assert [r[-1] for r in table] == ["recorded"] * 6 + ["-"] + ["recorded"] * 2
    assert "input pointer" not in out
    assert "graph from    the project's Dagster definitions (shoe_lora_pipeline.definitions)" in lines
    assert "    manifest_hash: manifest-a" in out and "    final_loss: 0.0125" in out
    assert "notes" in lines and "config_file" not in out


def _error(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert cli.main(["lineage", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_errors_name_what_is_wrong(
    history: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, runs = str(history["home"]), history["runs"]
    err = _error(capsys, "--run", "no-such-run", "--dagster-home", home)
    assert f"run no-such-run not found in the Dagster instance at {home}" in err
    err = _error(capsys, "--run", runs["a"], "--dagster-home", home)
    assert runs["a"] in err and "lora_weights" in err and "casual_shoes/raw_images" in err
    err = _error(capsys, "--run", runs["b"], "--category", "boots", "--dagster-home", home)
    assert "boots/lora_weights" in err and "casual_shoes/lora_weights" in err
    assert "DAGSTER_HOME is not set" in _error(capsys, "--run", runs["b"])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "gone"))
    assert f"DAGSTER_HOME={tmp_path / 'gone'}: no such folder" in _error(capsys, "--run", runs["b"])
    monkeypatch.delenv("DAGSTER_HOME")
    assert "no such folder" in _error(capsys, "--run", runs["b"], "--dagster-home", str(tmp_path / "nope"))
    assert "not a Dagster instance" in _error(capsys, "--run", runs["b"], "--dagster-home", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing was created in a folder that is not an instance
    assert "either PATH" in _error(capsys)
    assert "either PATH" in _error(capsys, str(tmp_path), "--run", runs["b"])
    unrun = tmp_path / "provenance.json"
    unrun.write_text(json.dumps({"provenance": {"dagster_run_id": None}}))
    assert "no dagster_run_id" in _error(capsys, str(unrun), "--dagster-home", home)
    assert "no such file" in _error(capsys, str(tmp_path / "missing.safetensors"))
