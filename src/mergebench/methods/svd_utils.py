"""SVD helpers shared by the SVD-based methods (TSV-M, Iso-C, Iso-CTS, CART).

Plain torch on whatever device the tensors live on (no numpy: the same code runs on a GPU).
Every function is stateless, so keys can run in parallel worker threads.

- `svd`: thin SVD (`full_matrices=False`), singular values descending, in the input's
  dtype; where that fails to converge (LAPACK/cuSOLVER error, or non-finite factors) it is
  redone in float64 and the factors cast back (methods.md: "SVDs in float32 on the device,
  float64 where float32 fails to converge").
- `polar`: the orthogonal polar factor `P Q^T` of `X = P S Q^T` (TSV-M's and Iso-CTS's
  orthogonalisation). For a rank-deficient `X` (TSV-M's zero blocks past `N*k`) it is not
  unique on the null space; the methods only use it where it is (see `tsv.py`).
- `truncate`: the rank-`k` truncated SVD `U_k diag(s_k) V_k^T` (CART).

None of the results depends on the SVD's sign choices: a sign flip of a pair `(u_i, v_i)`
cancels in `U diag(s) V^T`, in `U V^T` and in the polar factor (`polar(X D) = polar(X) D`
for a diagonal `D` of +-1).
"""

from __future__ import annotations

import torch


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `x = U diag(s) Vh` of a 2-D tensor, with the float64 fallback."""
    if x.dtype != torch.float64:
        try:
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            if bool(torch.isfinite(s).all()):
                return u, s, vh
        except torch.linalg.LinAlgError:
            pass
    u, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor `P Q^T` of `x = P diag(S) Q^T` (same shape as `x`)."""
    p, _, qh = svd(x)
    return p @ qh


def truncate(x: torch.Tensor, k: int) -> torch.Tensor:
    """The rank-`k` truncated SVD of `x`: `U[:, :k] diag(s[:k]) Vh[:k]`."""
    u, s, vh = svd(x)
    return (u[:, :k] * s[:k]) @ vh[:k]


def is_matrix(task_vectors: torch.Tensor) -> bool:
    """Whether a stack `[N, *shape]` holds matrices (a merged tensor with exactly 2 dims)."""
    return task_vectors.dim() == 3
