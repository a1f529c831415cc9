"""The CLIP families on a tiny CLIP made here in the hub's formats: configs, checkpoints,
zero-shot heads, data sets, merging and evaluation, all through the code that loads
openai/clip-vit-base-patch32, tanganke/clip-vit-base-patch32_* and tanganke/eurosat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_hf
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mergebench.data.hf import open_split, split_rows
from mergebench.engine.keyplan import plan_keys
from mergebench.evaluation import evaluate
from mergebench.families import family_class
from mergebench.families.clip import CLIPFamily
from mergebench.families.clip_prompts import PROMPTS
from mergebench.methods.registry import build_method
from mergebench.sources import configured_pool, load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

TASKS = ("eurosat", "mnist")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A pretrained CLIPModel, two fine-tuned vision towers (one with transformers 4's
    `vision_model.` keys, one as this version saves them), and two image data sets: one
    written with save_to_disk, one as parquet files in the hub's layout (grayscale)."""
    import datasets

    root = tmp_path_factory.mktemp("clip")
    pre = tiny_hf.make_clip(root / "clip")
    tiny_hf.make_clip_vision(pre, root / "ft_eurosat", seed=1, prefixed=True)
    tiny_hf.make_clip_vision(pre, root / "ft_mnist", seed=2, prefixed=False)
    datasets.DatasetDict(
        {"train": tiny_hf.image_dataset(10, 3, 0), "test": tiny_hf.image_dataset(10, 2, 1)}
    ).save_to_disk(str(root / "eurosat"))
    tiny_hf.save_parquet_repo(
        root / "mnist",
        {
            "train": tiny_hf.image_dataset(10, 3, 2, gray=True),
            "test": tiny_hf.image_dataset(10, 2, 3, gray=True),
        },
    )
    return {"root": root, "pretrained": pre}


