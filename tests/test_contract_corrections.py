"""The two corrections to the contract (methods.md): masks compare signs (tiny entries keep
their bits), and an exclude pattern that matches no key is an error naming it."""

from __future__ import annotations

import pytest
import torch

import mergebench
from mergebench.util.errors import MergeBenchError

TAU_A = [1e-30, 2e-30, 0.01, -0.02]
TAU_B = [3e-30, 1e-30, 0.02, 0.01]


def _pool():
    pre = {"w": torch.zeros(4)}
    finetuned = {"a": {"w": torch.tensor(TAU_A)}, "b": {"w": torch.tensor(TAU_B)}}
    return pre, finetuned


@pytest.mark.parametrize("torch_kernels", ["0", "1"])  # the numpy kernels and the GPU's torch path
def test_emr_masks_keep_tiny_entries(torch_kernels, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    pre, finetuned = _pool()
    result = mergebench.merge("emr", pre, finetuned, progress=False)
    # gamma = sgn([4e-30, 3e-30, 0.03, -0.01]) = [+, +, +, -]; tau_uni = [3e-30, 2e-30, 0.02, -0.02]
    assert result.mask("a", "w").tolist() == [True, True, True, True]
    assert result.mask("b", "w").tolist() == [True, True, True, False]
    # The products tau_t * tau_uni of the first two entries underflow to 0 in float32:
    assert (torch.tensor(TAU_A) * torch.tensor([3e-30, 2e-30, 0.02, -0.02]))[:2].tolist() == [0, 0]


@pytest.mark.parametrize("torch_kernels", ["0", "1"])
def test_a_task_of_tiny_entries_keeps_its_rescaler(torch_kernels, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    pre = {"w": torch.zeros(3)}
    finetuned = {
        "tiny": {"w": torch.tensor([1e-30, 2e-30, 3e-30])},
        "big": {"w": torch.tensor([0.5, 0.1, 0.2])},
    }
    result = mergebench.merge("emr", pre, finetuned, progress=False)
    assert result.mask("tiny", "w").tolist() == [True, True, True]
    assert result.rescalers["tiny"] > 0
    assert "empty_mask_tasks" not in result.extra


def test_mask_rescale_masks_compare_signs_too():
    pre, finetuned = _pool()
    result = mergebench.merge(
        "mask_rescale", pre, finetuned, progress=False, base="task_arithmetic"
    )
    # tau_uni = 0.3 * (tau_a + tau_b) = 0.3 * [4e-30, 3e-30, 0.03, -0.01]
    assert result.mask("a", "w").tolist() == [True, True, True, True]
    assert result.mask("b", "w").tolist() == [True, True, True, False]


def test_an_exclude_pattern_that_matches_no_key_is_an_error():
    pre = {"encoder.w": torch.zeros(2), "classifier.weight": torch.zeros(2)}
    finetuned = {t: {k: v + 1 for k, v in pre.items()} for t in ("a", "b")}
    with pytest.raises(MergeBenchError, match=r"exclude: pattern 'classifier' matches no key"):
        mergebench.merge("task_arithmetic", pre, finetuned, exclude=["classifier"], progress=False)
    merged = mergebench.merge(
        "task_arithmetic", pre, finetuned, exclude=[r"classifier\..*"], progress=False
    )
    assert torch.equal(merged.state_dict("a")["classifier.weight"], torch.ones(2))  # its own head
