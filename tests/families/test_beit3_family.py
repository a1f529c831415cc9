"""The BEiT-3 family (model=beit3_base, taskset=beit3_5) on a tiny random BEiT-3 (2 layers,
32 dims) with tiny local data for all five tasks in unilm's index formats (tiny_beit3.py):
the key plan of the official merge, each task's metric against hand-computed cases and
pycocoevalcap's own values, and `mergebench ... method=...` run from the command line."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import tiny_beit3 as tiny
import torch
from hydra import compose, initialize_config_dir

from mergebench.api import merge_pool
from mergebench.data import vl_metrics
from mergebench.data.vl_metrics import (
    caption_scores,
    normalize_answer,
    retrieval_scores,
    vqa_accuracy,
)
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.engine.keyplan import plan_keys
from mergebench.families.beit3 import PRIMARY
from mergebench.report.published import find_setting
from mergebench.sources import load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return tiny.world(tmp_path_factory.mktemp("beit3"))


@pytest.fixture
def no_java(monkeypatch):
    """METEOR's JVM takes ~20 s to start: the end-to-end runs use the Java-free path."""
    monkeypatch.setattr(vl_metrics, "java_available", lambda: False)


def compose_cfg(world: dict, *extra: str):
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=[*tiny.overrides(world), *extra])


# ---------------------------------------------------------------------------- metrics
def test_beit3_vqa_accuracy_of_ten_answers_hand_computed():
    # Two of ten humans said "yes": leaving out one of those two leaves 1 match (1/3), leaving
    # out any of the other eight leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["yes", "yes"] + ["no"] * 8
    assert vqa_accuracy("yes", answers) == pytest.approx(0.6)
    # Three or more matches in every leave-one-out subset: 1; four "yes": still 1.
    assert vqa_accuracy("Yes.", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    assert vqa_accuracy("maybe", answers) == 0.0
    # One match: 9 subsets hold it (1/3), the one leaving it out holds none: 0.3.
    assert vqa_accuracy("two", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    # Unanimous humans: the script compares without normalising.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0


def test_beit3_vqa_answer_normalization():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the red car") == "red car"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("1,000") == "1000"


def test_beit3_retrieval_recalls_hand_computed():
    # Two images, four captions (two each). Image 0 ranks its caption 0 first; image 1 ranks
    # caption 1 (image 0's) first. Captions 0 and 2 find their own image first, 1 and 3 not.
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 0.0], [0.3, 0.9], [0.5, 0.6], [0.9, 0.1]])
    result = retrieval_scores(images, texts, [0, 0, 1, 1])
    r = result.recalls
    assert r["tr_r1"] == pytest.approx(0.5)
    assert r["ir_r1"] == pytest.approx(0.5)
    assert r["tr_r5"] == r["tr_r10"] == r["ir_r5"] == r["ir_r10"] == 1.0
    assert result.mean == pytest.approx((0.5 + 0.5 + 4) / 6)
    assert result.per_image == pytest.approx([5.5 / 6, 4.5 / 6])
    assert result.per_image.mean() == pytest.approx(result.mean)  # two captions each
    # Unequal caption counts: the score stays the six recalls' mean.
    uneven = retrieval_scores(images, texts[:3], [0, 0, 1])
    assert uneven.recalls["ir_r1"] == pytest.approx(2 / 3)
    assert uneven.mean == pytest.approx(sum(uneven.recalls.values()) / 6)


def _pycocoevalcap_direct(preds, refs):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [vl_metrics.simple_tokenize(c) for c in refs[i]] for i in preds}
    res = {i: [vl_metrics.simple_tokenize(preds[i])] for i in preds}
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)


PREDS = {1: "a dog on a car", 2: "two cats on the grass", 3: "a plate of food"}
REFS = {
    1: ["a dog on a red car", "a dog sits on a car"],
    2: ["two cats sit on the grass", "cats on the grass"],
    3: ["a plate of food with a fork", "food on a plate"],
}


def test_beit3_caption_metrics_are_pycocoevalcaps(no_java):
    result = caption_scores(PREDS, REFS)
    bleu4, (cider, per_image) = _pycocoevalcap_direct(PREDS, REFS)
    assert result.scores["bleu4"] == pytest.approx(bleu4)
    assert result.scores["cider"] == pytest.approx(cider)
    assert np.allclose(result.per_image_cider, per_image)
    assert result.per_image_cider.mean() == pytest.approx(result.scores["cider"])
    assert 0 < result.scores["rouge_l"] <= 1
    assert "meteor" not in result.scores and "java" in result.skipped["meteor"]
    # A caption equal to its only reference: BLEU-4 is 1 (brevity penalty 1, all n-grams).
    same = caption_scores({1: "a dog on a red car"}, {1: ["a dog on a red car"]})
    assert same.scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not vl_metrics.java_available(), reason="no java: METEOR and PTB skipped")
