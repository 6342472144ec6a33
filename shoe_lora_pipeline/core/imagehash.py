"""Perceptual hashing (DCT pHash) with PIL + numpy only.

Used by cleaning (near-duplicate report) and later by evaluation (diversity / memorisation checks), so
the hash must be deterministic and cheap. Algorithm (the classic pHash, as in the ``imagehash``
package): grayscale, resize to 32x32 (LANCZOS), 2-D DCT-II, keep the top-left 8x8 low frequencies,
set a bit for every coefficient above their median. Bits are packed row-major, first coefficient in
the most significant bit, giving a 64-bit int (shown as 16 hex digits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8x8 low-frequency block -> 64 bits
HIGHFREQ_FACTOR = 4  # image is reduced to (8*4)x(8*4) = 32x32 before the DCT
HASH_BITS = HASH_SIZE * HASH_SIZE
HEX_DIGITS = HASH_BITS // 4


@lru_cache(maxsize=4)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (n x n): ``D @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(n).reshape(-1, 1)
    i = np.arange(n).reshape(1, -1)
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0, :] = np.sqrt(1.0 / n)
    d.setflags(write=False)  # shared via the cache: keep it immutable
    return d


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash of ``image`` (any mode; alpha is ignored, so pass flattened RGB)."""
    side = HASH_SIZE * HIGHFREQ_FACTOR
    gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    d = dct_matrix(side)
    coeffs = d @ pixels @ d.T  # separable 2-D DCT: rows then columns
    # Rounding removes float noise (~1e-13) so flat regions hash identically on every BLAS/platform.
    low = np.round(coeffs[:HASH_SIZE, :HASH_SIZE].ravel(), 6)
    bits = low > np.median(low)
    value = 0
    for bit in bits:  # row-major, MSB first
        value = (value << 1) | int(bit)
    return value


def hash_to_hex(value: int) -> str:
    """Fixed-width (16 digit) lower-case hex form of a 64-bit hash."""
    return f"{value:0{HEX_DIGITS}x}"


def hex_to_hash(text: str) -> int:
    """Inverse of :func:`hash_to_hex`."""
    if len(text) != HEX_DIGITS:
        raise ValueError(f"expected a {HEX_DIGITS}-digit hex hash, got {text!r}")
    return int(text, 16)


def phash_hex(image: Image.Image) -> str:
    """:func:`phash` as a 16-digit hex string (the form stored in manifests)."""
    return hash_to_hex(phash(image))


def _as_int(value: int | str) -> int:
    return hex_to_hash(value) if isinstance(value, str) else int(value)


def hamming_distance(a: int | str, b: int | str) -> int:
    """Number of differing bits between two hashes (ints or hex strings)."""
    return bin(_as_int(a) ^ _as_int(b)).count("1")


def _popcount_u64(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values).astype(np.int64)
    as_bytes = values.astype(np.uint64).view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1).astype(np.int64)


def hashes_to_array(hashes: Sequence[int | str]) -> np.ndarray:
    """Hashes (ints or hex strings) as a uint64 array, for vectorised distances."""
    return np.array([_as_int(h) for h in hashes], dtype=np.uint64)


def pairwise_hamming(hashes: Sequence[int | str]) -> np.ndarray:
    """Full n x n matrix of Hamming distances (fine for a few thousand hashes)."""
    arr = hashes_to_array(hashes)
    return _popcount_u64(arr[:, None] ^ arr[None, :])


def hamming_to_set(query: int | str, hashes: Sequence[int | str]) -> np.ndarray:
    """Distances from one hash to each of ``hashes`` (e.g. a generated image vs the training set)."""
    arr = hashes_to_array(hashes)
    return _popcount_u64(arr ^ np.uint64(_as_int(query)))


def iter_near_duplicate_pairs(
    hashes: Sequence[int | str], max_distance: int
) -> Iterator[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)`` with ``i < j`` and distance <= ``max_distance``, by j then i.

    One row of distances at a time, and pairs as they are found: memory stays O(n) however many
    pairs there are (a catalogue of side views on white has many).
    """
    arr = hashes_to_array(hashes)
    for j in range(1, len(arr)):
        dist = _popcount_u64(arr[:j] ^ arr[j])
        for i in np.flatnonzero(dist <= max_distance):
            yield int(i), j, int(dist[i])


def near_duplicate_pairs(hashes: Sequence[int | str], max_distance: int) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, distance)`` with ``i < j`` and distance <= ``max_distance``, sorted."""
    return sorted(iter_near_duplicate_pairs(hashes, max_distance))
