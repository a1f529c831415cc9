"""LP-FT's first step (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"):
fit each task's head on the frozen pretrained features before fine-tuning everything, so
the backbone's first updates follow a useful head instead of a random one. The features are
computed once; the head is a multinomial logistic regression fitted by full-batch L-BFGS
(deterministic on a fixed thread count)."""

from __future__ import annotations

import torch

from mergebench.families.base import HEAD, ZooFamily
from mergebench.families.labeled import LabeledData

PROBE_L2 = 1e-3  # on the mean cross-entropy: keeps the weights finite on separable features
PROBE_ITERATIONS = 200
FEATURE_BATCH = 128


def head_features(
    family: ZooFamily, model: torch.nn.Module, data: LabeledData, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head receives for every training example of `task` (caught with a hook),
    and their labels, from `model` in eval mode (the caller sets the training mode again)."""
    head = getattr(model, HEAD)
    caught: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach()))
    labels = []
    model.eval()
    try:
        with torch.inference_mode():
            for batch, y in data.batches(task, "train", FEATURE_BATCH):
                family.logits(model, batch)
                labels.append(y)
    finally:
        handle.remove()
    return torch.cat(caught), torch.cat(labels)


def fit_probe_head(family: ZooFamily, model: torch.nn.Module, data: LabeledData, task: str) -> None:
    """Replace `model`'s head by the logistic-regression probe of its frozen features."""
    features, labels = head_features(family, model, data, task)
    head = getattr(model, HEAD)
    weight = torch.zeros_like(head.weight, requires_grad=True)
    bias = torch.zeros_like(head.bias, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.nn.functional.linear(features, weight, bias)
        loss = torch.nn.functional.cross_entropy(logits, labels) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
