"""Does a published file meet its marketplace profile? Read back from the file itself, not from what the
writer meant to write: size, aspect, border pixels, product fill, ICC profile, format, byte size, XMP
DigitalSourceType, A1111 parameters, provenance and (when signing is on) the C2PA manifest's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shoe_lora_pipeline.core.finishing import measure
from shoe_lora_pipeline.core.marketplace import MarketplaceProfile
from shoe_lora_pipeline.core.marking import TRAINED_ALGORITHMIC_MEDIA, read_marking

C2PA_GOOD_STATES = ("Valid", "Trusted")


def check_file(path: Path, profile: MarketplaceProfile, *, c2pa_on: bool) -> list[str]:
    """Every way ``path`` fails ``profile`` (empty: it passes)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    problems: list[str] = []
    try:
        size = path.stat().st_size
        with Image.open(path) as im:
            im.load()
            fmt, (w, h) = im.format, im.size
            rgb = im.convert("RGB")
        marking: dict[str, Any] = read_marking(path)
    except (OSError, UnidentifiedImageError) as exc:
        return [f"unreadable: {exc}"]
    want_fmt = "JPEG" if profile.format == "jpeg" else "PNG"
    if fmt != want_fmt:
        problems.append(f"format {fmt}, profile wants {want_fmt}")
    long_side = max(w, h)
    if not profile.min_side <= long_side <= profile.max_side:
        problems.append(f"longest side {long_side} px outside {profile.min_side}–{profile.max_side}")
    aw, ah = profile.aspect_ratio
    if abs(w * ah - h * aw) > max(aw, ah):
        problems.append(f"size {w}×{h} is not aspect {profile.aspect}")
    if size > profile.max_bytes:
        problems.append(f"{size} bytes > max {profile.max_bytes}")
    a = np.asarray(rgb)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    off = int(np.any(border != np.asarray(profile.background_rgb, dtype=np.uint8), axis=1).sum())
    if off:
        problems.append(f"{off} border pixels are not exactly {profile.background}")
    fill, _ = measure(rgb)
    if fill is None:
        problems.append("no product found")
    elif not profile.fill_min - 0.01 <= fill <= profile.fill_max + 0.01:  # ± one resampling pixel ring
        problems.append(
            f"product fills {fill:.2f} of the frame, outside {profile.fill_min:g}–{profile.fill_max:g}"
        )
    icc = marking["icc"]
    if not icc or profile.colour_space.lower() not in icc.lower():
        problems.append(f"ICC profile {icc or 'missing'}, profile wants {profile.colour_space}")
    required = set(profile.required_metadata) | ({"c2pa"} if c2pa_on else set())
    if "digital_source_type" in required and marking["digital_source_type"] != TRAINED_ALGORITHMIC_MEDIA:
        problems.append(f"XMP DigitalSourceType is {marking['digital_source_type'] or 'missing'}")
    if "a1111_parameters" in required and not marking["parameters"]:
        problems.append("no A1111 parameters")
    if "provenance" in required and not marking["render"]:
        problems.append("no shoe_lora_render provenance")
    if "c2pa" in required:
        c2pa = marking["c2pa"]
        created = [
            x
            for x in c2pa.get("actions") or []
            if x["action"] == "c2pa.created" and x["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        ]
        if not c2pa["present"]:
            problems.append(f"no C2PA manifest{': ' + c2pa['error'] if c2pa.get('error') else ''}")
        elif c2pa["validation_state"] not in C2PA_GOOD_STATES:
            problems.append(
                f"C2PA manifest {c2pa['validation_state']}: {', '.join(c2pa.get('status') or [])}"
            )
        elif not created:
            problems.append("C2PA manifest has no c2pa.created action with trainedAlgorithmicMedia")
    return problems
