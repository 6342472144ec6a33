"""How numbers, hashes and settings read on the pages people look at (Dagster metadata, the contact sheet).

Display only: JSON files and CSVs keep full precision and full hashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SIGNIFICANT_DIGITS = 4
SHORT_HASH = 12  # characters of a sha256 shown in a table; the full value is its own entry or file
UI_IMAGE_SIDE = 480  # px: the longer side of a plot or grid thumbnail in Dagster metadata


def round_for_display(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` to ``digits`` significant digits (19.47440835875556 → 19.47, 0.0016305 → 0.001631);
    non-finite values unchanged."""
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.{digits}g}")


def display_value(value: Any) -> Any:
    """A metadata value for people: floats rounded (bools and ints unchanged), anything else as is."""
    if isinstance(value, float):
        return round_for_display(value)
    return value


def short_hash(digest: str | None, n: int = SHORT_HASH) -> str:
    return (digest or "")[:n] or "-"


def render_settings_text(settings: Mapping[str, Any], sampler_names: Mapping[str, str] | None = None) -> str:
    """The render settings as a person reads them: ``25 steps · CFG 7.5 · DPM++ 2M · 512×512 px · seed 0
    · 4 candidates per image``; keys it does not know are appended as ``key value``."""
    s = dict(settings)
    parts: list[str] = []
    if "steps" in s:
        parts.append(f"{s.pop('steps')} steps")
    if "guidance_scale" in s:
        parts.append(f"CFG {s.pop('guidance_scale'):g}")
    if "sampler" in s:
        sampler = str(s.pop("sampler"))
        parts.append((sampler_names or {}).get(sampler, sampler))
    if "size" in s:
        size = s.pop("size")
        parts.append(f"{size}×{size} px")
    if "seed" in s:
        parts.append(f"seed {s.pop('seed')}")
    if "candidates_per_image" in s:
        n = s.pop("candidates_per_image")
        parts.append(f"{n} candidate{'' if n == 1 else 's'} per image")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in s.items()]
    return " · ".join(parts)
