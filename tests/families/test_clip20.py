"""taskset=clip14 / clip20: the configs (hub ids, no network), a run on a tiny CLIP and tiny
local copies of four of the new tasks, each in the format its hub set has (stl10: a
save_to_disk folder; pcam: parquet with a bool label, as 1aurent/PatchCamelyon; fer2013:
webdataset shards with jpg/cls, as clip-benchmark/wds_fer2013; flowers102: parquet with 102
classes, as dpdl-benchmark/oxford_flowers102), landing on a board with intervals; and the rule that
runs of two checkpoint lineages never share a board."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tiny_hf
from hydra import compose, initialize_config_dir

from mergebench.families.clip_prompts import PROMPTS
from mergebench.report.boards import LINEAGE_WHY, build_boards, load_boards
from mergebench.report.render import to_markdown
from mergebench.util.config import conf_dir

EIGHT = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
SIX14 = ["stl10", "oxford_iiit_pet", "flowers102", "cifar100", "pcam", "fer2013"]
SIX20 = ["cifar10", "food101", "fashion_mnist", "rendered_sst2", "emnist_letters", "kmnist"]
TASKS = ("stl10", "pcam", "fer2013", "flowers102")  # the tiny subset run


def _compose(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("size,hub", [("b32", "base-patch32"), ("b16", "base-patch16"), ("l14", "large-patch14")])  # fmt: skip
def test_clip20_and_clip14_compose_with_hub_ids(size, hub):
    cfg = _compose(f"model=clip_vit_{size}", "taskset=clip20")
    assert list(cfg.taskset.tasks) == EIGHT + SIX14 + SIX20
    assert cfg.model.lineage == "fusionbench"
    hub_names = {"oxford_iiit_pet": "oxford-iiit-pet", "flowers102": "oxford_flowers102",
                 "rendered_sst2": "rendered-sst2", "stanford_cars": "stanford-cars"}  # fmt: skip
    for task in cfg.taskset.tasks:
        ft = cfg.model.checkpoints.finetuned[task]
        assert ft == f"tanganke/clip-vit-{hub}_{hub_names.get(task, task)}"
        assert task in PROMPTS, task  # class names and templates for every task
    data = cfg.taskset.data
    assert data.pcam.path == "1aurent/PatchCamelyon" and data.cifar100.path == "tanganke/cifar100"
    assert (data.fer2013.inputs[0], data.fer2013.label) == ("jpg", "cls")
    assert data.food101.splits.test == "validation"
    assert data.emnist_letters.path == "tanganke/emnist_letters"
    clip14 = _compose(f"model=clip_vit_{size}", "taskset=clip14").taskset
    assert list(clip14.tasks) == EIGHT + SIX14
    assert all(clip14.data[t] == data[t] for t in clip14.tasks)
    openclip = _compose(f"model=openclip_vit_{size}", "taskset=clip20").model
    assert openclip.lineage == "tall_masks"
    assert set(openclip.checkpoints.finetuned) >= set(EIGHT + SIX14 + SIX20)


def test_clip20_prompt_sets_match_fusionbench_class_counts():
    counts = {"stl10": 10, "oxford_iiit_pet": 37, "flowers102": 102, "cifar100": 100, "pcam": 2,
              "fer2013": 7, "cifar10": 10, "food101": 101, "fashion_mnist": 10,
              "rendered_sst2": 2, "emnist_letters": 26, "kmnist": 10}  # fmt: skip
    for task, n in counts.items():
        prompts = PROMPTS[task]
        assert len(prompts.classnames) == len(set(prompts.classnames)) == n, task
        assert prompts.templates and all("{}" in t for t in prompts.templates), task
    assert PROMPTS["pcam"].templates == ("this is a photo of {}",)
    assert len(PROMPTS["cifar100"].templates) == 18 and PROMPTS["cifar100"].classnames[0] == "apple"


# ------------------------------------------------------------------------------ tiny world


def _images(labels: list[int], classes: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        base = np.full((20, 20, 3), 255 * (label % 5) / 4)
        out.append(
            Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))
        )
    return out


def _dataset(labels: list[int], classes: int, seed: int, bool_label: bool = False):
    import datasets

    label_feature = (
        datasets.Value("bool") if bool_label else datasets.ClassLabel(num_classes=classes)
    )
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    values = [bool(x) for x in labels] if bool_label else labels
    return datasets.Dataset.from_dict(
        {"image": _images(labels, classes, seed), "label": values}, features=features
    )


def _webdataset_shard(path: Path, labels: list[int], seed: int) -> None:
    """One webdataset tar: `<key>.jpg` and `<key>.cls` per example (clip-benchmark's layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, (image, label) in enumerate(zip(_images(labels, 7, seed), labels, strict=True)):
            for ext, payload in (("jpg", _jpeg(image)), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    import datasets

    root = tmp_path_factory.mktemp("clip14")
    pre = tiny_hf.make_clip(root / "clip")
    for i, task in enumerate(TASKS):
        tiny_hf.make_clip_vision(pre, root / f"ft_{task}", seed=i + 1, prefixed=i % 2 == 0)
    train, test = [0, 1, 2, 3] * 2, [0, 1, 2, 3]
    datasets.DatasetDict(
        {"train": _dataset(train, 10, 0), "test": _dataset(test, 10, 1)}
    ).save_to_disk(str(root / "stl10"))
    tiny_hf.save_parquet_repo(
        root / "pcam",
        {"train": _dataset([0, 1] * 4, 2, 2, True), "test": _dataset([0, 1] * 2, 2, 3, True)},
    )
    _webdataset_shard(root / "fer2013" / "train" / "0.tar", [0, 1, 2, 6] * 2, 4)
    _webdataset_shard(root / "fer2013" / "test" / "0.tar", [0, 1, 2, 6], 5)
    tiny_hf.save_parquet_repo(
        root / "flowers102", {"train": _dataset(train, 102, 6), "test": _dataset(test, 102, 7)}
    )
    return {"root": root, "pretrained": pre}


def clip14_config(world: dict[str, Path], *extra: str):
    root = world["root"]
    return _compose(
        "model=clip_vit_b32",
        "taskset=clip14",
        "method=task_arithmetic",
        f"taskset.tasks=[{','.join(TASKS)}]",
        f"model.checkpoints.pretrained={world['pretrained']}",
        f"model.options.head_cache={root / 'heads'}",
        f"taskset.cache_dir={root / 'datasets_cache'}",
        "taskset.examples.validation=2",
        *(f"model.checkpoints.finetuned.{t}={root / f'ft_{t}'}" for t in TASKS),
        *(f"taskset.data.{t}.data_dir={root / t}" for t in TASKS),
        f"store.path={root / 'results.sqlite'}",
        "progress=false",
        *extra,
    )


def test_clip14_subset_runs_and_lands_on_a_board_with_intervals(world, monkeypatch):
    """`mergebench model=clip_vit_b32 taskset=clip14 method=task_arithmetic` on the local
    copies (as the command line composes it), then the same under another lineage: two
    boards, each with intervals, never one."""
    from mergebench.bench import job as bench

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world["root"] / "bench_cache"))
    summary = bench.run(clip14_config(world))
    assert [s["task"] for s in summary["scores"]] == list(TASKS)
    assert all(0.0 <= s["value"] <= 1.0 for s in summary["scores"])
    bench.run(clip14_config(world, "model.lineage=tall_masks"))

    boards = load_boards(world["root"] / "results.sqlite", family="clip_vit_b32")
    assert sorted(b.lineage for b in boards) == ["fusionbench", "tall_masks"]
    for board in boards:
        assert board.tasks == list(TASKS) and board.lineage in board.title
        labels = {r.label for r in board.rows}
        assert {"task_arithmetic", "individual", "pretrained"} <= labels
        row = board.row("task_arithmetic")
        assert row.average_ci is not None and row.average_ci[0] <= row.average <= row.average_ci[1]
        assert board.published_setting is None  # the published 14-task rows are open_clip's
    assert LINEAGE_WHY in to_markdown(boards)


