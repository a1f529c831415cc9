"""MergeBench's setting as configs: the four bases (base and instruct) with their five
experts (`model=mergebench_*`), and `taskset=mergebench5`. No download: the configs are
composed and checked, and the family runs on tiny local stand-ins with the same layout
(five experts under MergeBench's names, one base)."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_llm import GEN_TASK, MC_TASK, llm_pool, lm_eval_tasks

from mergebench.families.causal_lm import expert_tasks
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

EXPERTS = ("instruction", "math", "coding", "multilingual", "safety")
BASES = {  # config -> (hub id of the base, MergeBench's name of it in its experts' ids)
    "mergebench_llama32_3b": ("meta-llama/Llama-3.2-3B", "Llama-3.2-3B"),
    "mergebench_llama32_3b_it": ("meta-llama/Llama-3.2-3B-Instruct", "Llama-3.2-3B-Instruct"),
    "mergebench_llama31_8b": ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    "mergebench_llama31_8b_it": ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
    "mergebench_gemma2_2b": ("google/gemma-2-2b", "gemma-2-2b"),
    "mergebench_gemma2_2b_it": ("google/gemma-2-2b-it", "gemma-2-2b-it"),
    "mergebench_gemma2_9b": ("google/gemma-2-9b", "gemma-2-9b"),
    "mergebench_gemma2_9b_it": ("google/gemma-2-9b-it", "gemma-2-9b-it"),
}
LANGS = ("fr", "es", "de", "ru")
MULTILINGUAL = [f"{k}_{lang}" for k in ("m_mmlu", "arc", "hellaswag") for lang in LANGS]
CODE = ["humaneval_plus", "mbpp_plus"]
TASKS = ["ifeval", "gsm8k_cot", *CODE, *MULTILINGUAL, "toxigen"]


def composed(*overrides: str) -> dict:
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", sorted(BASES))
def test_each_base_composes_with_its_five_experts(name):
    cfg = composed(f"model={name}", "taskset=mergebench5")
    hub, short = BASES[name]
    model = cfg["model"]
    assert model["name"] == name
    assert model["_target_"] == "mergebench.families.causal_lm.CausalLMFamily"
    assert model["checkpoints"]["pretrained"] == hub
    assert model["checkpoints"]["finetuned"] == {e: f"MergeBench/{short}_{e}" for e in EXPERTS}
    generic = composed("model=causal_lm")["model"]  # the same family settings as model=causal_lm
    for key in ("_target_", "source", "exclude", "vocab", "out_dtype", "layer_pattern"):
        assert model[key] == generic[key], key
    assert model["options"] == {**generic["options"], "device": "cuda"}
    assert cfg["taskset"]["family"] == "causal_lm"


def test_mergebench5_tasks_and_expert_mapping():
    taskset = composed("model=mergebench_llama32_3b", "taskset=mergebench5")["taskset"]
    assert taskset["name"] == "mergebench5" and taskset["tasks"] == TASKS
    assert taskset["lm_eval"]["confirm_run_unsafe_code"] is False  # code execution: off
    mapping = expert_tasks(list(EXPERTS), taskset["tasks"], taskset["expert_tasks"])
    assert mapping == {"ifeval": "instruction", "gsm8k_cot": "math",
                       **dict.fromkeys(CODE, "coding"), **dict.fromkeys(MULTILINGUAL, "multilingual"),
                       "toxigen": "safety"}  # fmt: skip


def test_mergebench5_without_code_tasks_by_override():
    """What the task set's comment tells: drop the code tasks and the coding expert's row."""
    taskset = composed("model=mergebench_gemma2_2b", "taskset=mergebench5",
                       f"taskset.tasks=[{','.join(t for t in TASKS if t not in CODE)}]",
                       "taskset.expert_tasks.coding=[]")["taskset"]  # fmt: skip
    mapping = expert_tasks(list(EXPERTS), taskset["tasks"], taskset["expert_tasks"])
    assert set(mapping) == set(TASKS) - set(CODE) and "coding" not in mapping.values()


@pytest.mark.slow  # indexes lm-eval's thousands of task files (~1 min wall)
def test_mergebench5_tasks_are_lm_eval_tasks_and_only_code_runs_code():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[llm]')")
    from mergebench.data.lm_eval import check_unsafe_code, task_manager

    manager = task_manager(None, TASKS)
    with pytest.raises(MergeBenchError) as err:
        check_unsafe_code(manager, TASKS, {})
    assert str(err.value).startswith("taskset.tasks: humaneval_plus, mbpp_plus execute")
    check_unsafe_code(manager, [t for t in TASKS if t not in CODE], {})


# -- the family on tiny stand-ins with MergeBench's layout ---------------------------------------
CODE_TASK = "tiny_code"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny Llama base with five experts under MergeBench's names, and local lm-eval tasks:
    a multiple-choice one, a generation one, and a generation one marked `unsafe_code` (as
    lm-eval marks humaneval_plus and mbpp_plus)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[llm]')")
    root = tmp_path_factory.mktemp("mergebench")
    base, experts = llm_pool(root / "pool", "llama", tasks=EXPERTS)
    include = lm_eval_tasks(root / "tasks", examples=6)
    gen = (include / f"{GEN_TASK}.yaml").read_text()
    (include / f"{CODE_TASK}.yaml").write_text(
        gen.replace(f"task: {GEN_TASK}", f"task: {CODE_TASK}") + "unsafe_code: true\n"
    )
    return base, experts, include


def stand_in_data(stand_ins, *overrides: str):
    from mergebench.families.causal_lm import CausalLMFamily

    base, experts, include = stand_ins
    cfg = composed(
        "model=mergebench_llama32_3b", "taskset=mergebench5",
        f"model.checkpoints.pretrained={base}",
        *(f"model.checkpoints.finetuned.{e}={p}" for e, p in experts.items()),
        f"taskset.tasks=[{MC_TASK},{GEN_TASK},{CODE_TASK}]", f"taskset.include_path={include}",
        f"taskset.expert_tasks.instruction={GEN_TASK}", f"taskset.expert_tasks.math={MC_TASK}",
        f"taskset.expert_tasks.coding=[{CODE_TASK}]", "taskset.expert_tasks.multilingual=[]",
        "taskset.expert_tasks.safety=[]", "eval.lm_eval.batch_size=4", "model.options.device=cpu",
        *overrides,
    )  # fmt: skip
    family, data = CausalLMFamily.from_config(cfg["model"], cfg["taskset"], 0, base)
    family.pool_sources(experts)
    return data


def test_code_task_refused_without_the_option(stand_ins):
    with pytest.raises(MergeBenchError) as err:
        stand_in_data(stand_ins)
    message = str(err.value)
    assert message == (
        f"taskset.tasks: {CODE_TASK} execute the model's generated code: set "
        "eval.lm_eval.confirm_run_unsafe_code=true to run them (or leave them out of "
        "taskset.tasks)"
    )


def test_stand_ins_merge_and_score_with_code_confirmed(stand_ins, monkeypatch):
    from mergebench import merge
    from mergebench.evaluation import evaluate_timed

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    base, experts, _ = stand_ins
    data = stand_in_data(stand_ins, "eval.lm_eval.confirm_run_unsafe_code=true")
    assert data.expert_of == {GEN_TASK: "instruction", MC_TASK: "math", CODE_TASK: "coding"}
    assert data.reference_kinds() == ("individual", "pretrained", *(f"expert:{e}" for e in EXPERTS))
    result = merge("task_arithmetic", base, experts, progress=False)
    ev = evaluate_timed(result, data)
    assert [s.task for s in ev.scores] == [MC_TASK, GEN_TASK, CODE_TASK]
    for score in ev.scores:
        assert len(ev.outcomes[score.task].pred) == 6 and 0.0 <= score.value <= 1.0
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # set only while the tasks were scored


def test_code_eval_env_is_set_only_inside_and_restored(monkeypatch):
    from mergebench.data.lm_eval import _code_eval_allowed

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    with _code_eval_allowed(True):
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    assert os.environ["HF_ALLOW_CODE_EVAL"] == "0"
    with _code_eval_allowed(False):
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "0"
