"""A tolerance for comparing one floating-point result computed two ways (another tiling, batch shape or kernel).

A sum of n products in a precision with unit roundoff u errs by at most about n·u·Σ|a_i·b_i| (Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1). How a CPU blocks a matmul (its vector width, the library's kernel, the
tile sizes of the call) changes which way each sum rounds, not this bound. So two correct computations of the same
tensor may differ by up to ~2·n·u times the magnitude of its terms on any CPU. An element-wise relative tolerance
fails where a value is a difference of two large terms (near zero), and a fixed absolute one (1e-7, 1e-6) assumes
one scale; the bound here takes the largest magnitude of the reference as that scale, so it holds on every machine
while a real difference (a wrong cell, gene or tile: an error of the order of the values) still fails.

    from tests.tolerance import assert_close_rounding
    assert_close_rounding(tiled, whole, terms=100)   # terms: the longest reduction on the path (a matmul's inner size)
"""

from __future__ import annotations

import torch


def rounding_tolerance(want: torch.Tensor, terms: int, dtype: torch.dtype | None = None) -> dict[str, float]:
    """``rtol``/``atol`` for :func:`torch.testing.assert_close`: 2·terms·eps (eps of ``dtype``, default ``want``'s),
    and that times max |want|."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    tol = 2 * terms * torch.finfo(dtype or want.dtype).eps
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return {"rtol": tol, "atol": tol * scale}


def assert_close_rounding(got, want, *, terms: int, msg: str | None = None) -> None:
    """``got`` equals ``want`` (tensors or arrays) up to the rounding of reductions of ``terms`` products, in the
    coarser precision of the two (a float32 result against a float64 reference: float32's)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if not (got.is_floating_point() and want.is_floating_point()):  # masks, indices: no rounding, so exactly
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=msg)
        return
    coarse = max((got.dtype, want.dtype), key=lambda d: torch.finfo(d).eps)
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), equal_nan=True,
                               **rounding_tolerance(want, terms, coarse),
                               msg=None if msg is None else (lambda default: f"{msg}: {default}"))