# ------------------------------------------------------------------------------ boards


def _scores(run_id: int, method: str, family: str, taskset: str, values: dict[str, float]):
    return [
        {"run_id": run_id, "method": method, "label": method, "family": family,
         "taskset": taskset, "task": t, "metric": "accuracy", "value": v}
        for t, v in values.items()
    ]  # fmt: skip


def test_clip20_lineages_never_share_a_board_and_published_rows_follow_lineage():
    tasks = EIGHT + SIX14
    rows = (
        _scores(1, "individual", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.9))
        + _scores(2, "consensus", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.7))
        + _scores(3, "individual", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.5))
        + _scores(4, "consensus", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.4))
    )
    lineages = {1: "tall_masks", 2: "tall_masks", 3: "task_vectors", 4: "task_vectors"}
    boards = {b.lineage: b for b in build_boards(rows, lineages=lineages)}
    assert set(boards) == {"tall_masks", "task_vectors"}
    tall, other = boards["tall_masks"], boards["task_vectors"]
    # Normalized by the individual row of the same lineage only.
    assert tall.row("consensus").normalized_average == pytest.approx(0.7 / 0.9)
    assert other.row("consensus").normalized_average == pytest.approx(0.4 / 0.5)
    # The CART README's TALL-masks numbers: on the tall_masks board, on no other.
    assert tall.published_setting == "openclip-vit-b32-14"
    assert tall.row("consensus").published_average == pytest.approx(0.700)
    assert other.published_setting is None and other.row("consensus").published_average is None
    text = to_markdown(list(boards.values()))
    assert "[tall_masks]" in text and "[task_vectors]" in text and LINEAGE_WHY in text
    assert "CART README" in text
    # FusionBench's own reference numbers: on boards of its lineage only.
    tasks20 = EIGHT + SIX14 + SIX20
    hf = _scores(5, "individual", "clip_vit_b32", "clip20", dict.fromkeys(tasks20, 0.9))
    hf += _scores(6, "individual", "clip_vit_b32", "clip20", dict.fromkeys(tasks20, 0.8))
    by = {b.lineage: b for b in build_boards(hf, lineages={5: "fusionbench", 6: "tall_masks"})}
    fb = by["fusionbench"].row("individual")
    assert by["fusionbench"].published_setting == "clip-vit-b32-20"
    assert fb.published_average == pytest.approx(0.8977, abs=1e-4)
    assert fb.published_scores["pcam"] == pytest.approx(0.8796)
    assert by["tall_masks"].published_setting is None
    # Runs without a lineage (older stores) keep their boards, unlabeled.
    plain = build_boards(rows[: len(tasks) * 2])
    assert len(plain) == 1 and plain[0].lineage is None and "[" not in plain[0].title


