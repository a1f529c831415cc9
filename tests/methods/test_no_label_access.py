"""No merging method can read a label: every data-dependent method runs on a family whose data
set raises the moment a label is touched, and touches nothing beyond the TaskFamily protocol."""

from __future__ import annotations

import pytest
import torch
from data_toys import MLP, ToyFamily, mlp_pool

from mergebench.api import merge_pool
from mergebench.engine.pool import ModelPool
from mergebench.methods.data_utils import InputsOnly
from mergebench.methods.registry import METHODS, build_method
from mergebench.util.errors import MergeBenchError

PROTOCOL = {"build_model", "logits", "unlabeled_inputs"}


class LabelRead(AssertionError):
    pass


class Example:
    def __init__(self, x: torch.Tensor, label: int) -> None:
        self.x = x
        self._label = label

    @property
    def label(self) -> int:
        raise LabelRead("a merging method read a label")


class LabelBombDataset:
    """Inputs with labels, where reading any label raises."""

    def __init__(self, x: torch.Tensor, classes: int) -> None:
        self.examples = [Example(row, i % classes) for i, row in enumerate(x)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def labels(self):
        raise LabelRead("a merging method read the labels")


class LabeledFamily:
    """A family that holds labeled data sets (as an evaluator needs) but hands out inputs only.
    It records every attribute a method reaches for."""

    def __init__(self, toy: ToyFamily, classes: dict[str, int]) -> None:
        self._data = {
            (task, split): LabelBombDataset(x, classes[task])
            for task, splits in toy.inputs.items()
            for split, x in splits.items()
        }
        self._toy = toy
        self.touched: list[str] = []
        self.splits: list[str] = []

    def __getattribute__(self, name: str):
        if not name.startswith("_") and name not in ("touched", "splits"):
            object.__getattribute__(self, "touched").append(name)
        return object.__getattribute__(self, name)

    def build_model(self, task: str):
        return self._toy.build_model(task)

    def logits(self, model, batch):
        return model(batch["x"])

    def unlabeled_inputs(self, task, split, max_examples, batch_size):
        self.splits.append(split)
        data = self._data[(task, split)]
        n = len(data) if max_examples is None else min(max_examples, len(data))
        for start in range(0, n, batch_size):
            yield {"x": torch.stack([data[i].x for i in range(start, min(start + batch_size, n))])}

    # What only the evaluator may call: any use by a method fails the test.
    def labeled_test_set(self, task):
        return self._data[(task, "test")].labels

    def labels(self, task, split):
        return self._data[(task, split)].labels


CASES = {
    "regmean": ({}, {"train"}),
    "fisher": ({"num_examples": 6}, {"train"}),
    "adamerging[task]": ({"granularity": "task", "steps": 2, "accelerator": "cpu"}, {"test"}),
    "adamerging[layer]": ({"steps": 2, "accelerator": "cpu"}, {"test"}),
    "adamerging[++]": ({"ties": True, "steps": 2, "accelerator": "cpu"}, {"test"}),
    "mask_rescale[adamerging++]": (
        {"base": "adamerging", "base_params": {"ties": True, "steps": 1, "accelerator": "cpu"}},
        {"test"},
    ),
    "regmean[validation]": ({"split": "validation"}, {"validation"}),
}


def labeled_pool() -> tuple[ModelPool, LabeledFamily]:
    pool, toy = mlp_pool(tasks=("a", "b"), classes=(3, 4), examples=12)
    family = LabeledFamily(toy, {"a": 3, "b": 4})
    with pytest.raises(LabelRead):  # the trap works
        family.labeled_test_set("a")
    family.touched.clear()
    pool.family = family
    return pool, family


@pytest.mark.parametrize("case", list(CASES))
def test_method_runs_without_touching_a_label(case):
    params, splits = CASES[case]
    pool, family = labeled_pool()
    method = case.split("[")[0]
    result = merge_pool(method, pool, progress=False, **params)
    for task in pool.tasks:
        assert all(
            torch.isfinite(v).all()
            for v in result.state_dict(task).values()
            if v.is_floating_point()
        )
    assert set(family.touched) <= PROTOCOL, set(family.touched) - PROTOCOL
    assert set(family.splits) == splits


def test_every_data_dependent_method_is_covered():
    covered = {case.split("[")[0] for case in CASES}
    for name in METHODS:
        if build_method(name).needs_data:
            assert name in covered, f"{name} reads data but is not in the no-label test"


class LeakyFamily(ToyFamily):
    """A buggy family that puts labels in the batch."""

    def unlabeled_inputs(self, task, split, max_examples, batch_size):
        for batch in super().unlabeled_inputs(task, split, max_examples, batch_size):
            yield {**batch, "labels": torch.zeros(len(batch["x"]), dtype=torch.long)}


@pytest.mark.parametrize(
    "method,params",
    [("regmean", {}), ("fisher", {}), ("adamerging", {"steps": 1, "accelerator": "cpu"})],
)
def test_a_batch_carrying_labels_is_refused(method, params):
    pool, _ = mlp_pool(family_cls=LeakyFamily)
    with pytest.raises(MergeBenchError, match="'labels'.*never receive labels"):
        merge_pool(method, pool, progress=False, **params)
    assert isinstance(pool.family.build_model("a"), MLP)


# The label guard (`InputsOnly`) refuses every label-like key, in any case.
LABEL_LIKE = [
    "label",
    "labels",
    "label_ids",
    "target",
    "targets",
    "y",
    "Label",
    "LABELS",
    "Label_IDs",
    "Target",
    "TARGETS",
    "Y",
]


def guarded(extra_key: str) -> InputsOnly:
    x = torch.randn(4, 3)
    family = ToyFamily({"a": {"train": x}}, lambda task: torch.nn.Linear(3, 2))
    family.extra = {"a": {"train": {extra_key: torch.zeros(4, dtype=torch.long)}}}
    return InputsOnly(family, "regmean", "toy")


@pytest.mark.parametrize("key", LABEL_LIKE)
def test_label_guard_refuses_every_label_key(key):
    batches = guarded(key).batches("a", "train", None, 2, torch.device("cpu"))
    with pytest.raises(MergeBenchError, match=rf"(?i)key '{key}' .*never receive labels"):
        next(batches)


@pytest.mark.parametrize("key", ["attention_mask", "input_ids", "pixel_values", "yy", "labeled"])
def test_label_guard_lets_inputs_through(key):
    batches = list(guarded(key).batches("a", "train", None, 2, torch.device("cpu")))
    assert [sorted(b) for b in batches] == [sorted(["x", key])] * 2
