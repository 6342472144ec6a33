"""The hand-edited CSV reader behind styles.csv and the renders specs sheet."""

from __future__ import annotations

import csv
import io

from shoe_lora_pipeline.core.csvutil import csv_records


def test_records_keep_their_lines_and_a_bad_line_costs_only_itself() -> None:
    text = 'id,name\n1,"two\nlines"\n\n2,' + "x" * 30 + "\n3,ok\n"
    limit = csv.field_size_limit(20)  # the 30-character field is over it
    try:
        records = list(csv_records(io.StringIO(text, newline="")))
    finally:
        csv.field_size_limit(limit)
    assert [(r.line, r.end_line, r.fields, r.blank) for r in records if r.error is None] == [
        (1, 1, ["id", "name"], False),
        (2, 3, ["1", "two\nlines"], False),
        (4, 4, [], True),
        (6, 6, ["3", "ok"], False),
    ]
    (bad,) = [r for r in records if r.error is not None]
    assert bad.line == 5 and bad.fields == [] and "field larger than field limit" in str(bad.error)
