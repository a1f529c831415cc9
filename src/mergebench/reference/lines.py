"""LiNeS in memory, straight from docs/methods.md (no code shared with
`mergebench.methods.lines`): flattened task vectors, one float64 norm over all entries.

`tau_MTL`: `task_arithmetic` sum; `ties` (k=0.2 global, aggregate=mean); `consensus`
(threshold 0.6, k 2, over the task sum). `alpha = ||sum_t tau_t||_1 / (N * ||tau_MTL||_1)`;
block `l` of a key from `re.search(layer_pattern, key).group(1)`, `L` = largest + 1,
`lambda = alpha + beta * l / (L - 1)` (`alpha` if `L = 1` or outside every block);
`W = W_pre + lambda * tau_MTL`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from mergebench.reference.tall_masks import add_in_order, consensus_vector, flatten, ties_vector


def lines_reference(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    layer_pattern: str,
    exclude: Iterable[str] = (),
    base: str = "task_arithmetic",
    beta: float = 0.5,
) -> tuple[dict[str, torch.Tensor], float]:
    """The merged weights of the merged keys, and alpha."""
    flat = flatten(pretrained, finetuned, exclude)
    n = len(flat.task_vectors)
    total = add_in_order(flat.task_vectors)
    if base == "task_arithmetic":
        multitask = total
    elif base == "ties":
        multitask = ties_vector(flat.task_vectors, 0.2, "mean")
    elif base == "consensus":
        multitask = consensus_vector(flat, "task_arithmetic", 0.6, 2, list(finetuned))
    else:
        raise ValueError(f"no reference base {base!r}")
    norm_total = total.to(torch.float64).abs().sum().item()
    norm_multitask = multitask.to(torch.float64).abs().sum().item()
    alpha = norm_total / (n * norm_multitask) if norm_multitask > 0 else 0.0
    blocks = {}
    for key in flat.keys:
        found = re.search(layer_pattern, key)
        blocks[key] = int(found.group(1)) if found else None
    numbers = [b for b in blocks.values() if b is not None]
    count = max(numbers) + 1
    pre, mtl = flat.split(flat.pretrained), flat.split(multitask)
    out = {}
    for key in flat.keys:
        block = blocks[key]
        lam = alpha if block is None or count == 1 else alpha + beta * block / (count - 1)
        out[key] = (pre[key] + lam * mtl[key]).to(flat.dtypes[key])
    return out, alpha
