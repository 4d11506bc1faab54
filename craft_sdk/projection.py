"""The fixed random projection A: z ∈ R^D → context offset [n_ctx, d] (numpy only).

A is regenerated from its seed with numpy's PCG64 bit generator and the
``standard_normal`` float64 stream, which numpy produces identically on every
platform; entries are scaled by ``std`` and rounded to float32.
"""

from __future__ import annotations

import numpy as np

GENERATOR = "numpy.PCG64.standard_normal.float64"


def projection_matrix(seed: int, out_dim: int, intrinsic_dim: int, std: float) -> np.ndarray:
    """A as float32 [out_dim, intrinsic_dim] with entries ~ N(0, std²)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return (rng.standard_normal((out_dim, intrinsic_dim)) * std).astype(np.float32)


def project(a: np.ndarray, z: np.ndarray, n_ctx: int, ctx_dim: int) -> np.ndarray:
    """Offsets A z: z [D] → [n_ctx, d]; z [P, D] → [P, n_ctx, d] (float32)."""
    z = np.asarray(z, dtype=np.float64)
    out = (z @ a.astype(np.float64).T).astype(np.float32)
    return out.reshape(*z.shape[:-1], n_ctx, ctx_dim)
