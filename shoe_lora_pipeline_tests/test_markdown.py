"""One table-cell escaper (core.markdown) and every table that uses it: a hostile value cannot add a row
or a column to Dagster metadata, a model card, an evaluation report or the audit table."""

from __future__ import annotations

import re

import pytest

from shoe_lora_pipeline.core.markdown import md_cell, md_table, one_line

HOSTILE = "a|b\nc\r\nd\u2028e"


def cells(line: str) -> list[str]:
    """The cells of one markdown table row, split on unescaped pipes."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return re.split(r"(?<!\\)\|", line[1:-1])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("a|b", "a\\|b"),
        ("a\nb", "a b"),
        ("a\rb", "a b"),
        ("a\u2028b\x85c", "a b c"),
        (3.5, "3.5"),
        (None, "None"),
    ],
)
def test_md_cell(value: object, expected: str) -> None:
    assert md_cell(value) == expected


def test_one_line_keeps_pipes_and_removes_every_line_break() -> None:
    text = one_line(HOSTILE)
    assert text.splitlines() == [text] and "|" in text


def test_md_table_hostile_cells_keep_the_shape() -> None:
    table = md_table(["name", "value|x"], [[HOSTILE, 1], ["ok", HOSTILE]])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert lines[1] == "|---|---|"
    for line in (lines[0], lines[2], lines[3]):
        assert len(cells(line)) == 2


def test_metadata_md_table_uses_the_escaper() -> None:
    from shoe_lora_pipeline.assets._metadata import md_table as metadata_table

    assert metadata_table([], ["path"]) == "_none_"
    lines = metadata_table(
        [{"path": HOSTILE, "reason": "bad"}, {"path": "x"}], ["path", "reason"]
    ).splitlines()
    assert len(lines) == 4 and all(len(cells(line)) == 2 for line in lines[2:])
    assert cells(lines[2])[0].strip() == md_cell(HOSTILE)


def test_model_card_provenance_row_survives_a_hostile_value() -> None:
    from shoe_lora_pipeline.core.model_card import ModelCardInfo, render_model_card

    info = ModelCardInfo(
        dataset_name="shoes",
        base_model="tiny",
        base_model_revision=None,
        rank=4,
        alpha=4.0,
        target_modules=["to_q"],
        provenance={"source": HOSTILE, "nested": {"file": HOSTILE}},
        file_sha256={"we|ird.safetensors": "ab" * 32},
    )
    card = render_model_card(info)
    rows = [line for line in card.splitlines() if line.startswith("| source") or line.startswith("| nested")]
    assert len(rows) == 2 and all(len(cells(r)) == 2 for r in rows)
    sha_row = next(line for line in card.splitlines() if line.startswith("| sha256"))
    assert len(cells(sha_row)) == 2
    assert not any(line.startswith(("c ", "d", "e")) for line in card.splitlines())


def test_audit_table_keeps_a_hostile_value_on_one_line() -> None:
    from shoe_lora_pipeline.cli import format_audit_table

    record = {"path": "x", "format": "kohya", "provenance": {"file": HOSTILE, "tags": ["a\nb", "c"]}}
    lines = format_audit_table(record).splitlines()
    assert len(lines) == 2 + 1 + 1 + 2  # path, format, blank, section title, two rows
    assert [line.split()[0] for line in lines[4:]] == ["file", "tags"]
