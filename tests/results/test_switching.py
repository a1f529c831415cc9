"""TaskSwitcher: switching a live model between tasks in place gives exactly the weights of
`model.load_state_dict(result.state_dict(task))`, for every kind of result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergebench
from mergebench.results.switching import TaskSwitcher
from mergebench.util.errors import MergeBenchError

TASKS = ["a", "b", "c"]


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 40)
        self.out = nn.Linear(40, 4, bias=False)
        self.classifier = nn.Linear(4, classes, bias=False)
        self.register_buffer("position_ids", torch.arange(7))


def make_pool(dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    torch.manual_seed(0)
    pre = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in TinyNet().state_dict().items()
    }
    g = torch.Generator().manual_seed(1)
    finetuned = {}
    for task in TASKS:
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point():
                ft[key] = (value.float() + 0.05 * torch.randn(value.shape, generator=g)).to(dtype)
            else:
                ft[key] = value.clone()
        finetuned[task] = ft
    return pre, finetuned


def loaded(result, task: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    model = TinyNet().to(dtype)
    model.load_state_dict(result.state_dict(task))
    return model.state_dict()


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        # Bit for bit (view as integers so that -0.0 and 0.0 count as different).
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
        a, b = actual[key].cpu(), value.cpu()
        if value.is_floating_point():
            a, b = a.view(as_int), b.view(as_int)
        assert torch.equal(a, b), key


CASES = [
    ("emr", {}),
    ("emr", {"mask": False}),
    ("emr", {"rescaler": "global"}),
    ("mask_rescale", {"base": "ties"}),
    ("task_arithmetic", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("cache_pretrained", [True, False])
def test_switching_in_place_equals_loading_the_state_dict(method, params, cache_pretrained):
    pre, finetuned = make_pool()
    result = mergebench.merge(
        method, pre, finetuned, exclude=[r"classifier\..*"], progress=False, **params
    )
    model = TinyNet()
    switcher = TaskSwitcher(result, model, cache_pretrained=cache_pretrained)
    parameters_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    for task in ["b", "a", "c", "a", "a"]:  # back and forth, and a repeat
        assert switcher.switch(task) is model
        assert_same_weights(model.state_dict(), loaded(result, task))
    # In place: the very same parameter storage, never a rebuilt model.
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == parameters_before


def test_switching_keeps_the_storage_dtype():
    pre, finetuned = make_pool(torch.bfloat16)
    result = mergebench.merge("emr", pre, finetuned, exclude=[r"classifier\..*"], progress=False)
    model = TinyNet().to(torch.bfloat16)
    switcher = TaskSwitcher(result, model)
    for task in TASKS:
        switcher.switch(task)
        assert_same_weights(model.state_dict(), loaded(result, task, torch.bfloat16))


def test_switching_rejects_what_does_not_fit():
    pre, finetuned = make_pool()
    result = mergebench.merge("emr", pre, finetuned, exclude=[r"classifier\..*"], progress=False)
    with pytest.raises(MergeBenchError, match="not in this result"):
        TaskSwitcher(result, TinyNet()).switch("nope")
    with pytest.raises(MergeBenchError, match="classifier.weight.*own model"):
        TaskSwitcher(result, TinyNet(classes=5)).switch("a")
    bigger = TinyNet()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(MergeBenchError, match="missing 'extra.bias'"):
        TaskSwitcher(result, bigger).switch("a")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_switching_on_cuda_matches_the_cpu_weights():
    pre, finetuned = make_pool()
    result = mergebench.merge("emr", pre, finetuned, exclude=[r"classifier\..*"], progress=False)
    model = TinyNet().cuda()
    switcher = TaskSwitcher(result, model)
    for task in TASKS:
        switcher.switch(task)
        assert_same_weights(model.state_dict(), loaded(result, task))


def test_switching_back_after_other_weights_were_loaded():
    pre, finetuned = make_pool()
    emr = mergebench.merge("emr", pre, finetuned, exclude=[r"classifier\..*"], progress=False)
    average = mergebench.merge(
        "weight_averaging", pre, finetuned, exclude=[r"classifier\..*"], progress=False
    )
    model = TinyNet()
    switcher = TaskSwitcher(emr, model)
    switcher.switch("a")
    model.load_state_dict(average.state_dict("b"))  # someone else used the model meanwhile
    switcher.switch("a")
    assert_same_weights(model.state_dict(), loaded(emr, "a"))


def test_the_evaluator_switches_task_conditioned_results_in_place():
    from types import SimpleNamespace

    from mergebench.evaluation import ModelCache

    data = SimpleNamespace(
        num_classes=lambda task: 3, family=SimpleNamespace(build_model=lambda task: TinyNet())
    )
    pre, finetuned = make_pool()
    exclude = [r"classifier\..*"]
    emr = mergebench.merge("emr", pre, finetuned, exclude=exclude, progress=False)
    ta = mergebench.merge("task_arithmetic", pre, finetuned, exclude=exclude, progress=False)
    cache = ModelCache(data)
    models = set()
    for result in (emr, ta, emr):
        for task in TASKS:
            model = cache.model_with(task, result)
            models.add(id(model))
            assert_same_weights(model.state_dict(), loaded(result, task))
    assert len(models) == 1  # one model, reused across tasks and methods
