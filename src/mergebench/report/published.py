"""Numbers published in the EMR-Merging paper (NeurIPS 2024), quoted from
`docs/paper-results.md`, for the leaderboard's "published" column and the plots.

Data only: each setting says which of our family / task-set names it matches, the paper's
unit (percent or fraction), its averages per method, and per-task numbers where the paper
gives them. Values are stored exactly as the paper prints them; `Setting.fraction()` turns
them into our unit (a fraction in [0, 1], as torchmetrics reports).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


def norm(name: str) -> str:
    """Lower-case alphanumerics only, so `ViT-B/32`, `vit_b32` and `vitb32` compare equal."""
    return re.sub(r"[^a-z0-9+]", "", name.lower())


# Leaderboard labels (the method registry names, reference rows and ablation variants) and
# the paper's row names. Several labels may point to one paper row.
LABEL_ALIASES: dict[str, list[str]] = {
    "individual": ["individual"],
    "multitask": ["multitask", "traditional_mtl", "mtl"],
    "weight_averaging": ["weight_averaging", "averaging"],
    "fisher": ["fisher", "fisher_merging"],
    "regmean": ["regmean"],
    "task_arithmetic": ["task_arithmetic"],
    "ties": ["ties", "ties_merging"],
    "adamerging": ["adamerging"],
    "adamerging++": ["adamerging++", "adamerging_ties", "adamerging (ties)"],
    "emr": ["emr", "emr_merging"],
    # Table 8 ablations of EMR.
    "emr (elect)": ["emr (elect)", "emr elect only", "emr w/o mask w/o rescale", "elect"],
    "emr (elect+mask)": ["emr (elect+mask)", "emr w/o rescale", "elect & mask"],
    "emr (elect+rescale)": ["emr (elect+rescale)", "emr w/o mask", "elect & rescale"],
    # Table 7: masks and rescalers on top of other methods.
    "task_arithmetic w/ M&R": ["task_arithmetic w/ M&R", "mask_rescale (task_arithmetic)"],
    "ties w/ M&R": ["ties w/ M&R", "mask_rescale (ties)"],
    "adamerging++ w/ M&R": ["adamerging++ w/ M&R", "mask_rescale (adamerging++)"],
}
_ALIAS_TO_LABEL = {norm(a): label for label, aliases in LABEL_ALIASES.items() for a in aliases}


def canonical_label(label: str) -> str | None:
    """The paper row a leaderboard label corresponds to, or None."""
    return _ALIAS_TO_LABEL.get(norm(label))


@dataclass(frozen=True)
class Setting:
    """One experimental setting of the paper (a backbone and a task set)."""

    key: str
    title: str
    n_tasks: int  # the paper's number of tasks; a subset of them is a different setting
    families: tuple[str, ...]
    tasksets: tuple[str, ...]
    unit: str  # "percent" or "fraction": how the paper prints its numbers
    average: dict[str, float]
    tasks: tuple[str, ...] = ()
    # Aliases of each task name in `tasks` (same order), for matching our task names.
    task_aliases: tuple[tuple[str, ...], ...] = ()
    per_task: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # Number of merged tasks -> average, per method (Fig. "score against number of tasks").
    num_tasks: dict[str, dict[int, float]] = field(default_factory=dict)

    def fraction(self, value: float) -> float:
        return value / 100.0 if self.unit == "percent" else value

    def matches(self, family: str, taskset: str, n_tasks: int | None = None) -> bool:
        if n_tasks is not None and n_tasks != self.n_tasks:
            return False
        return norm(family) in {norm(f) for f in self.families} and norm(taskset) in {
            norm(t) for t in self.tasksets
        }

    def average_for(self, label: str) -> float | None:
        """The published average for a leaderboard label, as a fraction (None if absent)."""
        canon = canonical_label(label)
        if canon in self.average:
            return self.fraction(self.average[canon])
        if canon in self.per_task:  # the paper gives a per-task table but no average here
            values = self.per_task[canon]
            return self.fraction(sum(values) / len(values))
        return None

    def task_index(self, task: str) -> int | None:
        for i, aliases in enumerate(self.task_aliases):
            if norm(task) in {norm(a) for a in (self.tasks[i], *aliases)}:
                return i
        return None

    def task_score_for(self, label: str, task: str) -> float | None:
        canon = canonical_label(label)
        i = self.task_index(task)
        if canon not in self.per_task or i is None:
            return None
        return self.fraction(self.per_task[canon][i])


_VISION8_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
_VISION8_ALIASES = (
    ("sun397",),
    ("stanford_cars", "stanford-cars", "stanfordcars", "cars"),
    ("resisc45", "resisc"),
    ("eurosat",),
    ("svhn",),
    ("gtsrb",),
    ("mnist",),
    ("dtd",),
)
_VISION8_NAMES = ("vision8", "clip8", "eight", "8tasks", "eight_tasks", "task_arithmetic8")
_GLUE8_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE")
_GLUE8_ALIASES = (
    ("cola",),
    ("sst2",),
    ("mrpc",),
    ("stsb",),
    ("qqp",),
    ("mnli",),
    ("qnli",),
    ("rte",),
)

_VIT_B32_8 = Setting(
    key="vit-b32-8",
    n_tasks=8,
    title="CLIP ViT-B/32, eight vision tasks (EMR-Merging Tables 1, 7, 8)",
    families=(
        "clip-vit-b32",
        "clip-vit-base-patch32",
        "openai/clip-vit-base-patch32",
        "ViT-B-32",
        "vit-b32",
        "clip_b32",
    ),
    tasksets=_VISION8_NAMES,
    unit="percent",
    average={
        "individual": 90.5,
        "multitask": 88.9,
        "weight_averaging": 65.8,
        "fisher": 68.3,
        "regmean": 71.8,
        "task_arithmetic": 70.1,
        "ties": 73.6,
        "adamerging": 80.1,
        "adamerging++": 81.1,
        "emr": 88.7,
        "emr (elect)": 59.3,
        "emr (elect+mask)": 86.8,
        "emr (elect+rescale)": 71.9,
        "task_arithmetic w/ M&R": 76.9,
        "ties w/ M&R": 78.6,
        "adamerging++ w/ M&R": 87.7,
    },
    tasks=_VISION8_TASKS,
    task_aliases=_VISION8_ALIASES,
    per_task={
        "individual": (75.3, 77.7, 96.1, 99.7, 97.5, 98.7, 99.7, 79.4),
        "emr": (75.2, 72.8, 93.5, 99.5, 96.9, 98.1, 99.6, 74.4),
    },
    num_tasks={
        "emr": {2: 77.5, 3: 82.8, 4: 86.7, 5: 88.6, 6: 89.9, 7: 91.0, 8: 88.7},
        "ties": {2: 68.7, 3: 72.0, 4: 75.5, 5: 73.0, 6: 72.8, 7: 75.9, 8: 72.4},
    },
)


_VIT_L14_8 = Setting(
    key="vit-l14-8",
    n_tasks=8,
    title="CLIP ViT-L/14, eight vision tasks (EMR-Merging Table 2)",
    families=(
        "clip-vit-l14",
        "clip-vit-large-patch14",
        "openai/clip-vit-large-patch14",
        "ViT-L-14",
        "vit-l14",
        "clip_l14",
    ),
    tasksets=_VISION8_NAMES,
    unit="percent",
    average={
        "individual": 94.2,
        "multitask": 93.5,
        "weight_averaging": 79.6,
        "fisher": 82.2,
        "regmean": 83.7,
        "task_arithmetic": 84.5,
        "ties": 86.0,
        "adamerging": 90.8,
        "adamerging++": 91.0,
        "emr": 93.7,
    },
)


_VIT_B16_30 = Setting(
    key="vit-b16-30",
    n_tasks=30,
    title="ViT-B/16 (ImageNet-21k), thirty vision tasks (EMR-Merging Table 3)",
    families=("vit-b16", "vit-b16-in21k", "google/vit-base-patch16-224-in21k", "vit_b16"),
    tasksets=("vision30", "thirty", "30tasks"),
    unit="percent",
    average={
        "individual": 93.02,
        "weight_averaging": 42.52,
        "regmean": 68.14,
        "task_arithmetic": 48.89,
        "ties": 37.53,
        "adamerging": 60.25,
        "emr": 89.54,
    },
)


SETTINGS: tuple[Setting, ...] = (
    _VIT_B32_8,
    _VIT_L14_8,
    # The paper's own CLIP setting: task_vectors' open_clip checkpoints (families openclip_*),
    # with the same published numbers as the Hugging Face CLIP families above.
    replace(
        _VIT_B32_8,
        key="openclip-vit-b32-8",
        title="open_clip ViT-B-32 (task_vectors checkpoints), eight vision tasks (EMR-Merging Tables 1, 7, 8)",
        families=("openclip_vit_b32", "openclip-vit-b32", "open_clip ViT-B-32"),
    ),
    replace(
        _VIT_L14_8,
        key="openclip-vit-l14-8",
        title="open_clip ViT-L-14 (task_vectors checkpoints), eight vision tasks (EMR-Merging Table 2)",
        families=("openclip_vit_l14", "openclip-vit-l14", "open_clip ViT-L-14"),
    ),
    _VIT_B16_30,
    # Our own fine-tuned checkpoints of the thirty tasks (the paper's are not public).
    replace(
        _VIT_B16_30,
        key="vit-b16-in21k-30",
        title="timm ViT-B/16 (ImageNet-21k), thirty vision tasks (EMR-Merging Table 3; our own fine-tuned checkpoints)",
        families=("vit_b16_in21k",),
        tasksets=("vit30",),
    ),
    Setting(
        key="roberta-glue8",
        n_tasks=8,
        title="RoBERTa-base, eight GLUE tasks (EMR-Merging Table 4; averages derived from the per-task numbers)",
        families=("roberta", "roberta-base", "roberta_base"),
        tasksets=("glue8", "glue", "glue_8"),
        unit="fraction",
        average={},
        tasks=_GLUE8_TASKS,
        task_aliases=_GLUE8_ALIASES,
        per_task={
            "individual": (0.6018, 0.9404, 0.8922, 0.9063, 0.9141, 0.8720, 0.9271, 0.7906),
            "weight_averaging": (0.1396, 0.6411, 0.6936, 0.3184, 0.7536, 0.4219, 0.5870, 0.5523),
            "regmean": (0.3667, 0.9060, 0.7574, 0.6268, 0.8355, 0.7002, 0.8235, 0.5848),
            "task_arithmetic": (0.1878, 0.8589, 0.7990, 0.7403, 0.8378, 0.5908, 0.6967, 0.6209),
            "ties": (0.2048, 0.8440, 0.8113, 0.5819, 0.8570, 0.6465, 0.7481, 0.4296),
            "emr": (0.3996, 0.9335, 0.8627, 0.8277, 0.8972, 0.8545, 0.8957, 0.7437),
        },
    ),
    Setting(
        key="gpt2-glue7",
        n_tasks=7,
        title="GPT-2, seven GLUE tasks (EMR-Merging Table 5)",
        families=("gpt2", "gpt-2"),
        tasksets=("glue7", "glue", "glue_7"),
        unit="percent",
        average={
            "weight_averaging": 56.1,
            "fisher": 58.7,
            "regmean": 68.8,
            "task_arithmetic": 70.0,
            "ties": 70.0,
            "emr": 80.4,
        },
    ),
    Setting(
        key="t0-ia3-11",
        n_tasks=11,
        title="(IA)3 adapters on T0-3B, eleven tasks (EMR-Merging Table 6)",
        families=("t0-3b", "t0_3b", "t0-3b-ia3", "ia3"),
        tasksets=("t0-11", "ia3-11", "eleven", "t0_held_out"),
        unit="percent",
        average={
            "individual": 71.4,
            "weight_averaging": 58.0,
            "fisher": 62.2,
            "regmean": 58.0,
            "task_arithmetic": 63.9,
            "ties": 66.4,
            "emr": 67.1,
        },
    ),
)


def find_setting(family: str, taskset: str, n_tasks: int | None = None) -> Setting | None:
    """The paper setting whose backbone and task set (and number of tasks, if given) match
    ours, if any."""
    for setting in SETTINGS:
        if setting.matches(family, taskset, n_tasks):
            return setting
    return None
