"""RePr re-initialisation: new filters orthogonal to the kept ones and to their own old values.

The directions come from the orthogonal complement of [old dropped rows; kept
rows], found with QR in float64 (see `orthogonal_rows`); each new row gets the
norm of a fresh initializer draw, so the re-introduced filters start at the
scale of an initial filter. When the null
space has fewer dimensions than filters to place (e.g. a first layer with
K = C*k*k < J), the remaining rows fall back to the initializer and are counted.
"""

from __future__ import annotations

import torch


def orthogonal_rows(
    kept: torch.Tensor, old: torch.Tensor, fresh: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """New rows [n, K] for n = len(old) dropped filters, and how many fell back to `fresh`.

    kept: [J - n, K] current kept rows; old: [n, K] the dropped rows' values before the drop;
    fresh: [n, K] an initializer draw that sets the norms and serves as the fallback.

    A reduced QR of [old; kept]^T gives an orthonormal basis Q of their span; Gaussian vectors
    with that span projected out (twice, for float error) and orthonormalised by a second QR are
    uniformly random directions in the null space. This costs O(K m^2), not the O(K^3) of a
    complete QR, which matters for Inception layers with K = C*3*3 in the thousands.
    """
    n = len(old)
    rows = torch.cat([old, kept]).double()
    dim = rows.shape[1]
    q, _ = torch.linalg.qr(rows.T)  # [K, min(K, m)]
    placed = max(0, min(n, dim - q.shape[1]))
    out = fresh.clone()
    if placed:
        g = torch.randn(dim, placed, generator=generator, device=generator.device, dtype=torch.float64)
        g = g.to(q.device)
        for _ in range(2):
            g = g - q @ (q.T @ g)
        directions, _ = torch.linalg.qr(g)  # [K, placed], orthonormal, inside the null space
        norms = fresh[:placed].double().norm(dim=1, keepdim=True)
        out[:placed] = (directions.T * norms).to(out.dtype)
    return out, n - placed
