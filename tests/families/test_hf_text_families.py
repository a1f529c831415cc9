"""The GLUE families (RoBERTa-base, GPT-2) on tiny models and a tiny GLUE clone made here in
the hub's formats, through the code that loads roberta-base, gpt2, tanganke/gpt2_* and
nyu-mll/glue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_hf
import torch
from hydra import compose, initialize_config_dir
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import matthews_corrcoef

from mergebench.data.hf import split_rows
from mergebench.data.metrics import PearsonSpearman, build_task_metric
from mergebench.engine.keyplan import plan_keys
from mergebench.evaluation import evaluate
from mergebench.methods.registry import build_method
from mergebench.sources import configured_pool, load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

GLUE = {
    "cola": (["sentence"], 2),
    "mrpc": (["sentence1", "sentence2"], 2),
    "rte": (["sentence1", "sentence2"], 2),
    "stsb": (["sentence1", "sentence2"], None),  # regression
}
SETTINGS = {
    "gpt2": ("glue7", ("cola", "mrpc")),
    "roberta_base": ("glue8", ("rte", "stsb")),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A bare GPT2Model and a RobertaForMaskedLM (as the hub's gpt2 and roberta-base), two
    fine-tuned classifiers each, and a clone-like GLUE folder with four tasks."""
    root = tmp_path_factory.mktemp("glue")
    gpt2 = tiny_hf.make_gpt2(root / "gpt2")
    roberta = tiny_hf.make_roberta(root / "roberta_base")
    for seed, task in enumerate(SETTINGS["gpt2"][1]):
        tiny_hf.make_text_finetuned("gpt2", gpt2, root / f"gpt2_{task}", 2, seed + 1)
    for seed, task in enumerate(SETTINGS["roberta_base"][1]):
        labels = GLUE[task][1] or 1
        tiny_hf.make_text_finetuned(
            "roberta", roberta, root / f"roberta_base_{task}", labels, seed + 3
        )
    tiny_hf.make_glue_clone(root / "glue", GLUE)
    return root


