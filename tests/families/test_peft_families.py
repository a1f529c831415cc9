"""PEFT adapter families on a tiny T5 with (IA)3 and LoRA adapters saved by peft, and T0-style
data sets saved with save_to_disk: task vectors of adapters, merging through the benchmark
job, rank classification, and merged adapters loaded back into peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_peft
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from mergebench.engine.adapters import lora_scale
from mergebench.evaluation import evaluate
from mergebench.families.peft_adapters import AdapterModel
from mergebench.methods.registry import build_method
from mergebench.sources import load_pool
from mergebench.util.config import conf_dir

TASKS = ("rte", "cb", "winogrande")
IA3 = dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t0")
    base = tiny_peft.make_t5(root / "t5")
    for seed, task in enumerate(TASKS):
        tiny_peft.make_adapter(base, root / f"ia3_{task}", "ia3", seed + 1, **IA3)
        tiny_peft.make_adapter(base, root / f"lora_{task}", "lora", seed + 1, r=2, lora_alpha=4)
    tiny_peft.make_t0_data(root / "data", list(TASKS))
    return root


def t0_config(root: Path, model: str, *extra: str, tasks=TASKS, adapters: str | None = None):
    adapters = adapters or ("ia3" if model == "t0_3b_ia3" else "lora")
    overrides = [
        f"model={model}",
        "taskset=t0_11",
        f"taskset.tasks=[{','.join(tasks)}]",
        f"model.checkpoints.pretrained={root / 't5'}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=4",
        *(f"model.checkpoints.finetuned.{t}={root / f'{adapters}_{t}'}" for t in tasks),
        *(f"taskset.data.{t}.data_dir={root / 'data' / t}" for t in tasks),
        *(f"taskset.data.{t}.path=null" for t in tasks),
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def test_t0_11_names_the_eleven_tasks_and_matches_published():
    from mergebench.report.published import find_setting

    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=["model=t0_3b_ia3", "taskset=t0_11"])
    assert len(cfg.taskset.tasks) == 11 and cfg.model.checkpoints.pretrained == "bigscience/T0_3B"
    assert set(cfg.model.checkpoints.finetuned) == set(cfg.taskset.tasks)
    assert all("prompt" in cfg.taskset.data[t] for t in cfg.taskset.tasks)
    setting = find_setting("t0_3b_ia3", "t0_11", 11)
    assert setting is not None and setting.key == "t0-ia3-11"


def test_ia3_task_vector_is_l_minus_one(world, tmp_path):
    """Hand-made adapters with l = 1.5 and l = 0.75: tau = 0.5 and -0.25, and task
    arithmetic with scaling 1 gives 1 + 0.5 - 0.25."""
    for task, value in (("rte", 1.5), ("cb", 0.75)):
        folder = tmp_path / f"ia3_{task}"
        shutil.copytree(world / f"ia3_{task}", folder)
        state = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k: torch.full_like(v, value) for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"))  # fmt: skip
    own = [f"model.checkpoints.finetuned.{t}={tmp_path / f'ia3_{t}'}" for t in ("rte", "cb")]
    cfg = t0_config(world, "t0_3b_ia3", *own, tasks=("rte", "cb"))
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    keys = pool.pretrained.keys()
    assert keys and all(k.endswith(".ia3_l") and k.startswith("base_model.model.") for k in keys)
    key = keys[0]
    assert torch.equal(pool.pretrained.get(key), torch.ones(pool.pretrained.shape(key)))
    tau = pool.finetuned["rte"].get(key) - pool.pretrained.get(key)
    assert torch.equal(tau, torch.full_like(tau, 0.5))
    merged = build_method("task_arithmetic", scaling=1.0).merge(pool).state_dict("rte")
    assert set(merged) == set(keys)
    for k in keys:
        assert torch.allclose(merged[k], torch.full_like(merged[k], 1.25))
    # The merged vectors are what the model runs with: ones everywhere in the base's (IA)3.
    model = data.family.build_model("rte")
    model.load_state_dict(merged, strict=True)
    base = model.install()
    layer = base.base_model.model.encoder.block[0].layer[0].SelfAttention.k
    assert torch.allclose(layer.ia3_l["default"], torch.full_like(layer.ia3_l["default"], 1.25))


def test_lora_delta_is_b_a_times_scale(world):
    cfg = t0_config(world, "t5_lora")
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    assert key in pool.pretrained.keys() and len(pool.pretrained.keys()) == 2 * 2 * 3  # q, v
    base = load_file(str(world / "t5" / "model.safetensors"))
    adapter = load_file(str(world / "lora_cb" / "adapter_model.safetensors"))
    prefix = "base_model.model.encoder.block.1.layer.0.SelfAttention.q"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    expected = b @ a * (4 / 2)
    assert torch.equal(pool.pretrained.get(key), base[key])
    torch.testing.assert_close(pool.finetuned["cb"].get(key) - base[key], expected)
    assert lora_scale({"lora_alpha": 4, "use_rslora": True}, "q", 4) == pytest.approx(2.0)
    assert lora_scale({"lora_alpha": 4, "alpha_pattern": {"q": 8}}, "x.q", 2) == 4.0


@pytest.mark.parametrize("model", ["t0_3b_ia3", "t5_lora"])
def test_individual_scores_match_peft_model(world, model):
    """The family's rank classification with a task's own adapter equals the same scoring
    computed here on peft's own `PeftModel.from_pretrained`; accuracy is in [0, 1]."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    cfg = t0_config(world, model)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    family = data.family
    task = "cb"
    ours = family.build_model(task)
    ours.load_state_dict(pool.finetuned[task].state_dict(), strict=True)
    prefix = "ia3" if model == "t0_3b_ia3" else "lora"
    reference = PeftModel.from_pretrained(
        T5ForConditionalGeneration.from_pretrained(world / "t5"), world / f"{prefix}_{task}"
    ).eval()
    batch, labels = next(data.batches(task, "test", batch_size=6))
    assert batch["choice_ids"].shape[:2] == (6, 3)
    with torch.no_grad():
        got = family.logits(ours, batch)
        expected = family.logits(reference, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got <= 0).all()  # summed log-probabilities
    scores = evaluate(build_method("task_arithmetic", scaling=1.0).merge(pool), data)
    assert [s.task for s in scores] == list(TASKS)
    assert all(0.0 <= s.value <= 1.0 and s.metric == "accuracy" for s in scores)


