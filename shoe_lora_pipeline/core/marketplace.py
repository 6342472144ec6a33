"""Marketplace profiles as data: what a shop's upload rules ask of a product photo.

A profile is a plain record (size, aspect, background, fill, format, colour space, byte size, required
marking). Three are built in, from the marketplaces' own rules (README "Publish to a marketplace"):

* ``amazon_main`` — main image: pure white RGB 255,255,255 background, the product filling ≥ 85 % of the
  frame, ≥ 1,000 px on the longest side for zoom (≤ 10,000), JPEG, sRGB, square recommended.
* ``google_merchant`` — Merchant Center: the IPTC ``DigitalSourceType`` ``trainedAlgorithmicMedia`` tag
  must stay on AI-generated images; ≥ 250 px for apparel, ≤ 64 megapixels, ≤ 16 MB.
* ``shopify`` — 2048 × 2048 square recommended, ≤ 20 megapixels, ≤ 20 MB.

A config lists the profiles to publish to under ``publish.profiles``: a name, or a mapping with ``name``
and the keys it overrides (``{name: amazon_main, target_side: 1600}``); a new profile names the built-in
it starts from with ``based_on``. Unknown names and keys are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MetadataRequirement = Literal["digital_source_type", "c2pa", "a1111_parameters", "provenance"]


class ProfileError(ValueError):
    """A profile entry cannot be used; the message names the profile and key."""


class MarketplaceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Also the asset check name (`<name>_compliance`) and a folder name: letters, digits, underscores.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")
    min_side: int = Field(ge=1, description="Longest side at least this (pixels).")
    target_side: int = Field(ge=1, description="Longest side of the published file (pixels).")
    max_side: int = Field(ge=1, description="Longest side at most this (pixels).")
    aspect: str = Field("1:1", pattern=r"^\d+:\d+$", description="width:height of the frame.")
    background: str = Field("#FFFFFF", pattern=r"^#[0-9A-Fa-f]{6}$", description="Border colour, exactly.")
    fill_min: float = Field(gt=0.0, le=1.0, description="Product bounding box / frame, long side, at least.")
    fill_max: float = Field(gt=0.0, le=1.0, description="… and at most (room for the zoom margin).")
    format: Literal["jpeg", "png"] = "jpeg"
    quality: int = Field(92, ge=1, le=100, description="JPEG quality.")
    colour_space: Literal["sRGB"] = Field("sRGB", description="Embedded ICC profile.")
    max_bytes: int = Field(ge=1, description="File size at most this.")
    required_metadata: tuple[MetadataRequirement, ...] = ("digital_source_type",)

    @model_validator(mode="after")
    def _consistent(self) -> MarketplaceProfile:
        if not self.min_side <= self.target_side <= self.max_side:
            raise ValueError(
                f"profile {self.name!r}: needs min_side ≤ target_side ≤ max_side, got "
                f"{self.min_side} / {self.target_side} / {self.max_side}"
            )
        if self.fill_min > self.fill_max:
            raise ValueError(f"profile {self.name!r}: fill_min {self.fill_min} > fill_max {self.fill_max}")
        w, h = self.aspect_ratio
        if w == 0 or h == 0:
            raise ValueError(f"profile {self.name!r}: aspect {self.aspect!r} has a zero side")
        return self

    @property
    def aspect_ratio(self) -> tuple[int, int]:
        w, h = self.aspect.split(":")
        return int(w), int(h)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        v = self.background.lstrip("#")
        return int(v[0:2], 16), int(v[2:4], 16), int(v[4:6], 16)

    @property
    def target_size(self) -> tuple[int, int]:
        """(width, height) of the published file: the long side is ``target_side``."""
        w, h = self.aspect_ratio
        if w >= h:
            return self.target_side, max(1, round(self.target_side * h / w))
        return max(1, round(self.target_side * w / h)), self.target_side

    @property
    def suffix(self) -> str:
        return ".jpg" if self.format == "jpeg" else ".png"

    @property
    def mime_type(self) -> str:
        return "image/jpeg" if self.format == "jpeg" else "image/png"

    def rules(self) -> str:
        """One line a reader can check the file against."""
        w, h = self.target_size
        return (
            f"{self.format.upper()} {w}×{h} (long side {self.min_side}–{self.max_side}), aspect {self.aspect}, "
            f"border {self.background}, product fill {self.fill_min:g}–{self.fill_max:g}, "
            f"{self.colour_space} ICC, ≤ {self.max_bytes / 1e6:g} MB, metadata: {', '.join(self.required_metadata)}"
        )


_MB = 1_000_000
# Every built-in profile asks for all three marks: the AI source type, the A1111 parameters, the provenance.
EVERY_MARK = ("digital_source_type", "a1111_parameters", "provenance")
BUILTIN_PROFILES: dict[str, MarketplaceProfile] = {
    "amazon_main": MarketplaceProfile(
        name="amazon_main",
        min_side=1000,
        target_side=2000,
        max_side=10000,
        fill_min=0.85,
        fill_max=0.95,
        format="jpeg",
        max_bytes=10 * _MB,
        required_metadata=EVERY_MARK,
    ),
    "google_merchant": MarketplaceProfile(
        name="google_merchant",
        min_side=250,
        target_side=1600,
        max_side=8000,
        fill_min=0.75,
        fill_max=0.90,
        format="jpeg",
        max_bytes=16 * _MB,
        required_metadata=EVERY_MARK,
    ),
    "shopify": MarketplaceProfile(
        name="shopify",
        min_side=800,
        target_side=2048,
        max_side=4472,
        fill_min=0.80,
        fill_max=0.95,
        format="png",
        max_bytes=20 * _MB,
        required_metadata=EVERY_MARK,
    ),
}


def resolve_profile(entry: str | Mapping[str, Any]) -> MarketplaceProfile:
    """A ``publish.profiles`` entry → the profile: a built-in name, or a mapping overriding its keys."""
    if isinstance(entry, str):
        if entry not in BUILTIN_PROFILES:
            raise ProfileError(
                f"unknown profile {entry!r}; built-in profiles: {', '.join(BUILTIN_PROFILES)} "
                "(or give a mapping with name, based_on and the keys)"
            )
        return BUILTIN_PROFILES[entry]
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ProfileError(f"profile entry {entry!r}: expected a name or a mapping with a 'name' key")
    data = dict(entry)
    name = data["name"]
    base_name = data.pop("based_on", name)
    if base_name not in BUILTIN_PROFILES:
        raise ProfileError(
            f"profile {name!r}: unknown built-in {base_name!r} to start from; built-in profiles: "
            f"{', '.join(BUILTIN_PROFILES)} (a new profile names one with based_on)"
        )
    unknown = sorted(set(data) - set(MarketplaceProfile.model_fields))
    if unknown:
        raise ProfileError(
            f"profile {name!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MarketplaceProfile.model_fields)}"
        )
    try:
        return MarketplaceProfile(**{**BUILTIN_PROFILES[base_name].model_dump(), **data})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'profile'} = {e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        raise ProfileError(f"profile {name!r}: {problems}") from None


def resolve_profiles(entries: Sequence[str | Mapping[str, Any]]) -> list[MarketplaceProfile]:
    profiles = [resolve_profile(e) for e in entries]
    names = [p.name for p in profiles]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ProfileError(f"profile(s) listed twice: {', '.join(duplicated)}")
    return profiles
