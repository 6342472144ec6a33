"""Reading CSV files that people edit by hand (styles.csv, the renders specs sheet): every record with its
line numbers, an unparseable line reported as such, never the whole file lost to one bad line."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class CsvRecord:
    line: int  # the record's first line (1-based)
    end_line: int  # the reader's line count after it: a quoted field may span lines
    fields: list[str]
    error: csv.Error | None = None  # an unparseable line: no fields

    @property
    def blank(self) -> bool:
        return not self.fields or all(not f.strip() for f in self.fields)


def csv_records(lines: Iterable[str]) -> Iterator[CsvRecord]:
    """Every record of a CSV text, blank ones included (``strict=False``: a stray quote is text, not an
    error). An unparseable line (e.g. a field over ``csv.field_size_limit()``) comes as a record with
    ``error`` set; reading resumes on the next line, and stops where the reader cannot move on."""
    reader = csv.reader(lines, strict=False)
    prev_line = 0
    while True:
        start = prev_line + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield CsvRecord(start, reader.line_num, [], exc)
            if reader.line_num == prev_line:  # no progress: give up rather than spin
                return
            prev_line = reader.line_num
            continue
        prev_line = reader.line_num
        yield CsvRecord(start, prev_line, fields)
