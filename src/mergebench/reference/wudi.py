"""WUDI in memory, straight from docs/methods.md: a yardstick for `methods.wudi`.

Per matrix whose key fully matches `keys`: `tau_m = sum_t tau_t`, then `steps` steps of
`torch.optim.Adam` (defaults, `foreach=False`) on the loss as written,
`sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`, by autograd, in `dtype` (float64
by default). A zero task vector contributes no term. Other merged tensors: `W_pre` or
`W_pre + mean_t tau_t` (`others`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from mergebench.reference.tsv import StateDict, merged_keys


def wudi_loss(merged: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    loss = merged.new_zeros(())
    for tau in taus:
        sq_norm = (tau * tau).sum()
        if sq_norm == 0:
            continue
        loss = loss + ((merged - tau) @ tau.T).pow(2).sum() / sq_norm
    return loss


def wudi_fit(taus: list[torch.Tensor], steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """`(tau_m, losses)`: losses before every step and after the last."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total = total + tau
    merged = torch.nn.Parameter(total)
    optimizer = torch.optim.Adam([merged], lr=lr, foreach=False)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = wudi_loss(merged, taus)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append(float(wudi_loss(merged, taus)))
    return merged.detach(), losses


def merge_wudi(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    steps: int = 300,
    lr: float = 1e-5,
    keys: str = r".*\.weight",
    others: str = "pretrained",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    pattern = re.compile(keys)
    merged_set = set(merged_keys(pretrained, finetuned, exclude))
    out: dict[str, torch.Tensor] = {}
    for key, value in pretrained.items():
        if key not in merged_set:
            if not value.is_floating_point():
                out[key] = value.clone()
            continue
        pre = value.to(dtype)
        taus = [ft[key].to(dtype) - pre for ft in finetuned.values()]
        if value.dim() == 2 and pattern.fullmatch(key):
            delta, _ = wudi_fit(taus, steps, lr)
        elif others == "mean":
            delta = sum(taus[1:], taus[0]) / len(taus)
        else:
            delta = torch.zeros_like(pre)
        out[key] = (pre + delta).to(value.dtype)
    return out