def test_beit3_caption_metrics_with_java_meteor_and_ptb():
    result = caption_scores(PREDS, REFS)
    assert not result.skipped
    assert 0 < result.scores["meteor"] <= 1
    assert result.scores["cider"] > 0


# ---------------------------------------------------------------------------- family
def test_beit3_config_and_key_plan(world):
    cfg = compose_cfg(world)
    assert cfg.model.task_specific == "auto"
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    plan = plan_keys(pool)
    # The official rule: heads, the output LayerNorm three tasks have, and the 48-px
    # position table are task-specific; every encoder layer merges.
    assert "beit3.encoder.embed_positions.A.weight" in plan.auto
    assert "shapes differ" in plan.auto["beit3.encoder.embed_positions.A.weight"]
    assert "beit3.encoder.layer_norm.A.weight" in plan.auto
    assert {"head.weight", "fc_norm.weight", "mlm_head.weight", "logit_scale"} <= set(plan.auto)
    assert "beit3.encoder.layers.1.ffn.A.fc1.weight" in plan.merged
    assert "beit3.text_embed.weight" in plan.merged
    assert "head.weight" in plan.task_specific["imagenet"]
    assert "head.weight" not in plan.task_specific["coco_retrieval"]


def test_beit3_checkpoint_must_be_a_state_dict(world, tmp_path):
    state = torch.load(world["imagenet"], weights_only=True)["model"]
    assert set(open_checkpoint(world["imagenet"]).keys()) == set(state)
    bad = tmp_path / "with_args.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1)}, bad)
    with pytest.raises(MergeBenchError) as err:
        open_checkpoint(bad).keys()
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_beit3_bad_options_fail_in_one_line(world, tmp_path):
    cfg = compose_cfg(world, "model.options.tokenizer=/nonexistent/beit3.spm")
    with pytest.raises(MergeBenchError, match="model.options.tokenizer"):
        load_family(cfg.model, cfg.taskset)
    cfg = compose_cfg(world, f"taskset.root={tmp_path}")
    with pytest.raises(MergeBenchError, match="taskset.root") as err:
        load_family(cfg.model, cfg.taskset)
    assert "\n" not in str(err.value)


def test_beit3_encode_each_task_and_decode_captions(world):
    cfg = compose_cfg(world)
    family, data = load_family(cfg.model, cfg.taskset)
    sizes = tiny.IMG_SIZE
    for task in tiny.TASKS:
        rows = family.tasks[task].inputs["test"]
        assert not {"label", "labels", "scores", "answers"} & set(rows[0])  # no labels
        batch = family.encode(rows[:2])
        assert batch["image"].shape == (2, 3, sizes[task], sizes[task])
        model = family.build_model(task).eval()
        with torch.inference_mode():
            out = family.logits(model, batch)
        assert out.shape[0] == 2
    model = family.build_model("coco_captioning").eval()
    image = family.encode(family.tasks["coco_captioning"].inputs["test"][:2])["image"]
    with torch.inference_mode():
        captions = family.caption(model, image)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert data.num_classes("vqav2") == len(tiny.ANSWERS)


def test_beit3_caption_decoding_options_reach_the_family(world):
    """Defaults: unilm's evaluation (beam 3, length penalty 0.6, 64 tokens); greedy by option;
    on the tiny model both decode from the same captioner."""
    with initialize_config_dir(str(conf_dir()), version_base=None):
        plain = compose("config", overrides=["model=beit3_base", "taskset=beit3_5"])
    assert plain.model.options.caption_decoding == "beam"
    assert plain.model.options.caption_beams == 3
    assert plain.model.options.caption_length_penalty == 0.6
    assert plain.model.options.caption_max_len == 64
    beam, _ = load_family(*_model_taskset(compose_cfg(world)))
    greedy, _ = load_family(
        *_model_taskset(compose_cfg(world, "model.options.caption_decoding=greedy"))
    )
    assert (beam.decoding.method, beam.decoding.num_beams) == ("beam", 3)
    assert greedy.decoding.method == "greedy" and greedy.decoding.max_len == 6
    model = beam.build_model("coco_captioning").eval()
    image = beam.encode(beam.tasks["coco_captioning"].inputs["test"][:2])["image"]
    with torch.inference_mode():
        assert len(beam.caption(model, image)) == len(greedy.caption(model, image)) == 2
    with pytest.raises(MergeBenchError, match="model.options.caption_decoding"):
        load_family(*_model_taskset(compose_cfg(world, "model.options.caption_decoding=top_k")))


def _model_taskset(cfg):
    return cfg.model, cfg.taskset


