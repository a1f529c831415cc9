"""The open_clip families on a tiny open_clip model made here in the real formats: an
open_clip hub folder (open_clip_model.safetensors), a task_vectors pickled ImageEncoder
converted with mergebench-convert, a `.pt` state dict, data sets written with save_to_disk;
merged and evaluated through the `mergebench` job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_openclip as tiny
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mergebench.cli import convert
from mergebench.engine.keyplan import plan_keys
from mergebench.evaluation import evaluate
from mergebench.families import family_class
from mergebench.families.clip_prompts import PROMPTS
from mergebench.families.openclip import OpenCLIPFamily
from mergebench.methods.registry import build_method
from mergebench.report.published import find_setting
from mergebench.sources import configured_pool, load_family, load_pool
from mergebench.sources.configured import PoolReferences
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

TASKS = ("eurosat", "mnist")
FAMILY_NAMES = ("openclip_vit_b32", "openclip_vit_b16", "openclip_vit_l14")


def compose_cfg(world: dict[str, Path], *extra: str, finetuned: bool = True):
    root = world["root"]
    overrides = [
        "model=openclip_vit_b32",
        "taskset=clip8",
        f"taskset.tasks=[{','.join(TASKS)}]",
        f"model.checkpoints.pretrained={world['pretrained']}",
        f"model.options.arch={tiny.TINY_ARCH}",
        f"model.options.arch_config={world['arch_config']}",
        f"model.options.head_cache={root / 'heads'}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=4",
        *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
    ]
    if finetuned:
        overrides += [f"model.checkpoints.finetuned.{t}={world[t]}" for t in TASKS]
    overrides += extra
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A pretrained open_clip model in the hub's layout, and per task a vision tower really
    fine-tuned against its frozen zero-shot head (as task_vectors trains): eurosat saved as
    task_vectors does (a pickled ImageEncoder) and converted, mnist as a `.pt` state dict."""
    root = tmp_path_factory.mktemp("openclip")
    arch_config = tiny.write_arch_config(root / "arch")
    pretrained_model = tiny.open_clip_model(arch_config, seed=0)
    pretrained = tiny.save_pretrained(pretrained_model, root / "pretrained")
    tiny.save_task(root / "eurosat", "rows", 10, seed=0)
    tiny.save_task(root / "mnist", "columns", 10, seed=10, gray=True)
    world = {"root": root, "pretrained": pretrained, "arch_config": arch_config}

    cfg = compose_cfg(world, finetuned=False)
    family, data = load_family(cfg.model, cfg.taskset)
    visual = {k: v for k, v in pretrained_model.state_dict().items() if k.startswith("visual.")}
    for task in TASKS:
        torch.manual_seed(0)
        model = family.build_model(task)
        model.load_state_dict({**visual, **family.head_tensors(task)}, strict=True)
        model.classifier.requires_grad_(False)  # the head stays frozen
        optimizer = torch.optim.AdamW(model.visual.parameters(), lr=3e-3)
        batches = list(data.batches(task, "train", 16))
        for _ in range(6):
            for batch, labels in batches:
                loss = F.cross_entropy(family.logits(model, batch), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        tuned = {k: v.detach() for k, v in model.state_dict().items() if k.startswith("visual.")}
        if task == "eurosat":
            full = tiny.open_clip_model(arch_config, seed=5)
            full.load_state_dict({**pretrained_model.state_dict(), **tuned})
            pickled = tiny.save_image_encoder_pickle(full, root / "finetuned.pt")
            convert.main(["--trust-pickle", str(pickled), str(root / "eurosat.safetensors")])
            world[task] = root / "eurosat.safetensors"
        else:
            torch.save(tuned, root / "mnist.pt")
            world[task] = root / "mnist.pt"
    return world


def test_registry_configs_and_clip8_pairing():
    for name in FAMILY_NAMES:
        with initialize_config_dir(str(conf_dir()), version_base=None):
            cfg = compose("config", overrides=[f"model={name}", "taskset=clip8"])
        assert cfg.model.source == "configured" and family_class(cfg.model) is OpenCLIPFamily
        OpenCLIPFamily.check_taskset(cfg.model, cfg.taskset)  # clip8's `family: clip`
        arch = {"openclip_vit_b32": "ViT-B-32", "openclip_vit_b16": "ViT-B-16"}.get(
            name, "ViT-L-14"
        )
        assert cfg.model.options.arch == arch and cfg.model.options.quick_gelu is True
        assert cfg.model.layer_pattern == r"visual\.transformer\.resblocks\.(\d+)\."
        assert cfg.model.checkpoints.pretrained.startswith("timm/")
        # The eight first; then clip14/clip20's twelve (tests/families/test_clip20.py).
        assert list(cfg.model.checkpoints.finetuned)[:8] == list(cfg.taskset.tasks)
    published = {n: find_setting(n, "clip8", 8) for n in FAMILY_NAMES}
    assert published["openclip_vit_b32"].key == "openclip-vit-b32-8"
    assert published["openclip_vit_b32"].average_for("emr") == pytest.approx(0.887)
    assert published["openclip_vit_l14"].key == "openclip-vit-l14-8"
    assert published["openclip_vit_b16"] is None  # no ViT-B/16 eight-task table in the paper
    with initialize_config_dir(str(conf_dir()), version_base=None):
        text = compose("config", overrides=["model=openclip_vit_b32", "taskset=glue8"])
    with pytest.raises(MergeBenchError, match="taskset.family"):
        OpenCLIPFamily.check_taskset(text.model, text.taskset)


def test_model_keys_head_and_logits_match_open_clip(world):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = compose_cfg(world)
    family, data = load_family(cfg.model, cfg.taskset)
    # The hub folder's open_clip_model.safetensors is the pretrained file.
    assert family.pretrained_path.name == "open_clip_model.safetensors"
    reference = tiny.open_clip_model(world["arch_config"], seed=1)
    reference.load_state_dict(
        {k: v for k, v in family.pretrained_source().state_dict().items()}, strict=True
    )
    reference.eval()
    expected_keys = {f"visual.{k}" for k in reference.visual.state_dict()} | {"classifier.weight"}
    assert set(family.model_keys("eurosat")) == expected_keys

    tokenizer = open_clip.get_tokenizer(tiny.TINY_ARCH)
    prompts = PROMPTS["eurosat"]
    with torch.no_grad():
        per_class = []
        for name in prompts.classnames:
            text = reference.encode_text(tokenizer([t.format(name) for t in prompts.templates]))
            per_class.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
        expected_head = torch.stack(per_class) * reference.logit_scale.exp()
    head = family.head_tensors("eurosat")["classifier.weight"]
    torch.testing.assert_close(head, expected_head, rtol=1e-4, atol=1e-4)

    pool = configured_pool(family, cfg.model, cfg.taskset)
    model = family.build_model("eurosat").eval()
    model.load_state_dict({**pool.pretrained.state_dict(), **family.head_tensors("eurosat")})
    preprocess = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(reference)), is_train=False
    )
    rows = family.tasks["eurosat"].inputs["test"]
    images = [rows[i] for i in range(5)]
    batch = family.encode(images)
    torch.testing.assert_close(batch["pixel_values"], torch.stack([preprocess(i) for i in images]))
    with torch.no_grad():
        image = F.normalize(reference.encode_image(batch["pixel_values"]), dim=-1)
        torch.testing.assert_close(
            family.logits(model, batch), image @ expected_head.T, rtol=1e-4, atol=1e-4
        )


