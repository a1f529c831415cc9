"""Task sets of the embedded offline benchmark: real data from installed packages, seeded
splits, and one torchmetrics metric per task.

`TASKS` names every task; a task set (conf/taskset/*.yaml) picks some of them for one
model family. `load_splits` is cached per process so that a Hydra multirun reads and
splits each data set once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from mergebench.data.embedded import packaged_vision, sources
from mergebench.data.embedded.sources import RawData
from mergebench.data.metrics import METRICS, build_metric
from mergebench.data.splits import SPLITS, Split, SplitSizes, TaskSplits, make_splits
from mergebench.util.errors import MergeBenchError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: Literal["text", "image"]
    load: Callable[[], RawData]
    description: str
    metric: str = "accuracy"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("rt_sentiment", "text", sources.rt_sentiment, "movie review sentiment"),
        TaskSpec("rt_subjectivity", "text", sources.rt_subjectivity, "review vs plot summary"),
        TaskSpec("bbc_news", "text", sources.bbc_news, "news topic, 5 classes"),
        TaskSpec("debate_party", "text", sources.debate_party, "2016 debates: speaker's side"),
        TaskSpec("word_polarity", "text", sources.word_polarity, "General Inquirer polarity"),
        TaskSpec("moral_foundation", "text", sources.moral_foundation, "MFD 2.0 foundation"),
        TaskSpec("fashion_mnist", "image", sources.fashion_mnist, "clothing, 10 classes"),
        TaskSpec("mnist", "image", sources.mnist, "handwritten digits 28x28"),
        TaskSpec("digits", "image", sources.digits, "handwritten digits 8x8"),
        TaskSpec("faces", "image", sources.faces, "LFW face vs non-face"),
        TaskSpec("animal_mnist", "image", packaged_vision.animal_mnist, "animal silhouettes"),
        TaskSpec("emoji", "image", packaged_vision.emoji, "Noto emoji category, colour"),
        TaskSpec("openclipart", "image", packaged_vision.openclipart, "clip art subject, colour"),
        TaskSpec("textures", "image", packaged_vision.textures, "texture photo patches"),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise MergeBenchError(f"taskset.tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


@lru_cache(maxsize=64)
def load_raw(name: str) -> RawData:
    return get_task(name).load()


@lru_cache(maxsize=64)
def load_splits(name: str, train: int, validation: int, test: int, seed: int) -> TaskSplits:
    """Seeded splits of one task (cached: loading BBC or Fashion-MNIST takes a second)."""
    return make_splits(name, load_raw(name), SplitSizes(train, validation, test), seed)


__all__ = [
    "METRICS",
    "SPLITS",
    "TASKS",
    "RawData",
    "Split",
    "SplitSizes",
    "TaskSpec",
    "TaskSplits",
    "build_metric",
    "get_task",
    "load_raw",
    "load_splits",
]