def test_beit3_scores_primary_first(world, no_java):
    from mergebench.evaluation import ModelCache, evaluate_timed
    from mergebench.sources.configured import PoolReferences

    cfg = compose_cfg(world)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    ev = evaluate_timed(PoolReferences("individual", pool), data, cache=ModelCache(data))
    metrics = [(s.task, s.metric) for s in ev.scores]
    assert metrics[:4] == [("imagenet", "accuracy"), ("vqav2", "vqa_accuracy"),
                           ("nlvr2", "accuracy"), ("coco_captioning", "cider")]  # fmt: skip
    assert ("coco_captioning", "bleu4") in metrics and ("coco_retrieval", "tr_r10") in metrics
    assert metrics.index(("coco_retrieval", "recall_mean")) < metrics.index(
        ("coco_retrieval", "tr_r1")
    )
    vqa = ev.outcomes["vqav2"]
    assert vqa.metric == "mean" and len(vqa.pred) == 6
    # Items with ten answers get the official accuracy, one without its unilm soft score.
    allowed = {vqa_accuracy(a, ["yes"] * (i + 1) + ["no"] * (9 - i))
               for i in range(5) for a in tiny.ANSWERS}  # fmt: skip
    assert all(any(abs(p - a) < 1e-9 for a in allowed) for p in vqa.pred[:5])
    assert vqa.pred[5] in (0.0, 1.0)
    assert ev.outcomes["coco_retrieval"].pred.shape == (3,)  # per image
    retrieval = {s.metric: s.value for s in ev.scores if s.task == "coco_retrieval"}
    six = [retrieval[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 5, 10)]
    assert retrieval["recall_mean"] == pytest.approx(sum(six) / 6)  # unilm's average_score


def _run_cli(world, monkeypatch, capsys, *args: str) -> str:
    from mergebench.cli.bench import main

    monkeypatch.chdir(world["root"])
    monkeypatch.setattr(sys, "argv", ["mergebench", *tiny.overrides(world), *args])
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr", "weight_averaging"])
def test_beit3_cli_merges_and_lands_on_the_board(world, monkeypatch, capsys, no_java, method):
    """`mergebench model=beit3_base taskset=beit3_5 method=...` from the command line; the
    references are computed once (shared cache), each method adds a row with intervals."""
    monkeypatch.setenv("MERGEBENCH_CACHE", str(world["root"] / "cache"))
    store = world["root"] / "results.sqlite"
    extra = ["method.magnitude=sum"] if method == "emr" else []
    out = _run_cli(
        world, monkeypatch, capsys, f"method={method}", *extra, f"store.path={store}",
        "protocol.select=false", "progress=false", "hydra.run.dir=.", "hydra.output_subdir=null",
    )  # fmt: skip
    assert "imagenet" in out and "coco_retrieval" in out

    from mergebench.cli.leaderboard import main as board_main

    monkeypatch.setattr(sys, "argv", ["mergebench-leaderboard", "--db", str(store),
                                      "--format", "json"])  # fmt: skip
    board_main()
    boards = json.loads(capsys.readouterr().out)["boards"]
    board = next(b for b in boards if b["taskset"] == "beit3_5")
    assert board["tasks"] == list(tiny.TASKS)
    assert board["metrics"] == PRIMARY  # the board shows each task's primary metric
    rows = {r["label"]: r for r in board["rows"]}
    row = rows["emr (sum)" if method == "emr" else method]
    low, high = row["average_ci"]
    assert low <= row["average"] <= high
    assert set(row["scores_ci"]) == set(tiny.TASKS)
    assert rows["individual"]["published_scores"]["coco_captioning"] == pytest.approx(1.337)


def test_beit3_merge_keeps_task_specific_keys(world):
    cfg = compose_cfg(world)
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    merged = merge_pool("emr", pool, progress=False, magnitude="sum")
    key = "beit3.encoder.layers.0.ffn.A.fc1.weight"
    pos = "beit3.encoder.embed_positions.A.weight"
    for task in tiny.TASKS:
        state = merged.state_dict(task)
        assert not torch.equal(state[key], pool.finetuned[task].get(key))
        assert torch.equal(state[pos], pool.finetuned[task].get(pos))  # its own resolution
    recorded = merged.extra["task_specific_keys"]  # the run says which keys and why
    assert pos in recorded and "head.weight" in recorded and key not in recorded


def test_beit3_published_table6():
    from omegaconf import OmegaConf

    name = OmegaConf.load(conf_dir() / "model" / "beit3_base.yaml").name
    taskset = OmegaConf.load(conf_dir() / "taskset" / "beit3_5.yaml")
    setting = find_setting(name, taskset.name, len(taskset.tasks))
    assert setting is not None and setting.key == "beit3-base-5"
    assert [setting.task_index(t) for t in taskset.tasks] == [0, 1, 2, 3, 4]
    assert setting.task_score_for("emr", "coco_captioning") == pytest.approx(1.060)
    assert setting.task_score_for("individual", "coco_retrieval") == pytest.approx(0.8456)
