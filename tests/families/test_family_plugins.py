"""Families as data: a model config names its family class (`_target_`) and checkpoint source
(`source`); a family of one's own, in one's own module, runs without editing the package."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from zoo_configs import MINILM, TEXT_MODEL, TEXT_SET

from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.families import family_class
from mergebench.report.store import config_hash
from mergebench.sources import SOURCES, load_family, open_source
from mergebench.util.config import compose_config, group_options, load_group
from mergebench.util.errors import MergeBenchError

# A user's own zoo family: hashed characters, a bag of embeddings, a linear head per task.
PLUGIN = """
import torch
from torch import nn

from mergebench.families.base import HEAD, ZooFamily


class CharBag(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.EmbeddingBag(97, 8, mode="mean")
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(ids))


class CharFamily(ZooFamily):
    name = "chars"
    kind = "chars"
    modality = "text"

    def __init__(self, tasks, width: int = 24, eval_batch_size: int = 16) -> None:
        super().__init__(tasks, eval_batch_size)
        self.width = width

    def encode(self, inputs):
        rows = [[ord(c) % 97 for c in str(text)[: self.width].ljust(self.width)] for text in inputs]
        return {"ids": torch.tensor(rows)}

    def _new_model(self, num_classes: int) -> nn.Module:
        return CharBag(num_classes)

    def pretrained_state(self):
        torch.manual_seed(0)
        state = CharBag(2).state_dict()
        return {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
"""

MODEL_YAML = """\
name: chars
_target_: my_families.CharFamily
source: zoo
exclude: ['classifier\\..*']
options: {width: 24}
finetune: {epochs: 1, batch_size: 8, lr: 1.0e-2, head_lr: 1.0e-2, weight_decay: 0.0,
  warmup: 0.0, max_grad_norm: 1.0, multitask_epochs: 1, multitask_lr: 1.0e-2,
  multitask_head_lr: 1.0e-2}
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    """`my_families.py` on sys.path and `<dir>/model/chars.yaml` in a config dir of its own."""
    (tmp_path / "my_families.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_families", raising=False)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "chars.yaml").write_text(MODEL_YAML)
    return tmp_path


def test_every_model_config_names_an_importable_family_of_its_source():
    bases = {"zoo": "ZooFamily", "configured": "PaperFamily"}
    for name in group_options("model"):
        cfg = load_group("model", name)
        assert cfg["source"] in SOURCES, name
        assert bases[cfg["source"]] in [c.__name__ for c in family_class(cfg).__mro__], name


def test_own_family_from_a_config_dir_merges_and_stores_a_row(plugin, capsys):
    """`mergebench --config-dir DIR model=chars ...`: zoo built, merged, scored, stored."""
    from mergebench.bench.job import run

    db = plugin / "results.sqlite"
    cfg = compose_config(
        [
            f"hydra.searchpath=[file://{plugin / 'conf'}]",
            "model=chars",
            "taskset.family=chars",
            "taskset.tasks=[rt_sentiment,bbc_news]",
            "taskset.examples.train=24",
            "taskset.examples.validation=8",
            "taskset.examples.test=16",
            "method=task_arithmetic",
            "protocol.select=false",
            f"zoo.dir={plugin / 'zoo'}",
            f"store.path={db}",
            "progress=false",
        ]
    )
    summary = run(cfg)
    assert [s["task"] for s in summary["scores"]] == ["rt_sentiment", "bbc_news"]
    assert all(0.0 <= s["value"] <= 1.0 for s in summary["scores"])
    assert (plugin / "zoo" / "chars" / "bbc_news.safetensors").exists()
    assert db.exists() and "task_arithmetic" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"_target_": None}, r"^model\._target_: missing"),
        ({"_target_": "no_such_module.Family"}, r"^model\._target_: cannot import 'no_such_mod"),
        (
            {"_target_": "mergebench.families.minilm.NoSuch"},
            r"^model\._target_: module .* no 'NoSuch'",
        ),
        ({"_target_": "collections.OrderedDict"}, r"^model\._target_: .* is not a model family"),
        ({"_target_": "MiniLMFamily"}, r"^model\._target_: 'MiniLMFamily' is not a module\.Class"),
        ({"source": "hub"}, r"^model\.source: 'hub' \(choose from zoo, configured\)"),
        ({"source": None}, r"^model\.source: missing"),
        ({"source": "configured"}, r"^model\._target_: .*MiniLMFamily' is not a PaperFamily"),
    ],
)
def test_bad_family_target_or_source_is_one_line(model, message):
    with pytest.raises(MergeBenchError, match=message) as err:
        load_family({**TEXT_MODEL, **model}, TEXT_SET)
    assert "\n" not in str(err.value)


def test_configured_model_as_zoo_source_names_the_class():
    cfg = {**load_group("model", "gpt2"), "source": "zoo"}
    with pytest.raises(
        MergeBenchError, match=r"^model\._target_: .*GPT2Family' is not a ZooFamily"
    ):
        open_source({"model": cfg, "taskset": load_group("taskset", "glue7"), "seed": 0})


def test_taskset_family_is_the_family_kind_everywhere():
    """`taskset.family` names `Family.kind` for zoo and configured families alike, or the
    form of its inputs (`text`, `image`: the task set of one's own files)."""
    classes = [family_class(load_group("model", m)) for m in group_options("model")]
    kinds = {c.kind for c in classes} | {c.modality for c in classes}
    for name in group_options("taskset"):
        assert load_group("taskset", name)["family"] in kinds, name
    with pytest.raises(MergeBenchError, match=r"^taskset\.family: task set 'tiny_text' is for"):
        load_family({**TEXT_MODEL, **MINILM}, {**TEXT_SET, "family": "minilm_l12"})


def test_target_and_source_do_not_change_a_stored_runs_hash():
    """Runs stored before model configs named their class and source still resume."""
    cfg = compose_config(["model=minilm", "taskset=text", "method=ties"])
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    before = {**plain, "model": {k: v for k, v in plain["model"].items() if k not in MINILM}}
    assert "_target_" in plain["model"] and "_target_" not in before["model"]
    keys = VOLATILE_KEYS
    assert config_hash(plain, label="ties", volatile=keys) == config_hash(
        before, label="ties", volatile=keys
    )
    renamed = {**plain, "model": {**plain["model"], "name": "x"}}
    assert config_hash(plain, volatile=keys) != config_hash(renamed, volatile=keys)


def test_zoo_cli_picks_the_zoo_model_of_a_task_sets_family_kind():
    from mergebench.cli.zoo import zoo_model

    assert zoo_model(load_group("taskset", "text")) == "minilm"
    assert zoo_model(load_group("taskset", "vision")) == "efficientnet_lite0"
    with pytest.raises(
        MergeBenchError, match=r"^taskset\.family: no zoo model serves family 'glue'"
    ):
        zoo_model(load_group("taskset", "glue8"))