def test_rank_classification_by_hand(world):
    """Each choice's score is the summed log-probability of its tokens (EOS included)."""
    cfg = t0_config(world, "t0_3b_ia3")
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    family = data.family
    model = family.build_model("winogrande")
    model.load_state_dict(pool.finetuned["winogrande"].state_dict())
    row = family.tasks["winogrande"].inputs["test"][0]
    prompt, choices = row
    assert choices == ("cat", "dog") and "_" in prompt
    tok = family.tokenizer
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        scores = family.logits(model, family.encode([row]))[0]
        for i, choice in enumerate(choices):
            target = tok(choice, return_tensors="pt")["input_ids"]
            assert target[0, -1] == tok.eos_token_id
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        labels=target)  # fmt: skip
            assert float(scores[i]) == pytest.approx(-float(out.loss) * target.shape[1], abs=1e-4)
    labels = data.labels("winogrande", "test")
    assert set(labels.tolist()) <= {0, 1}  # answers "1"/"2", label_offset 1


@pytest.mark.parametrize(
    ("model", "method"),
    [("t0_3b_ia3", "task_arithmetic"), ("t0_3b_ia3", "ties"), ("t0_3b_ia3", "emr"),
     ("t0_3b_ia3", "fisher"), ("t5_lora", "ties"), ("t5_lora", "emr")],
)  # fmt: skip
def test_bench_run_end_to_end(world, monkeypatch, model, method):
    """What `mergebench model=t0_3b_ia3 taskset=t0_11 method=...` runs, in process."""
    from mergebench.bench import job as bench

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world / "bench_cache"))
    cfg = t0_config(
        world, model, f"method={method}", f"store.path={world / f'{model}.sqlite'}",
        "progress=false",
        *(["method.num_examples=4", "method.batch_size=2"] if method == "fisher" else []),
    )  # fmt: skip
    summary = bench.run(cfg)
    scores = summary["scores"]
    assert [s["task"] for s in scores] == list(TASKS)
    assert all(s["metric"] == "accuracy" and 0.0 <= s["value"] <= 1.0 for s in scores)


def test_merged_ia3_adapter_round_trips_into_peft(world, tmp_path):
    """A TIES-merged (IA)3 adapter saved under the adapter file's key names loads into
    peft's `PeftModel` and scores as our model does."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    cfg = t0_config(world, "t0_3b_ia3")
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    merged = build_method("ties").merge(pool).state_dict("rte")
    folder = tmp_path / "merged"
    folder.mkdir()
    shutil.copy(world / "ia3_rte" / "adapter_config.json", folder / "adapter_config.json")
    save_file(
        {k: v.contiguous() for k, v in merged.items()}, str(folder / "adapter_model.safetensors")
    )
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "IA3"
    peft_model = PeftModel.from_pretrained(
        T5ForConditionalGeneration.from_pretrained(world / "t5"), folder
    ).eval()
    loaded = {
        k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "ia3_l" in k
    }
    assert set(loaded) == set(merged)
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)
    ours = data.family.build_model("rte")
    ours.load_state_dict(merged, strict=True)
    assert isinstance(ours, AdapterModel) and set(ours.state_dict()) == set(merged)
    batch, _ = next(data.batches("rte", "test", batch_size=4))
    with torch.no_grad():
        torch.testing.assert_close(
            data.family.logits(ours, batch), data.family.logits(peft_model, batch)
        )
