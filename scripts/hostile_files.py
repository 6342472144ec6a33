"""Files that test the cleaner: unusual-but-valid encodings and deliberately broken files.

Used by ``scripts/make_demo_data.py``. Nothing time-dependent is written (no EXIF dates, no PNG time
chunks), so the bytes depend only on the inputs and the Pillow/libjpeg/libwebp builds.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps
from shoe_drawing import WHITE, compose, make_spec, on_white


def jpeg_bytes(img: Image.Image, quality: int, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, **kw)  # Pillow writes no tIME chunk
    return buf.getvalue()


def webp_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "WEBP", method=4, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Valid but unusual encodings (the cleaner must keep them, correctly converted)
# --------------------------------------------------------------------------------------------


def _palette_with_transparency(rgb: Image.Image, layer: Image.Image) -> bytes:
    """Adaptive palette of the shoe on white; fully transparent where the layer was empty."""
    pal = rgb.quantize(colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    idx = np.array(pal)
    idx[np.asarray(layer.getchannel("A")) < 8] = 255
    p = Image.fromarray(idx, "P")
    palette = (pal.getpalette() or [])[: 255 * 3]
    palette += [0] * (255 * 3 - len(palette)) + [255, 255, 255]
    p.putpalette(palette)
    return png_bytes(p, transparency=255)


def _exif_rotated_jpeg(rgb: Image.Image, orient: int, quality: int) -> bytes:
    """Store the pixels rotated and let the EXIF Orientation tag say how to show them upright."""
    stored = rgb.transpose(Image.Transpose.ROTATE_90 if orient == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orient
    data = jpeg_bytes(stored, quality, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == rgb.size, "EXIF orientation round-trip failed"
    return data


def encode(
    kind: str, layer: Image.Image, quality: int, frames: Callable[[Image.Image], list[Image.Image]]
) -> bytes:
    """Serialise one valid image (RGBA ``layer``: the shot on transparency) as ``kind``.

    ``frames(first)`` gives the frames of an animation (only called for ``gif`` and ``webp_anim``).
    """
    rgb = on_white(layer)
    simple: dict[str, Callable[[], bytes]] = {
        "jpeg": lambda: jpeg_bytes(rgb, quality),
        "png": lambda: png_bytes(rgb),
        "webp": lambda: webp_bytes(rgb, quality=quality),
        "webp_lossless": lambda: webp_bytes(rgb, lossless=True, quality=80),
        "png_rgba": lambda: png_bytes(layer),  # shoe + soft shadow on full transparency
        "png_la": lambda: png_bytes(layer.convert("LA")),
        "png_p_transparent": lambda: _palette_with_transparency(rgb, layer),
        # full 16-bit range
        "png_i16": lambda: png_bytes(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)),
        "jpeg_l": lambda: jpeg_bytes(rgb.convert("L"), quality),
        "jpeg_cmyk": lambda: jpeg_bytes(rgb.convert("CMYK"), quality),
        "jpeg_exif6": lambda: _exif_rotated_jpeg(rgb, 6, quality),
        "jpeg_exif8": lambda: _exif_rotated_jpeg(rgb, 8, quality),
    }
    if kind in simple:
        return simple[kind]()
    if kind == "gif":
        pal = [fr.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for fr in frames(rgb)]
        buf = io.BytesIO()
        pal[0].save(buf, "GIF", save_all=True, append_images=pal[1:], duration=600, loop=0)
        return buf.getvalue()
    if kind == "webp_anim":
        anim = frames(rgb)
        return webp_bytes(anim[0], save_all=True, append_images=anim[1:], duration=600, loop=0, quality=85)
    raise ValueError(f"unknown kind {kind!r}")


# --------------------------------------------------------------------------------------------
# Deliberately invalid files (the cleaner must reject or report them)
# --------------------------------------------------------------------------------------------


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 30000) -> bytes:
    """A *valid* 1-bit all-white PNG declaring side x side pixels (900 Mpx) in ~150 KB.

    Streamed through zlib so neither this script nor its memory ever holds the full image.
    """
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte 0 + packed white pixels
    comp = zlib.compressobj(9)
    parts = []
    rows_per_chunk = 500
    block = row * rows_per_chunk
    for start in range(0, side, rows_per_chunk):
        n = min(rows_per_chunk, side - start)
        parts.append(comp.compress(block if n == rows_per_chunk else row * n))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def invalid_files(
    seed: int, exact_dup: tuple[int, bytes], near_dup: tuple[int, Image.Image]
) -> dict[str, bytes]:
    """Files the cleaner must reject (or, for the near-duplicate, report), named for their purpose.

    ``exact_dup``: (id, encoded bytes) of the photo to copy byte for byte; ``near_dup``: (id, the photo
    on white) to shrink and re-encode as a near-duplicate.
    """
    rng = random.Random(seed + 99)
    spare = make_spec(rng, "Brown", "Casual Shoes")
    truncated_src = jpeg_bytes(on_white(compose(spare, (800, 600), rng)), 90)
    tiny_spec = make_spec(rng, "Black", "Sneakers")
    wide_spec = make_spec(rng, "Blue", "Casual Shoes")
    # Extreme aspect: a banner-like strip (8:1); the shoe is small inside it.
    wide = Image.new("RGB", (1600, 200), WHITE)
    wide_shoe = on_white(compose(wide_spec, (400, 200), rng))
    wide.paste(wide_shoe, (600, 0))
    near_id, near = near_dup
    near = near.resize((round(near.width * 0.96), round(near.height * 0.96)), Image.Resampling.LANCZOS)
    return {
        "bad_empty.jpg": b"",
        "bad_truncated.jpg": truncated_src[: len(truncated_src) // 2],
        "bad_not_an_image.png": b"This is a text file with a .png extension, not an image.\n",
        "bad_too_small.jpg": jpeg_bytes(on_white(compose(tiny_spec, (48, 40), rng)), 90),
        "bad_extreme_aspect.jpg": jpeg_bytes(wide, 90),
        "bad_decompression_bomb.png": bomb_png(),
        f"dup_exact_of_{exact_dup[0]}.jpg": exact_dup[1],
        f"dup_near_of_{near_id}.jpg": jpeg_bytes(near, 72),
    }