def clip_config(world: dict[str, Path], *extra: str, heads: str = "heads"):
    root = world["root"]
    overrides = [
        "model=clip_vit_b32",
        "taskset=clip8",
        f"taskset.tasks=[{','.join(TASKS)}]",
        f"model.checkpoints.pretrained={world['pretrained']}",
        f"model.options.head_cache={root / heads}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=4",
        *(f"model.checkpoints.finetuned.{t}={root / f'ft_{t}'}" for t in TASKS),
        *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def reference_clip(folder: Path):
    """transformers' own CLIPModel: an independent route to features and logits."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def features(output) -> torch.Tensor:
    # get_*_features return a tensor in transformers 4 and an output object in 5.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_registry_and_configs_name_the_paper_checkpoints():
    for name in ("clip_vit_b32", "clip_vit_b16", "clip_vit_l14"):
        with initialize_config_dir(str(conf_dir()), version_base=None):
            cfg = compose("config", overrides=[f"model={name}", "taskset=clip8"])
        assert cfg.model.source == "configured" and family_class(cfg.model) is CLIPFamily
        pattern = {"clip_vit_b32": "base-patch32", "clip_vit_b16": "base-patch16"}.get(
            name, "large-patch14"
        )
        assert cfg.model.checkpoints.pretrained == f"openai/clip-vit-{pattern}"
        # The eight first; then clip14/clip20's twelve (tests/families/test_clip20.py).
        assert list(cfg.model.checkpoints.finetuned)[:8] == list(cfg.taskset.tasks)
        assert cfg.model.checkpoints.finetuned.stanford_cars == (
            f"tanganke/clip-vit-{pattern}_stanford-cars"
        )
    assert set(cfg.taskset.tasks) <= set(PROMPTS)
    counts = {t: len(PROMPTS[t].classnames) for t in cfg.taskset.tasks}
    assert counts == {
        "sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10,
        "svhn": 10, "gtsrb": 43, "mnist": 10, "dtd": 47,
    }  # fmt: skip


def test_zero_shot_head_and_logits_match_clipmodel(world):
    family, data = load_family(*_model_taskset(clip_config(world)))
    pool = configured_pool(family, *_model_taskset(clip_config(world)))
    clip, tokenizer = reference_clip(world["pretrained"])
    prompts = PROMPTS["eurosat"]
    with torch.no_grad():
        per_class = []
        for name in prompts.classnames:
            enc = tokenizer([t.format(name) for t in prompts.templates], padding=True)
            enc = {k: torch.tensor(v) for k, v in enc.items()}
            text = F.normalize(features(clip.get_text_features(**enc)), dim=-1)
            per_class.append(F.normalize(text.mean(0), dim=-1))
        expected_head = torch.stack(per_class) * clip.logit_scale.exp()
    head = family.head_tensors("eurosat")["classifier.weight"]
    torch.testing.assert_close(head, expected_head, rtol=1e-4, atol=1e-4)

    # The pretrained tower with the task's head gives CLIP's zero-shot logits.
    model = family.build_model("eurosat").eval()
    state = {**pool.pretrained.state_dict(), **family.head_tensors("eurosat")}
    model.load_state_dict(state, strict=True)
    batch, _ = next(data.batches("eurosat", "test", batch_size=5))
    with torch.no_grad():
        image = F.normalize(features(clip.get_image_features(**batch)), dim=-1)
        torch.testing.assert_close(
            family.logits(model, batch), image @ expected_head.T, rtol=1e-4, atol=1e-4
        )


def _model_taskset(cfg):
    return cfg.model, cfg.taskset


def test_heads_are_cached_on_disk_and_keyed_by_prompts(world, monkeypatch):
    cfg = clip_config(world, heads="heads_cache_test")
    family, _ = load_family(cfg.model, cfg.taskset)
    first = family.zeroshot_weights("mnist")
    cached = sorted((world["root"] / "heads_cache_test").glob("*.safetensors"))
    assert len(cached) == 1

    def no_text_tower(*args, **kwargs):
        raise AssertionError("the head should come from the cache")

    monkeypatch.setattr(CLIPFamily, "compute_zeroshot_weights", no_text_tower)
    again, _ = load_family(cfg.model, cfg.taskset)
    torch.testing.assert_close(again.zeroshot_weights("mnist"), first)
    monkeypatch.undo()

    # Other templates: another cache entry and another head.
    other = clip_config(
        world,
        "+taskset.data.mnist.templates=['a drawing of the digit {}.']",
        heads="heads_cache_test",
    )
    changed, _ = load_family(other.model, other.taskset)
    assert not torch.allclose(changed.zeroshot_weights("mnist"), first)
    assert len(list((world["root"] / "heads_cache_test").glob("*.safetensors"))) == 2


def test_pool_is_the_vision_towers_under_one_naming(world):
    cfg = clip_config(world)
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert pool.heads_separate and pool.tasks == list(TASKS)
    # The full CLIPModel's text tower and logit scale are not part of the pool.
    assert all(k.startswith("vision_model.") for k in pool.pretrained.keys())
    plan = plan_keys(pool)
    assert set(plan.merged) == set(pool.pretrained.keys())
    for task in TASKS:
        assert sorted(plan.task_specific[task]) == ["classifier.weight", "visual_projection.weight"]
    # Both key conventions on disk (prefixed eurosat, bare mnist) read as the same model.
    from safetensors import safe_open

    with safe_open(str(world["root"] / "ft_mnist" / "model.safetensors"), "pt") as f:
        disk_keys = set(f.keys())
    key = "vision_model.post_layernorm.weight"
    assert key in pool.finetuned["mnist"]
    disk_key = key if key in disk_keys else key.removeprefix("vision_model.")
    with safe_open(str(world["root"] / "ft_mnist" / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(pool.finetuned["mnist"].get(key), f.get_tensor(disk_key))
    assert not torch.equal(pool.finetuned["mnist"].get(key), pool.pretrained.get(key))


def test_emr_merge_and_evaluation_end_to_end(world):
    """model=clip_vit_b32 taskset=clip8 method=emr on local copies: merge, then evaluate
    every task; the individual row equals an independent transformers evaluation."""
    from transformers import CLIPVisionModel

    cfg = clip_config(world)
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    result = build_method("emr").merge(pool)
    scores = evaluate(result, data)
    assert [(s.task, s.metric) for s in scores] == [(t, "accuracy") for t in TASKS]
    assert all(0.0 <= s.value <= 1.0 for s in scores)

    class Individual:
        def state_dict(self, task):
            return pool.finetuned[task].state_dict()

    ours = {s.task: s.value for s in evaluate(Individual(), data)}
    clip, _ = reference_clip(world["pretrained"])
    for task in TASKS:
        vision = CLIPVisionModel.from_pretrained(world["root"] / f"ft_{task}").eval()
        head = data.family.head_tensors(task)["classifier.weight"]
        correct = n = 0
        for batch, labels in data.batches(task, "test", batch_size=7):
            with torch.no_grad():
                pooled = vision(**batch).pooler_output
                image = F.normalize(clip.visual_projection(pooled), dim=-1)
            correct += int(((image @ head.T).argmax(-1) == labels).sum())
            n += len(labels)
        assert n == 20
        assert ours[task] == pytest.approx(correct / n)
    # EMR's model for a task is not the fine-tuned one, and it differs between tasks.
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    emr_a, emr_b = (result.state_dict(t)[key] for t in TASKS)
    assert not torch.equal(emr_a, emr_b)


def test_data_dependent_methods_read_inputs_only(world):
    cfg = clip_config(world)
    pool, _ = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    family = pool.family
    batch = next(family.unlabeled_inputs("mnist", "train", 4, 4))
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape[:2] == (4, 3)
    # What the family holds opens its data sets without the label column.
    rows = family.tasks["mnist"].inputs["test"]
    rows[0]
    assert rows._data.column_names == ["image"]
    merged = build_method("regmean", num_examples=8, batch_size=4).merge(pool)
    assert list(merged.tasks) == list(TASKS)
    check_regmean_on_clip(pool, merged.state_dict(TASKS[0]))
    ada = build_method("adamerging", steps=2, batch_size=4, accelerator="cpu").merge(pool)
    assert list(ada.tasks) == list(TASKS)
    check_adamerging_on_clip(pool, ada)


def regmean_reference(pool, layer: str, examples: int, batch_size: int, alpha: float):
    """RegMean's solution for one nn.Linear of the CLIP tower, computed here from scratch:
    G_t = mean over rows (images x tokens) of x x^T of the layer's inputs on task t's train
    inputs, off-diagonals times alpha; W = (sum_t G_t W_t^T)^T solved against sum_t G_t."""
    family = pool.family
    lhs = rhs = 0
    for task in pool.tasks:
        model = family.build_model(task)
        model.load_state_dict(pool.finetuned[task].state_dict(), strict=False)
        model.eval()
        module = model.get_submodule(layer)
        assert isinstance(module, torch.nn.Linear)
        rows = []
        handle = module.register_forward_hook(
            lambda m, args, out, rows=rows: rows.append(
                args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        with torch.no_grad():
            for batch in family.unlabeled_inputs(task, "train", examples, batch_size):
                family.logits(model, batch)
        handle.remove()
        x = torch.cat(rows).double()
        gram = x.T @ x / len(x)
        gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        lhs = lhs + gram
        rhs = rhs + gram @ module.weight.detach().double().T
    return torch.linalg.solve(lhs, rhs).T.float()


def check_regmean_on_clip(pool, merged: dict[str, torch.Tensor]) -> None:
    plan = plan_keys(pool)
    model = pool.family.build_model(TASKS[0])
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    solved = [k for k in plan.merged if k in linear]
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in solved
    for key in plan.merged:
        assert torch.isfinite(merged[key]).all(), key
        models = [pool.finetuned[t].state_dict([key])[key].float() for t in TASKS]
        mean = sum(models) / len(models)
        if key in solved:
            assert not torch.allclose(merged[key], mean, atol=1e-6), key  # not averaged
        else:  # every other merged tensor (norms, embeddings, biases) is the mean
            torch.testing.assert_close(merged[key], mean, rtol=1e-5, atol=1e-6)
    for layer in (
        "vision_model.encoder.layers.0.mlp.fc1",
        "vision_model.encoder.layers.0.self_attn.q_proj",
    ):
        expected = regmean_reference(pool, layer, examples=8, batch_size=4, alpha=0.9)
        torch.testing.assert_close(merged[f"{layer}.weight"], expected, rtol=1e-4, atol=1e-5)


def check_adamerging_on_clip(pool, ada) -> None:
    """Layer-wise AdaMerging: W = W_pre + sum_t lam_t^key tau_t with the reported (clamped)
    coefficients, which two Adam steps of lr 1e-3 move off their init 0.3 by at most 2e-3."""
    plan = plan_keys(pool)
    assert ada.extra["coefficient_keys"] == plan.merged
    assert len(ada.extra["entropy"]) == 2
    lam = torch.tensor([ada.extra["coefficients"][t] for t in TASKS])
    assert lam.shape == (len(TASKS), len(plan.merged))
    assert ((lam - 0.3).abs() <= 2.01e-3).all()  # Adam steps are about lr each
    assert ((lam - 0.3).abs() > 1e-6).any(), "the coefficients were trained"
    merged = ada.state_dict(TASKS[0])
    pre = pool.pretrained.state_dict(plan.merged)
    for column, key in enumerate(plan.merged):
        expected = pre[key].float()
        for row, task in enumerate(TASKS):
            tau = pool.finetuned[task].state_dict([key])[key].float() - pre[key].float()
            expected = expected + lam[row, column] * tau
        torch.testing.assert_close(merged[key].float(), expected, rtol=1e-5, atol=1e-6)


def test_splits_validation_carved_from_train(world):
    cfg = clip_config(world)
    _, data = load_family(cfg.model, cfg.taskset)
    spec = data.spec("eurosat")
    train_source, train = split_rows(spec, "train", 0, data._examples)
    val_source, val = split_rows(spec, "validation", 0, data._examples)
    assert train_source == val_source == "train"
    assert len(val) == 4 and len(train) == 26 and not set(train) & set(val)
    assert len(open_split(spec, "test")) == data.num_examples("eurosat", "test") == 20
    labels = data.labels("eurosat", "test")
    assert labels.dtype == np.int64 and set(labels) == set(range(10))


def test_offline_hub_ids_fail_in_one_line(world, monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))

    cfg = clip_config(world, "model.checkpoints.pretrained=openai/clip-vit-base-patch32")
    with pytest.raises(MergeBenchError) as err:
        load_family(cfg.model, cfg.taskset)
    message = str(err.value)
    assert "\n" not in message
    assert "model.checkpoints.pretrained" in message and "openai/clip-vit-base-patch32" in message
    assert "network" in message and "local path" in message

    cfg = clip_config(
        world, "model.checkpoints.finetuned.mnist=tanganke/clip-vit-base-patch32_mnist"
    )
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(
        MergeBenchError, match=r"finetuned\.mnist.*tanganke/clip-vit-base-patch32_mnist"
    ):
        configured_pool(family, cfg.model, cfg.taskset)

    cfg = clip_config(world, "taskset.data.eurosat.data_dir=null")
    family, data = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError) as err:
        data.labels("eurosat", "test")
    message = str(err.value)
    assert "\n" not in message and "tanganke/eurosat" in message
    assert "network" in message and "taskset.data.eurosat.data_dir" in message


def test_bad_local_paths_and_config_name_the_key(world):
    cfg = clip_config(world, f"model.checkpoints.finetuned.mnist={world['root'] / 'nope'}")
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError, match=r"model\.checkpoints\.finetuned\.mnist: .*nope"):
        configured_pool(family, cfg.model, cfg.taskset)
    cfg = clip_config(world, "model.checkpoints.finetuned.mnist=null")
    family, _ = load_family(cfg.model, cfg.taskset)
    with pytest.raises(MergeBenchError, match=r"finetuned\.mnist: no fine-tuned checkpoint"):
        configured_pool(family, cfg.model, cfg.taskset)
    cfg = clip_config(world, f"taskset.data.mnist.data_dir={world['root'] / 'missing'}")
    _, data = load_family(cfg.model, cfg.taskset)
    with pytest.raises(
        MergeBenchError, match=r"taskset\.data\.mnist\.data_dir: .*missing not found"
    ):
        data.labels("mnist", "test")
    # A vision tower is not a pretrained CLIP model: it has no text tower for the heads.
    cfg = clip_config(world, f"model.checkpoints.pretrained={world['root'] / 'ft_mnist'}")
    with pytest.raises(MergeBenchError, match="model.checkpoints.pretrained"):
        family, _ = load_family(cfg.model, cfg.taskset)
        family.head_tensors("mnist")
    with initialize_config_dir(str(conf_dir()), version_base=None):
        text = compose("config", overrides=["model=clip_vit_b32", "taskset=glue8"])
    with pytest.raises(MergeBenchError, match="taskset.family"):
        load_family(text.model, text.taskset)


def test_bench_run_clip8_emr_on_local_copies(world, monkeypatch, capsys):
    """What `mergebench model=clip_vit_b32 taskset=clip8 method=emr` runs, in process: the
    reference rows come from the configured pool (no zoo), the run is stored."""
    from mergebench.bench import job as bench

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world["root"] / "bench_cache"))
    store = world["root"] / "results.sqlite"
    cfg = clip_config(world, f"store.path={store}", "progress=false")
    summary = bench.run(cfg)
    assert [s["task"] for s in summary["scores"]] == list(TASKS)
    out = capsys.readouterr().out
    assert "individual" in out and "pretrained" in out and "multitask" not in out
    refs = world["root"] / "bench_cache" / "paper" / "clip_vit_b32" / "references" / "clip8.json"
    import json

    rows = json.loads(refs.read_text())["rows"]
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)

    class Individual:
        def state_dict(self, task):
            return pool.finetuned[task].state_dict()

    expected = {s.task: s.value for s in evaluate(Individual(), data)}
    assert {s["task"]: s["value"] for s in rows["individual"]["scores"]} == pytest.approx(expected)
    assert bench.run(cfg) == {"label": "emr", "skipped": True}  # stored: a rerun is skipped


@pytest.mark.slow
def test_mergebench_cli_clip8_emr(world, tmp_path):
    import subprocess
    import sys

    root = world["root"]
    args = [
        "model=clip_vit_b32", "taskset=clip8", "method=emr", f"taskset.tasks=[{','.join(TASKS)}]",
        f"model.checkpoints.pretrained={world['pretrained']}",
        *(f"model.checkpoints.finetuned.{t}={root / f'ft_{t}'}" for t in TASKS),
        *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
        f"taskset.cache_dir={root / 'datasets_cache'}", f"store.path={tmp_path / 'r.sqlite'}",
        f"hydra.run.dir={tmp_path / 'run'}", "progress=false",
    ]  # fmt: skip
    env = {"MERGEBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).with_name("mergebench")
    done = subprocess.run(
        [str(cli), *args], capture_output=True, text=True, env={**__import__("os").environ, **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "emr" in done.stdout and "eurosat" in done.stdout and "mnist" in done.stdout
    bad = subprocess.run(
        [str(cli), *args, "model.checkpoints.finetuned.mnist=tanganke/clip-vit-base-patch32_mnist"],
        capture_output=True, text=True, env={**__import__("os").environ, **env},
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "tanganke/clip-vit-base-patch32_mnist" in bad.stderr and "network" in bad.stderr


def _patterned(kind: str, per_class: int, seed: int):
    """Ten classes told apart by where a bright band lies (rows or columns)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(10):
        for _ in range(per_class):
            x = rng.normal(100, 20, (20, 20, 3))
            if kind == "rows":
                x[2 * c : 2 * c + 2] += 120
            else:
                x[:, 2 * c : 2 * c + 2] += 120
            images.append(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)))
            labels.append(c)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.mark.slow