def test_pool_is_the_visual_tower(world):
    cfg = compose_cfg(world)
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert pool.heads_separate and pool.tasks == list(TASKS)
    assert pool.layer_pattern == r"visual\.transformer\.resblocks\.(\d+)\."
    assert all(k.startswith("visual.") for k in pool.pretrained.keys())
    plan = plan_keys(pool)
    assert set(plan.merged) == set(pool.pretrained.keys())
    assert "visual.proj" in plan.merged
    for task in TASKS:
        assert sorted(plan.task_specific[task]) == ["classifier.weight"]
    # The converted pickle and the .pt state dict read as the same model, changed by tuning.
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    for task in TASKS:
        assert not torch.equal(pool.finetuned[task].get(key), pool.pretrained.get(key))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr"])
def test_bench_run_merges_and_evaluates(world, monkeypatch, capsys, method):
    """`mergebench model=openclip_vit_b32 taskset=clip8 method=...` in process."""
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
    out = capsys.readouterr().out
    assert "individual" in out and "pretrained" in out
    refs = cache / "paper" / "openclip_vit_b32" / "references" / "clip8.json"
    rows = json.loads(refs.read_text())["rows"]
    individual = {s["task"]: s["value"] for s in rows["individual"]["scores"]}
    zero_shot = {s["task"]: s["value"] for s in rows["pretrained"]["scores"]}
    for task in TASKS:  # tuned against the zero-shot head on the same distribution
        assert individual[task] >= zero_shot[task], (task, individual, zero_shot)
    assert sum(individual.values()) > sum(zero_shot.values())

    # The merged vision tower is neither the pretrained one nor a fine-tuned one.
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    merged = build_method(method).merge(pool)
    key = "visual.transformer.resblocks.1.attn.in_proj_weight"
    for task in TASKS:
        weight = merged.state_dict(task)[key]
        assert not torch.allclose(weight, pool.pretrained.get(key))
        assert not torch.allclose(weight, pool.finetuned[task].get(key))
        assert torch.equal(
            merged.state_dict(task)["classifier.weight"],
            pool.finetuned[task].get("classifier.weight"),
        )


def test_individual_row_equals_the_tuned_models(world):
    cfg = compose_cfg(world)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    individual = {s.task: s.value for s in evaluate(PoolReferences("individual", pool), data)}
    zero_shot = {s.task: s.value for s in evaluate(PoolReferences("pretrained", pool), data)}
    assert sum(individual.values()) / 2 >= sum(zero_shot.values()) / 2 + 0.2, (
        individual,
        zero_shot,
    )


def test_bad_checkpoints_fail_in_one_line(world, tmp_path):
    # task_vectors' zeroshot.pt keeps no text transformer: no zero-shot heads from it.
    state = tiny.task_vectors_state(tiny.open_clip_model(world["arch_config"]))
    torch.save(state, tmp_path / "zeroshot_state.pt")
    cfg = compose_cfg(world, f"model.checkpoints.pretrained={tmp_path / 'zeroshot_state.pt'}",
                      f"model.options.head_cache={tmp_path / 'heads'}")  # fmt: skip
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError, match="lacks the text tower") as err:
        family.head_tensors("mnist")
    assert "\n" not in str(err.value)
    # An unconverted pickled module is never unpickled by the pool.
    pickled = world["root"] / "finetuned.pt"
    cfg = compose_cfg(world, f"model.checkpoints.finetuned.eurosat={pickled}")
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError, match="finetuned.pt") as err:
        configured_pool(family, cfg.model, cfg.taskset)
    assert "\n" not in str(err.value)
    cfg = compose_cfg(world, "model.options.arch=ViT-Nope-99")
    with pytest.raises(MergeBenchError, match="model.options.arch"):
        load_family(cfg.model, cfg.taskset)
