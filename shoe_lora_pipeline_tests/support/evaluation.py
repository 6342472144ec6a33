"""Known-answer inputs of the evaluation tests: shoe-shaped blobs on white whose QA verdict is known by
construction, and a small random-init CNN that stands in for Inception (values meaningless, plumbing real)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import nn

WHITE = (255, 255, 255)
BLACK = (25, 25, 25)
RED = (200, 30, 35)


def shoe(
    colour: tuple[int, int, int] = BLACK,
    centre: tuple[float, float] = (64, 64),
    scale: float = 1.0,
    size: int = 128,
    bg: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """A shoe-shaped blob (upper + sole + toe) centred on ``centre``; ~80x40 px at scale 1."""
    img = Image.new("RGB", (size, size), bg)
    draw_shoe(ImageDraw.Draw(img), colour, centre, scale)
    return img


def draw_shoe(
    d: ImageDraw.ImageDraw, colour: tuple[int, int, int], centre: tuple[float, float], scale: float
) -> None:
    cx, cy = centre
    s = scale

    def pt(x: float, y: float) -> tuple[float, float]:
        return (cx + x * s, cy + y * s)

    d.polygon([pt(-40, 14), pt(-40, -14), pt(-5, -20), pt(30, 0), pt(40, 8), pt(40, 14)], fill=colour)
    d.ellipse([pt(20, -2), pt(44, 18)], fill=colour)
    d.rectangle([pt(-42, 14), pt(42, 20)], fill=(40, 40, 40))


def varied_shoes() -> list[Image.Image]:
    return [
        shoe(BLACK, (64, 64), 1.0),
        shoe(RED, (50, 70), 0.6),
        shoe((40, 80, 180), (80, 50), 1.3).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        shoe((220, 200, 165), (64, 80), 0.8).rotate(30, fillcolor=WHITE),
    ]


def random_cnn(seed: int = 0, logits: int | None = None) -> nn.Module:
    """Random-init features extractor; with ``logits`` it also returns a classifier head's output."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 5, 2),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, 2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    if logits is None:
        return body

    class WithLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.head = nn.Linear(16, logits)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.body(x)
            return f, self.head(f) * 20

    return WithLogits()