def test_clip20_wandb_metrics_read_the_board_of_the_run_lineage():
    from mergebench.report.records import RunRecord, TaskScore
    from mergebench.report.wandb import run_metrics

    tasks = EIGHT + SIX14
    rows = (
        _scores(1, "individual", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.9))
        + _scores(2, "consensus", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.6))
        + _scores(3, "individual", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.8))
        + _scores(4, "consensus", "openclip_vit_b32", "clip14", dict.fromkeys(tasks, 0.6))
    )
    boards = build_boards(rows, lineages={1: "tall_masks", 2: "tall_masks", 3: "x", 4: "x"})
    for lineage, individual in (("tall_masks", 0.9), ("x", 0.8)):
        record = RunRecord(
            method="consensus",
            label="consensus",
            family="openclip_vit_b32",
            taskset="clip14",
            config={"model": {"lineage": lineage}},
            scores=[TaskScore(t, "accuracy", 0.6) for t in tasks],
        )
        normalized = run_metrics(record, boards)["test/normalized_avg"]
        assert normalized == pytest.approx(0.6 / individual)


def test_clip20_published_tsv_m_per_task_on_tall_masks_boards_only():
    """TSV-M's per-task numbers (the TSV authors' results on the TALL-masks checkpoints)
    fill the published column of `method=tsv` rows on tall_masks boards, and no other."""
    tasks = EIGHT + SIX14 + SIX20
    rows = _scores(1, "individual", "openclip_vit_l14", "clip20", dict.fromkeys(tasks, 0.9))
    rows += _scores(2, "tsv", "openclip_vit_l14", "clip20", dict.fromkeys(tasks, 0.8))
    rows += _scores(3, "individual", "openclip_vit_l14", "clip20", dict.fromkeys(tasks, 0.9))
    rows += _scores(4, "tsv", "openclip_vit_l14", "clip20", dict.fromkeys(tasks, 0.8))
    lineages = {1: "tall_masks", 2: "tall_masks", 3: "fusionbench", 4: "fusionbench"}
    boards = {b.lineage: b for b in build_boards(rows, lineages=lineages)}
    tsv = boards["tall_masks"].row("tsv")
    assert boards["tall_masks"].published_setting == "openclip-vit-l14-20"
    assert tsv.published_average == pytest.approx(0.8771, abs=1e-4)  # mean of the 20 tasks
    assert tsv.published_scores["emnist_letters"] == pytest.approx(0.9923)  # their EMNIST
    assert tsv.published_scores["stanford_cars"] == pytest.approx(0.8094)
    # CART's averages stay beside it; the FusionBench board shows none of them.
    assert boards["tall_masks"].row("individual").published_average == pytest.approx(0.941)
    assert boards["fusionbench"].row("tsv").published_average is None