def text_config(root: Path, model: str, *extra: str):
    taskset, tasks = SETTINGS[model]
    overrides = [
        f"model={model}",
        f"taskset={taskset}",
        f"taskset.tasks=[{','.join(tasks)}]",
        f"model.checkpoints.pretrained={root / model}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=4",
        *(f"model.checkpoints.finetuned.{t}={root / f'{model}_{t}'}" for t in tasks),
        *(f"taskset.data.{t}.data_dir={root / 'glue'}" for t in tasks),
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def test_configs_name_the_paper_checkpoints_and_data():
    with initialize_config_dir(str(conf_dir()), version_base=None):
        gpt2 = compose("config", overrides=["model=gpt2", "taskset=glue7"])
        roberta = compose("config", overrides=["model=roberta_base", "taskset=glue8"])
    assert gpt2.model.checkpoints.pretrained == "gpt2"
    assert dict(gpt2.model.checkpoints.finetuned) == {
        t: f"tanganke/gpt2_{t}" for t in gpt2.taskset.tasks
    }
    assert list(gpt2.taskset.tasks) == ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte"]
    assert list(roberta.taskset.tasks) == [
        "cola",
        "sst2",
        "mrpc",
        "stsb",
        "qqp",
        "mnli",
        "qnli",
        "rte",
    ]
    metrics = {
        t: roberta.taskset.data[t].get("metric") or "accuracy" for t in roberta.taskset.tasks
    }
    assert metrics["cola"] == "mcc" and metrics["stsb"] == "pearson_spearman"
    assert {metrics[t] for t in metrics if t not in ("cola", "stsb")} == {"accuracy"}
    assert roberta.taskset.data.mnli.splits.test == "validation_matched"


@pytest.mark.parametrize("model", list(SETTINGS))
def test_logits_match_transformers_own_classifier(world, model):
    import transformers

    cfg = text_config(world, model)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    task = SETTINGS[model][1][1]  # a sentence-pair task
    ours = data.family.build_model(task).eval()
    ours.load_state_dict(pool.finetuned[task].state_dict(), strict=True)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(
        world / f"{model}_{task}"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = data.family.tasks[task].inputs["test"][:5]
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    batch = data.family.encode(pairs)
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # padded
    with torch.no_grad():
        expected = torch.cat(
            [reference(**tokenizer(a, b, return_tensors="pt")).logits for a, b in pairs]
        )
        torch.testing.assert_close(data.family.logits(ours, batch), expected, rtol=1e-4, atol=1e-4)


def test_pools_map_hub_key_names(world):
    cfg = text_config(world, "gpt2")
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    from safetensors import safe_open

    with safe_open(str(world / "gpt2" / "model.safetensors"), "pt") as f:
        assert "wte.weight" in set(f.keys())  # the hub's gpt2 is a bare GPT2Model
    assert "transformer.wte.weight" in pool.pretrained and "wte.weight" not in pool.pretrained
    plan = plan_keys(pool)
    assert all(k.startswith("transformer.") for k in plan.merged)
    assert {t: sorted(k) for t, k in plan.task_specific.items()} == {
        "cola": ["score.weight"], "mrpc": ["score.weight"]
    }  # fmt: skip
    cfg = text_config(world, "roberta_base")
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert not any(
        k.startswith("lm_head") for k in pool.pretrained.keys()
    )  # MaskedLM head left out
    assert pool.finetuned["stsb"].shape("classifier.out_proj.weight")[0] == 1  # regression head


def test_metrics_match_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    preds, target = rng.normal(size=40), rng.normal(size=40)
    metric = PearsonSpearman()
    metric.update(torch.tensor(preds[:25]).unsqueeze(1), torch.tensor(target[:25]))
    metric.update(torch.tensor(preds[25:]).unsqueeze(1), torch.tensor(target[25:]))
    expected = (pearsonr(preds, target)[0] + spearmanr(preds, target)[0]) / 2
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-5)
    logits, labels = torch.tensor(rng.normal(size=(30, 2))), torch.tensor(rng.integers(0, 2, 30))
    mcc = build_task_metric("mcc", 2)
    mcc.update(logits, labels)
    assert float(mcc.compute()) == pytest.approx(
        matthews_corrcoef(labels, logits.argmax(1)), abs=1e-5
    )


@pytest.mark.parametrize("model", list(SETTINGS))
def test_merge_and_evaluate_end_to_end(world, model):
    """model=gpt2 taskset=glue7 (and roberta_base glue8) on local copies: EMR and Fisher
    merge, every task is scored with its metric; the individual row equals scores computed
    here from transformers' own classifiers."""
    import transformers

    cfg = text_config(world, model)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    tasks = SETTINGS[model][1]
    for method, params in (("emr", {}), ("fisher", {"num_examples": 4, "batch_size": 4})):
        scores = evaluate(build_method(method, **params).merge(pool), data)
        assert [s.task for s in scores] == list(tasks)
        assert all(np.isfinite(s.value) for s in scores)

    class Individual:
        def state_dict(self, task):
            return pool.finetuned[task].state_dict()

    ours = {s.task: (s.metric, s.value) for s in evaluate(Individual(), data)}
    for task in tasks:
        reference = transformers.AutoModelForSequenceClassification.from_pretrained(
            world / f"{model}_{task}"
        ).eval()
        logits, labels = [], []
        for batch, y in data.batches(task, "test", batch_size=5):
            with torch.no_grad():
                logits.append(reference(**batch).logits)
            labels.append(y)
        logits, labels = torch.cat(logits), torch.cat(labels)
        assert len(labels) == 12  # the whole GLUE validation split of the clone
        metric, value = ours[task]
        if task == "stsb":
            assert metric == "pearson_spearman" and labels.dtype == torch.float32
            x = logits[:, 0].numpy()
            expected = (pearsonr(x, labels)[0] + spearmanr(x, labels)[0]) / 2
        elif task == "cola":
            assert metric == "mcc"
            expected = matthews_corrcoef(labels, logits.argmax(1))
        else:
            assert metric == "accuracy"
            expected = float((logits.argmax(1) == labels).float().mean())
        assert value == pytest.approx(expected, abs=1e-5)


def test_gpt2_regmean_handles_conv1d(world):
    cfg = text_config(world, "gpt2")
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    result = build_method("regmean", num_examples=6, batch_size=3).merge(pool)
    key = "transformer.h.0.attn.c_attn.weight"
    merged = result.state_dict("cola")[key]
    mean = (pool.finetuned["cola"].get(key) + pool.finetuned["mrpc"].get(key)) / 2
    assert merged.shape == mean.shape and not torch.allclose(merged, mean)  # not plain averaging


def test_glue_splits_and_hidden_test_labels(world):
    cfg = text_config(world, "gpt2")
    family, data = load_family(cfg.model, cfg.taskset)
    assert data.num_examples("cola", "train") == 20 and data.num_examples("cola", "validation") == 4
    assert data.num_examples("cola", "test") == 12
    spec = data.spec("cola")
    train_source, train_rows = split_rows(spec, "train", 0, data._examples)
    val_source, val_rows = split_rows(spec, "validation", 0, data._examples)
    assert train_source == val_source == "train"  # carved out of GLUE's train split
    assert not set(train_rows) & set(val_rows) and len(set(train_rows) | set(val_rows)) == 24
    assert split_rows(spec, "test", 0, data._examples)[0] == "validation"
    val_texts = family.tasks["cola"].inputs["validation"][:]
    assert len(val_texts) == 4 and all(isinstance(t, str) for t in val_texts)
    batch = next(family.unlabeled_inputs("mrpc", "test", 3, 3))
    assert set(batch) == {"input_ids", "attention_mask"}
    # GLUE's own test split hides its labels (-1): evaluating on it is refused.
    hidden = text_config(world, "gpt2", "taskset.data.cola.splits.test=test")
    _, data = load_family(hidden.model, hidden.taskset)
    with pytest.raises(MergeBenchError, match=r"taskset\.data\.cola\.splits\.test: .*no labels"):
        data.labels("cola", "test")


def test_roberta_without_configured_checkpoints_says_which(world):
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=roberta_base",
                "taskset=glue8",
                "taskset.tasks=[rte]",
                f"model.checkpoints.pretrained={world / 'roberta_base'}",
                f"taskset.data.rte.data_dir={world / 'glue'}",
                f"taskset.cache_dir={world / 'datasets_cache'}",
            ],
        )
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError) as err:
        configured_pool(family, cfg.model, cfg.taskset)
    assert str(err.value).startswith("model.checkpoints.finetuned.rte: no fine-tuned checkpoint")
    # A RoBERTa checkpoint is not a GPT-2: the first missing key is named.
    wrong = text_config(
        world, "gpt2", f"model.checkpoints.finetuned.cola={world / 'roberta_base_rte'}"
    )
    family, _ = load_family(wrong.model, wrong.taskset)
    with pytest.raises(MergeBenchError, match=r"finetuned\.cola: .* lacks key 'transformer\."):
        configured_pool(family, wrong.model, wrong.taskset)


