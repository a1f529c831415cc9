"""RegMean: the closed form equals least squares computed directly; alpha; errors."""

from __future__ import annotations

import pytest
import torch
from data_toys import HEAD, MLP, ToyFamily, mlp_pool
from torch import nn

from mergebench.api import merge_pool
from mergebench.engine.pool import ModelPool
from mergebench.methods.regmean import scale_off_diagonal
from mergebench.util.errors import MergeBenchError


class OneLinear(nn.Module):
    """`layer` (merged by RegMean) and a head, so that the plan has a task-specific key."""

    def __init__(self, dim: int, out: int, layer: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer if layer is not None else nn.Linear(dim, out, bias=False)
        self.classifier = nn.Linear(out, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        hidden = self.layer(x)
        if attention_mask is not None:  # mean over real tokens
            w = attention_mask.unsqueeze(-1).float()
            hidden = (hidden * w).sum(1) / w.sum(1)
        return self.classifier(hidden)


def linear_pool(inputs: dict[str, torch.Tensor], dim=4, out=3, seed=0, extra=None, conv1d=False):
    g = torch.Generator().manual_seed(seed)

    def make(task: str) -> nn.Module:
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            return OneLinear(dim, out, Conv1D(out, dim))
        return OneLinear(dim, out)

    shape = (dim, out) if conv1d else (out, dim)
    pre = {"layer.weight": torch.randn(shape, generator=g)}
    pre |= {
        "classifier.weight": torch.randn(2, out, generator=g),
        "classifier.bias": torch.zeros(2),
    }
    if conv1d:
        pre["layer.bias"] = torch.zeros(out)
    finetuned = {}
    for task in inputs:
        state = {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()}
        finetuned[task] = state
    family = ToyFamily({t: {"train": x} for t, x in inputs.items()}, make, extra=extra)
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD, family=family)
    return pool


def least_squares(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W sum_t ||X_t W^T - X_t W_t^T||^2, solved by lstsq on the stacked problem."""
    x = torch.cat(xs).double()
    y = torch.cat([xi.double() @ w.double().T for xi, w in zip(xs, weights, strict=True)])
    return torch.linalg.lstsq(x, y).solution.T


def test_regmean_on_one_linear_layer_equals_least_squares():
    g = torch.Generator().manual_seed(1)
    inputs = {t: torch.randn(30, 4, generator=g) * (i + 1) for i, t in enumerate("abc")}
    pool = linear_pool(inputs)
    result = merge_pool("regmean", pool, progress=False, alpha=1.0, batch_size=7)
    expected = least_squares(
        list(inputs.values()), [pool.finetuned[t].get("layer.weight") for t in inputs]
    )
    merged = result.state_dict("a")["layer.weight"]
    torch.testing.assert_close(merged.double(), expected, atol=1e-5, rtol=1e-5)
    # The fit is better than plain averaging on the tasks' own inputs (RegMean's point).
    average = torch.stack([pool.finetuned[t].get("layer.weight") for t in inputs]).mean(0)

    def error(w):
        return sum(
            ((x @ w.T - x @ pool.finetuned[t].get("layer.weight").T) ** 2).sum()
            for t, x in inputs.items()
        )

    assert error(merged) < error(average)
    # Each task keeps its own head.
    assert torch.equal(
        result.state_dict("b")["classifier.weight"], pool.finetuned["b"].get("classifier.weight")
    )


def test_regmean_hidden_layer_uses_each_task_models_own_activations():
    pool, family = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4), examples=20)
    result = merge_pool("regmean", pool, progress=False, alpha=1.0)
    merged = result.state_dict("a")
    xs_layer, xs_out, w_layer, w_out = [], [], [], []
    for task in pool.tasks:
        model = family.build_model(task)
        model.load_state_dict(pool.finetuned[task].state_dict())
        x = family.inputs[task]["train"]
        with torch.no_grad():
            hidden = model.norm(torch.tanh(model.layer(x)))
        xs_layer.append(x)  # the bias is averaged, not part of the fit
        xs_out.append(hidden)
        w_layer.append(model.layer.weight.detach())
        w_out.append(model.out.weight.detach())
    torch.testing.assert_close(
        merged["layer.weight"].double(), least_squares(xs_layer, w_layer), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        merged["out.weight"].double(), least_squares(xs_out, w_out), atol=1e-5, rtol=1e-4
    )
    # Non-linear tensors (biases, LayerNorm) are averaged.
    for key in ("layer.bias", "out.bias", "norm.weight", "norm.bias"):
        average = torch.stack([pool.finetuned[t].get(key) for t in pool.tasks]).mean(0)
        torch.testing.assert_close(merged[key], average)
    assert result.extra["regmean_layers"] == 2 and result.extra["linear_layers_averaged"] == []
    assert all(req[1] == "train" for req in family.requests)


def test_alpha_scales_off_diagonals_only():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    assert torch.equal(
        scale_off_diagonal(gram, 0.5), torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=torch.float64)
    )
    assert torch.equal(scale_off_diagonal(gram, 1.0), gram)
    assert torch.equal(scale_off_diagonal(gram, 0.0), torch.diag(torch.diagonal(gram)))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_alpha_matches_the_formula_with_scaled_grams(alpha):
    g = torch.Generator().manual_seed(2)
    # Correlated features, so that the off-diagonals matter.
    mix = torch.randn(4, 4, generator=g)
    inputs = {t: torch.randn(40, 4, generator=g) @ mix + i for i, t in enumerate("ab")}
    pool = linear_pool(inputs)
    merged = merge_pool("regmean", pool, progress=False, alpha=alpha).state_dict("a")
    lhs = torch.zeros(4, 4, dtype=torch.float64)
    rhs = torch.zeros(4, 3, dtype=torch.float64)
    for task, x in inputs.items():
        x = x.double()
        gram = x.T @ x / len(x)
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        lhs += gram
        rhs += gram @ pool.finetuned[task].get("layer.weight").double().T
    expected = torch.linalg.solve(lhs, rhs).T
    torch.testing.assert_close(merged["layer.weight"].double(), expected, atol=1e-5, rtol=1e-5)
    if alpha == 0.0:
        # Diagonal only: per input feature j, a weighted average of column j.
        w = torch.stack([pool.finetuned[t].get("layer.weight").double() for t in inputs])
        d = torch.stack([(x.double() ** 2).mean(0) for x in inputs.values()])  # [N, in]
        column_avg = (w * d[:, None, :]).sum(0) / d.sum(0)[None, :]
        torch.testing.assert_close(
            merged["layer.weight"].double(), column_avg, atol=1e-5, rtol=1e-5
        )
    else:
        plain = merge_pool("regmean", pool, progress=False, alpha=0.0).state_dict("a")
        assert not torch.allclose(merged["layer.weight"], plain["layer.weight"], atol=1e-3)


def test_padding_rows_are_left_out():
    g = torch.Generator().manual_seed(3)
    x = {t: torch.randn(6, 5, 4, generator=g) for t in "ab"}
    mask = {t: (torch.rand(6, 5, generator=g) > 0.4).long() for t in "ab"}
    for t in "ab":
        mask[t][:, 0] = 1
        x[t][mask[t] == 0] = 100.0  # padding activations that would wreck the fit
    extra = {t: {"train": {"attention_mask": mask[t]}} for t in "ab"}
    pool = linear_pool(x, extra=extra)
    merged = merge_pool("regmean", pool, progress=False, alpha=1.0).state_dict("a")
    real = [x[t][mask[t].bool()] for t in "ab"]
    weights = [pool.finetuned[t].get("layer.weight") for t in "ab"]
    # Equal token counts are not needed: each task's Gram is a mean over its own rows.
    lhs = sum(r.double().T @ r.double() / len(r) for r in real)
    rhs = sum(
        r.double().T @ r.double() / len(r) @ w.double().T
        for r, w in zip(real, weights, strict=True)
    )
    torch.testing.assert_close(
        merged["layer.weight"].double(), torch.linalg.solve(lhs, rhs).T, atol=1e-5, rtol=1e-5
    )


def test_gpt2_conv1d_weights_are_transposed():
    g = torch.Generator().manual_seed(4)
    inputs = {t: torch.randn(25, 4, generator=g) for t in "ab"}
    pool = linear_pool(inputs, conv1d=True)
    merged = merge_pool("regmean", pool, progress=False, alpha=1.0).state_dict("a")
    # Conv1D computes x W + b with W [in, out]: the least-squares W^T in Linear terms.
    weights = [pool.finetuned[t].get("layer.weight").T for t in "ab"]
    expected = least_squares(list(inputs.values()), weights).T
    torch.testing.assert_close(merged["layer.weight"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        merged["layer.bias"],
        (pool.finetuned["a"].get("layer.bias") + pool.finetuned["b"].get("layer.bias")) / 2,
    )


def test_singular_system_names_the_layer():
    g = torch.Generator().manual_seed(5)
    inputs = {t: torch.randn(10, 4, generator=g) for t in "ab"}
    for x in inputs.values():
        x[:, 2] = 0.0  # a feature no task ever uses: its row and column of G are zero
    pool = linear_pool(inputs)
    with pytest.raises(MergeBenchError, match=r"regmean: .*'layer\.weight'.*singular"):
        merge_pool("regmean", pool, progress=False)


def test_options_are_validated():
    pool, _ = mlp_pool()
    with pytest.raises(MergeBenchError, match=r"regmean\.alpha"):
        merge_pool("regmean", pool, alpha=1.5)
    with pytest.raises(MergeBenchError, match=r"regmean\.num_examples"):
        merge_pool("regmean", pool, num_examples=0)
    with pytest.raises(MergeBenchError, match=r"regmean\.split"):
        merge_pool("regmean", pool, split="test")
    with pytest.raises(MergeBenchError, match="unknown option 'alhpa'"):
        merge_pool("regmean", pool, alhpa=0.5)
    no_data = ModelPool.from_checkpoints(pool.pretrained, pool.finetuned, exclude=HEAD)
    with pytest.raises(MergeBenchError, match="needs data"):
        merge_pool("regmean", no_data)


def test_num_examples_limits_the_inputs_read():
    pool, family = mlp_pool(examples=30)
    result = merge_pool("regmean", pool, progress=False, num_examples=10, batch_size=4)
    assert result.extra["rows_per_task"] == {"a": 10, "b": 10}
    assert isinstance(family.build_model("a"), MLP)


class Chain(nn.Module):
    """Layers of one width whose inputs are temporaries, freed as soon as each layer ran: a
    later input may reuse an earlier one's memory address (no Gram may be mixed up)."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.classifier = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(torch.tanh(x) * 1.5)
        return self.classifier(x)


def test_each_layer_gets_its_own_gram_when_memory_is_reused():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    pre = Chain().state_dict()
    finetuned = {
        t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "ab"
    }
    inputs = {t: torch.randn(64, 8, generator=g) for t in "ab"}
    family = ToyFamily({t: {"train": x} for t, x in inputs.items()}, lambda task: Chain())
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD, family=family)
    merged = merge_pool("regmean", pool, progress=False, alpha=1.0, batch_size=64)
    for i in range(4):
        xs, ws = [], []
        for task, x in inputs.items():
            model = Chain()
            model.load_state_dict(finetuned[task])
            with torch.no_grad():
                for layer in model.layers[:i]:
                    x = layer(torch.tanh(x) * 1.5)
            xs.append(torch.tanh(x) * 1.5)
            ws.append(finetuned[task][f"layers.{i}.weight"])
        torch.testing.assert_close(
            merged.state_dict("a")[f"layers.{i}.weight"].double(),
            least_squares(xs, ws),
            atol=1e-5,
            rtol=1e-4,
        )
