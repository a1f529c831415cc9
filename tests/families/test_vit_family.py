"""The thirty-task ViT family on a tiny timm ViT made here in timm's formats: a pretrained
hub-style folder (model.safetensors with a 21-class pre-training head), per task a model
fine-tuned with `fine_tune_task` (safetensors and `.pt`), data sets written with
save_to_disk; merged and evaluated through the `mergebench` job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_openclip as tiny
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from mergebench.data.hf import parse_data_spec
from mergebench.engine.keyplan import plan_keys
from mergebench.families import family_class
from mergebench.families.vit import DEFAULT_ARCH, ViTFamily, fine_tune_task
from mergebench.methods.registry import build_method
from mergebench.report.published import find_setting
from mergebench.sources import load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

TASKS = ("mnist", "beans")
CLASSES = {"mnist": 10, "beans": 3}
TINY = "vit_tiny_patch16_224"
KWARGS = "{" + ",".join(f"{k}:{v}" for k, v in tiny.VIT_KWARGS.items()) + "}"


def compose_cfg(world: dict[str, Path], *extra: str, finetuned: bool = True):
    root = world["root"]
    overrides = [
        "model=vit_b16_in21k",
        "taskset=vit30",
        f"taskset.tasks=[{','.join(TASKS)}]",
        f"model.checkpoints.pretrained={world['pretrained']}",
        f"model.options.arch={TINY}",
        f"model.options.model_kwargs={KWARGS}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=4",
        *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
    ]
    if finetuned:
        overrides += [f"model.checkpoints.finetuned.{t}={world[t]}" for t in TASKS]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=[*overrides, *extra])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    import timm

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    pretrained = timm.create_model(TINY, pretrained=False, num_classes=21, **tiny.VIT_KWARGS)
    folder = root / "pretrained"  # timm's hub layout: model.safetensors + config.json
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"architecture": TINY, "num_classes": 21}))
    tiny.save_task(root / "mnist", "rows", 10, seed=0, gray=True)
    tiny.save_task(root / "beans", "columns", 3, seed=5, label="labels", train=16, test=8)
    world = {"root": root, "pretrained": folder}

    cfg = compose_cfg(world, finetuned=False)
    family, data = load_family(cfg.model, cfg.taskset)
    state = pretrained.state_dict()
    for task in TASKS:
        path = fine_tune_task(
            family, data, task, state, root / f"{task}.safetensors", epochs=6, lr=2e-3,
            batch_size=16,
        )  # fmt: skip
        if task == "beans":  # a `.pt` state dict, read with weights_only=True
            torch.save(load_file(str(path)), root / "beans.pt")
            path = root / "beans.pt"
        world[task] = path
    return world


def test_registry_config_and_thirty_tasks():
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=["model=vit_b16_in21k", "taskset=vit30"])
    assert cfg.model.source == "configured" and family_class(cfg.model) is ViTFamily
    ViTFamily.check_taskset(cfg.model, cfg.taskset)
    assert cfg.model.options.arch == DEFAULT_ARCH
    assert cfg.model.layer_pattern == r"blocks\.(\d+)\."
    tasks = list(cfg.taskset.tasks)
    assert len(tasks) == len(set(tasks)) == 30
    assert list(cfg.model.checkpoints.finetuned) == tasks
    assert set(cfg.taskset.data) == set(tasks)
    public = 0
    for task in tasks:
        entry = cfg.taskset.data[task]
        if entry.path is None and entry.data_dir is None:
            with pytest.raises(MergeBenchError, match=rf"taskset\.data\.{task}: set path"):
                parse_data_spec(task, entry)
        else:
            public += 1
            assert parse_data_spec(task, entry).inputs == ("image",)
    assert public >= 18
    setting = find_setting("vit_b16_in21k", "vit30", 30)
    assert setting.key == "vit-b16-in21k-30"
    assert setting.average_for("emr") == pytest.approx(0.8954)


def test_encode_is_timms_eval_transform(world):
    from timm.data import create_transform

    cfg = compose_cfg(world)
    family, _ = load_family(cfg.model, cfg.taskset)
    assert family.data_config["input_size"] == (3, 32, 32)
    rows = family.tasks["mnist"].inputs["test"]
    images = [rows[i] for i in range(3)]
    batch = family.encode(images)["pixel_values"]
    transform = create_transform(**family.data_config, is_training=False)
    expected = torch.stack([transform(i.convert("RGB")) for i in images])
    assert batch.shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch, expected)


def test_pool_merges_the_backbone_and_keeps_each_head(world):
    cfg = compose_cfg(world)
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert not pool.heads_separate and pool.tasks == list(TASKS)
    assert pool.layer_pattern == r"blocks\.(\d+)\."
    assert not any(k.startswith("head.") for k in pool.pretrained.keys())  # the 21-class head
    plan = plan_keys(pool)
    assert set(plan.merged) == set(pool.pretrained.keys())
    assert {"cls_token", "pos_embed", "blocks.1.attn.qkv.weight"} <= set(plan.merged)
    for task in TASKS:
        assert sorted(plan.task_specific[task]) == ["head.bias", "head.weight"]
        assert pool.finetuned[task].shape("head.weight") == (CLASSES[task], 32)
    assert load_file(str(world["mnist"])) and world["beans"].suffix == ".pt"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr"])
def test_bench_run_merges_and_evaluates(world, monkeypatch, capsys, method):
    """`mergebench model=vit_b16_in21k taskset=vit30 method=...` in process."""
    from mergebench.bench import job as bench

    cache = world["root"] / f"bench_cache_{method}"
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    cfg = compose_cfg(
        world, f"method={method}", f"store.path={world['root'] / 'r.sqlite'}", "progress=false"
    )
    summary = bench.run(cfg)
    scores = {s["task"]: s["value"] for s in summary["scores"]}
    assert list(scores) == list(TASKS)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert "individual" in capsys.readouterr().out
    refs = cache / "paper" / "vit_b16_in21k" / "references" / "vit30.json"
    rows = json.loads(refs.read_text())["rows"]
    individual = {s["task"]: s["value"] for s in rows["individual"]["scores"]}
    pretrained = {s["task"]: s["value"] for s in rows["pretrained"]["scores"]}
    # Fine-tuned backbone and head together beat the pretrained backbone with that head.
    for task in TASKS:
        assert individual[task] >= pretrained[task], (task, individual, pretrained)

    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    merged = build_method(method).merge(pool)
    key = "blocks.0.mlp.fc1.weight"
    for task in TASKS:
        state = merged.state_dict(task)
        assert not torch.allclose(state[key], pool.pretrained.get(key))
        assert not torch.allclose(state[key], pool.finetuned[task].get(key))
        assert torch.equal(state["head.weight"], pool.finetuned[task].get("head.weight"))


def test_bad_options_fail_in_one_line(world):
    cfg = compose_cfg(world, "model.options.model_kwargs={depth: nope}")
    with pytest.raises(MergeBenchError, match="model.options") as err:
        load_family(cfg.model, cfg.taskset)
    assert "\n" not in str(err.value)