def test_bench_run_glue7_ties_on_local_copies(world, monkeypatch):
    """What `mergebench model=gpt2 taskset=glue7 method=ties` runs, in process."""
    from mergebench.bench import job as bench

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world / "bench_cache"))
    cfg = text_config(
        world, "gpt2", "method=ties", f"store.path={world / 'results.sqlite'}", "progress=false"
    )
    summary = bench.run(cfg)
    assert [(s["task"], s["metric"]) for s in summary["scores"]] == [
        ("cola", "mcc"), ("mrpc", "accuracy")
    ]  # fmt: skip


def test_gpt2_hub_ids_resolve_through_the_hub_cache(world, monkeypatch, tmp_path):
    """`gpt2` and `tanganke/gpt2_<task>` (the config's ids) through a populated hub cache."""
    import shutil

    from huggingface_hub import constants

    repos = {
        "gpt2": world / "gpt2",
        **{f"tanganke/gpt2_{t}": world / f"gpt2_{t}" for t in ("cola", "mrpc")},
    }
    for repo, folder in repos.items():
        entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / "4567ef")
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("4567ef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=gpt2",
                "taskset=glue7",
                "taskset.tasks=[cola,mrpc]",
                f"taskset.cache_dir={world / 'datasets_cache'}",
                *(f"taskset.data.{t}.data_dir={world / 'glue'}" for t in ("cola", "mrpc")),
            ],
        )
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert str(pool.pretrained.source.files()[0]).startswith(str(tmp_path / "hub" / "models--gpt2"))
    assert [s.metric for s in evaluate(build_method("emr").merge(pool), data)] == [
        "mcc",
        "accuracy",
    ]
