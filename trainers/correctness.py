"""A trial's per-example correctness on the test split, as one bit per example in result.json.

Which examples a seed gets right is what the test-set floor of its arm is computed from (Jordan 2024:
much of the seed-to-seed spread of test accuracy is the finite test set; with p_i the share of seeds
that get example i right, the spread that independent per-example draws alone would give is
Var = sum_i p_i (1 - p_i) / n^2). Stored as text so result.json stays one JSON file: "<n>:<base64 of
the zlib-compressed np.packbits>", about n / 8 bytes before compression (10,000 examples: <= 1.7 kB).
No torch here: the aggregation decodes it without loading the trainer.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

NOT_RECORDED = ""  # a diverged trial (its predictions mean nothing) or a result from before this field


def encode(hits: np.ndarray) -> str:
    bits = np.asarray(hits, dtype=bool).ravel()
    packed = zlib.compress(np.packbits(bits).tobytes(), level=9)
    return f"{bits.size}:{base64.b64encode(packed).decode('ascii')}"


def decode(text: str | None) -> np.ndarray | None:
    """The bool vector `encode` wrote; None when not recorded."""
    if not text:
        return None
    size, _, payload = text.partition(":")
    packed = np.frombuffer(zlib.decompress(base64.b64decode(payload)), dtype=np.uint8)
    return np.unpackbits(packed, count=int(size)).astype(bool)


def finite_test_set_sd(rows: list[np.ndarray]) -> float:
    """sqrt(sum_i p_i (1 - p_i)) / n over the seeds' correctness vectors (NaN with fewer than 2 seeds or
    vectors of different lengths): the accuracy SD that per-example coin flips alone would give."""
    if len(rows) < 2 or len({r.size for r in rows}) != 1:
        return float("nan")
    p = np.mean(np.stack(rows), axis=0)
    return float(np.sqrt((p * (1 - p)).sum()) / p.size)
