"""Class names and prompt templates of the CLIP vision tasks (clip8, clip14, clip20), as data
(`clip_prompts.json` beside this module: task -> {"classnames": [...], "templates": [...]}).

They are those of the task_vectors code (Ilharco et al., 2023) that FusionBench re-used to
fine-tune its CLIP checkpoints: those models were trained against the zero-shot heads built
from exactly these names and templates, so any other wording lowers their accuracy. Class
order is the order of the data sets' labels (tanganke/* and the hub copies of MNIST, SVHN).
A template's `{}` is replaced by the class name.

The twelve tasks of clip14/clip20 (stl10 ... kmnist) are copied from FusionBench's
`fusion_bench/tasks/clip_classification/<task>.py` (tanganke/fusion_bench@54c9e8c;
cifar100: its `fine_label` list, typo `cra` included, as FusionBench's heads use it), the
classes of the hub sets FusionBench evaluates on; their templates equal those of the TALL-masks
code (nik-dim/tall_masks, src/datasets/templates.py). TALL masks takes class names from
torchvision's data sets instead, and its EMNIST is the `digits` split, not `emnist_letters`
(docs/paper-settings.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True)
class PromptSet:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def load_prompts(name: str = "clip_prompts.json") -> dict[str, PromptSet]:
    """The packaged prompt sets, by task name."""
    table = json.loads(files(__package__).joinpath(name).read_text(encoding="utf-8"))
    return {
        task: PromptSet(tuple(entry["classnames"]), tuple(entry["templates"]))
        for task, entry in table.items()
    }


PROMPTS: dict[str, PromptSet] = load_prompts()