def test_fine_tuned_towers_beat_zero_shot_and_merge(world, tmp_path):
    """Vision towers really fine-tuned here against the frozen zero-shot heads (as FusionBench
    trains its checkpoints), saved as CLIPVisionModel folders: each beats the pretrained
    tower on its task, and EMR keeps part of that gain."""
    import datasets
    from safetensors.torch import save_file

    from mergebench.evaluation import average
    from mergebench.sources.configured import PoolReferences

    for i, (task, kind) in enumerate(zip(TASKS, ("rows", "columns"), strict=True)):
        datasets.DatasetDict(
            {"train": _patterned(kind, 12, 10 * i), "test": _patterned(kind, 5, 10 * i + 1)}
        ).save_to_disk(str(tmp_path / task))
    data_dirs = [f"taskset.data.{t}.data_dir={tmp_path / t}" for t in TASKS]
    cfg = clip_config(world, *data_dirs, "taskset.examples.validation=10")
    family, data = load_family(cfg.model, cfg.taskset)
    pretrained = configured_pool(family, cfg.model, cfg.taskset).pretrained.state_dict()
    towers = []
    for task in TASKS:
        torch.manual_seed(0)
        model = family.build_model(task)
        model.load_state_dict({**pretrained, **family.head_tensors(task)})
        tower = [p for n, p in model.named_parameters() if n.startswith("vision_model.")]
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("vision_model."))  # the head stays frozen
        optimizer = torch.optim.AdamW(tower, lr=2e-3)
        batches = list(data.batches(task, "train", 16))
        for _ in range(8):
            for batch, labels in batches:
                loss = F.cross_entropy(family.logits(model, batch), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        folder = tmp_path / f"tuned_{task}"
        folder.mkdir()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file({k: v for k, v in state.items() if k.startswith("vision_model.")},
                  str(folder / "model.safetensors"))  # fmt: skip
        family.config.vision_config.save_pretrained(folder)
        towers.append(f"model.checkpoints.finetuned.{task}={folder}")
    cfg = clip_config(world, *data_dirs, *towers, "taskset.examples.validation=10")
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    zero_shot = {s.task: s.value for s in evaluate(PoolReferences("pretrained", pool), data)}
    individual = {s.task: s.value for s in evaluate(PoolReferences("individual", pool), data)}
    emr = evaluate(build_method("emr").merge(pool), data)
    for task in TASKS:
        assert individual[task] >= zero_shot[task] + 0.2, (task, individual, zero_shot)
    assert average(emr) > sum(zero_shot.values()) / len(zero_shot) + 0.1


def test_configured_hub_ids_resolve_through_the_hub_cache(world, monkeypatch, tmp_path):
    """The config's own ids (openai/clip-vit-base-patch32, tanganke/..._eurosat) go through
    huggingface_hub: offline, a populated hub cache serves them, as after a first download."""
    import shutil

    from huggingface_hub import constants

    root = world["root"]
    cache = tmp_path / "hub"
    repos = {
        "openai/clip-vit-base-patch32": world["pretrained"],
        **{f"tanganke/clip-vit-base-patch32_{t}": root / f"ft_{t}" for t in TASKS},
    }
    for repo, folder in repos.items():
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / "0123abcd")
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=clip_vit_b32",
                "taskset=clip8",
                f"taskset.tasks=[{','.join(TASKS)}]",
                f"model.options.head_cache={root / 'heads'}",
                f"taskset.cache_dir={root / 'datasets_cache'}",
                *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
            ],
        )
    assert cfg.model.checkpoints.pretrained == "openai/clip-vit-base-patch32"
    pool, data = load_pool(cfg.model, cfg.taskset, zoo_dir="/nonexistent", seed=0)
    assert pool.finetuned["eurosat"].source.files()[0].is_relative_to(cache)
    scores = evaluate(build_method("task_arithmetic").merge(pool), data)
    assert [s.task for s in scores] == list(TASKS)
