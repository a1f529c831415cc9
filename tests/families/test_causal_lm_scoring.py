"""`model=causal_lm` with `taskset=lm_eval`: tiny random Llama / Gemma 2 / Qwen2 experts
merged and scored in process by lm-evaluation-harness on two local tasks (multiple_choice,
generate_until), and the in-process score held to lm-eval's own command line on the
exported folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llm import GEN_TASK, MC_TASK, llm_pool, lm_eval_tasks

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[llm]')")

from mergebench import merge  # noqa: E402
from mergebench.evaluation import evaluate_timed  # noqa: E402
from mergebench.families.causal_lm import CausalLMFamily  # noqa: E402
from mergebench.results.export import export_result  # noqa: E402
from mergebench.util.errors import MergeBenchError  # noqa: E402

TASKS = [MC_TASK, GEN_TASK]
EXPERT_TASKS = {"a": MC_TASK, "b": GEN_TASK}
BATCH = 4
LM_EVAL = Path(sys.executable).parent / "lm_eval"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, experts = llm_pool(root / "pool", "llama")
    return base, experts, lm_eval_tasks(root / "tasks")


def lm_eval_data(base: Path, experts: dict[str, Path], include: Path, **taskset):
    cfg_model = {"name": "causal_lm", "checkpoints": {"pretrained": str(base),
                 "finetuned": {e: str(p) for e, p in experts.items()}}}  # fmt: skip
    cfg_taskset = {"name": "lm_eval", "family": "causal_lm", "tasks": TASKS,
                   "include_path": str(include), "expert_tasks": EXPERT_TASKS,
                   "lm_eval": {"batch_size": BATCH}, **taskset}  # fmt: skip
    family, data = CausalLMFamily.from_config(cfg_model, cfg_taskset, 0, base)
    family.pool_sources(experts)
    return data


def lm_eval_cli(folder: Path, include: Path, out: Path) -> dict[str, float]:
    """`lm_eval --model hf --model_args pretrained=OUT ...` in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(
        [str(LM_EVAL), "--model", "hf", "--model_args", f"pretrained={folder}",
         "--tasks", ",".join(TASKS), "--include_path", str(include), "--device", "cpu",
         "--batch_size", str(BATCH), "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return {MC_TASK: results[MC_TASK]["acc,none"], GEN_TASK: results[GEN_TASK]["exact_match,none"]}


@pytest.mark.slow  # lm-eval's command line indexes its thousands of tasks: 1-3 min wall
@pytest.mark.skipif(not LM_EVAL.exists(), reason="lm_eval's console script is not installed")
@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_in_process_score_equals_lm_eval_cli_on_export(llama, tmp_path, method):
    base, experts, include = llama
    result = merge(method, base, experts, progress=False, output_dir=tmp_path / "result")
    ev = evaluate_timed(result, lm_eval_data(base, experts, include))
    ours = {s.task: s.value for s in ev.scores}
    assert {s.task: s.metric for s in ev.scores} == {MC_TASK: "acc", GEN_TASK: "exact_match"}
    if method == "emr":  # one model per expert: each task scored on its expert's export
        cli = {}
        for expert, task in EXPERT_TASKS.items():
            folder = export_result(tmp_path / "result", tmp_path / f"hf_{expert}", task=expert)[0]
            cli[task] = lm_eval_cli(folder, include, tmp_path / f"cli_{expert}")[task]
    else:
        folder = export_result(tmp_path / "result", tmp_path / "hf")[0]
        cli = lm_eval_cli(folder, include, tmp_path / "cli")
    assert ours == cli  # exactly, per task
    for task in TASKS:  # every sample logged: its mean is the score
        outcome = ev.outcomes[task]
        assert len(outcome.pred) == 12
        assert outcome.pred.mean() == pytest.approx(ours[task], abs=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_each_architecture_merges_and_scores(tmp_path, arch):
    base, experts = llm_pool(tmp_path / "pool", arch)
    include = lm_eval_tasks(tmp_path / "tasks", examples=8)
    data = lm_eval_data(base, experts, include)
    result = merge("ties", base, experts, progress=False)
    ev = evaluate_timed(result, data)
    assert [s.task for s in ev.scores] == TASKS
    for score in ev.scores:
        assert 0.0 <= score.value <= 1.0
        samples = ev.outcomes[score.task].pred
        assert len(samples) == 8 and set(np.unique(samples)) <= {0.0, 1.0}
        assert samples.mean() == pytest.approx(score.value)


def test_reference_rows(llama):
    """The base and each expert on every task; `individual`: each expert on its own task."""
    base, experts, include = llama
    data = lm_eval_data(base, experts, include)
    assert data.reference_kinds() == ("individual", "pretrained", "expert:a", "expert:b")
    rows = {kind: evaluate_timed(data.reference(kind), data) for kind in data.reference_kinds()}
    values = {kind: {s.task: s.value for s in ev.scores} for kind, ev in rows.items()}
    assert values["individual"] == {MC_TASK: values["expert:a"][MC_TASK],
                                    GEN_TASK: values["expert:b"][GEN_TASK]}  # fmt: skip
    for ev in rows.values():
        assert [len(ev.outcomes[t].pred) for t in TASKS] == [12, 12]


def test_task_conditioned_result_switches_in_place(llama):
    """EMR: each task scored with its own expert's weights, switched into one model."""
    base, experts, include = llama
    data = lm_eval_data(base, experts, include)
    result = merge("emr", base, experts, progress=False)
    evaluate_timed(result, data)
    model = data._merged_model(result, GEN_TASK)[0]
    assert len(data._merged) == 1  # one model for both tasks
    state = result.state_dict("b")
    for key, value in model.state_dict().items():
        assert value.equal(state[key].to(value.dtype)), key


@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_tied_embeddings_load_and_switch(tmp_path, method):
    """A tied base (Gemma's way): the result stores the embedding once, the model's output
    matrix is that embedding, loaded or switched in place."""
    base, experts = llm_pool(tmp_path / "pool", "llama", tie=True)
    include = lm_eval_tasks(tmp_path / "tasks", examples=8)
    data = lm_eval_data(base, experts, include, tasks=[MC_TASK], expert_tasks={"a": MC_TASK})
    result = merge(method, base, experts, progress=False)
    (score,) = evaluate_timed(result, data).scores
    model = data._merged_model(result, MC_TASK)[0]
    state = result.state_dict("a")
    assert "lm_head.weight" not in state
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.equal(state["model.embed_tokens.weight"].to(torch.bfloat16))
    assert 0.0 <= score.value <= 1.0


# -- bad input: one line naming the option ------------------------------------------------------
@pytest.mark.slow  # telling a task unknown indexes lm-eval's thousands of tasks (~1 min wall)
def test_unknown_task_is_one_line_naming_the_option(llama):
    base, experts, include = llama
    with pytest.raises(MergeBenchError, match=r"^taskset\.tasks: 'no_such_task' is not an lm-eval task") as err:  # fmt: skip
        lm_eval_data(base, experts, include, tasks=[MC_TASK, "no_such_task"])
    assert "\n" not in str(err.value)


def test_missing_include_path_is_one_line_naming_the_option(llama, tmp_path):
    base, experts, _ = llama
    with pytest.raises(
        MergeBenchError, match=r"^taskset\.include_path: .*missing: no such folder$"
    ):
        lm_eval_data(base, experts, tmp_path / "missing")


def test_expert_tasks_naming_an_unknown_expert_or_task(llama):
    base, experts, include = llama
    with pytest.raises(MergeBenchError, match=r"^taskset\.expert_tasks\.c: no expert 'c'"):
        lm_eval_data(base, experts, include, expert_tasks={"c": MC_TASK})
    with pytest.raises(MergeBenchError, match=r"^taskset\.expert_tasks\.a: task 'x' is not in"):
        lm_eval_data(base, experts, include, expert_tasks={"a": "x"})


def test_unknown_lm_eval_option(llama):
    base, experts, include = llama
    with pytest.raises(MergeBenchError, match=r"^eval\.lm_eval\.temperature: unknown option"):
        lm_eval_data(base, experts, include, lm_eval={"temperature": 0})


def test_validation_split_is_refused_naming_the_option(llama):
    base, experts, include = llama
    data = lm_eval_data(base, experts, include)
    with pytest.raises(MergeBenchError, match=r"^eval\.split: 'validation'"):
        evaluate_timed(data.reference("pretrained"), data, split="validation")
