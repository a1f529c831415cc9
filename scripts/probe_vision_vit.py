"""Linear probes of the pretrained DINOv2 ViT-S/14 on the `vision_vit` task set: what the
fine-tuned single-task models must clearly beat (docs/benchmark.md).

    python scripts/probe_vision_vit.py                    # the task set's splits, seed 0
    python scripts/probe_vision_vit.py --image-size 42 --max-test 500 --threads 1

Per task: the frozen backbone's class token (after the final norm) of the task set's train
split, at the family's input size and preprocessing, a logistic regression (scikit-learn,
standardised features, C = 1), accuracy on (at most `--max-test` of) the test split. Prints
a Markdown table row per task and the forward speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mergebench.families import embedded_family
from mergebench.families.dinov2_onnx import timm_backbone
from mergebench.families.labeled import LabeledData
from mergebench.util.config import compose_config


def features(data: LabeledData, model: torch.nn.Module, task: str, split: str, limit: int | None):
    xs, ys, images, seconds = [], [], 0, 0.0
    with torch.inference_mode():
        for batch, labels in data.batches(task, split, 64):
            start = time.perf_counter()
            xs.append(model(batch["pixel_values"]).numpy())
            seconds += time.perf_counter() - start
            ys.append(np.asarray(labels))
            images += len(labels)
            if limit is not None and images >= limit:
                break
    x, y = np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
    return x, y, images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    torch.set_num_threads(args.threads)
    overrides = ["model=dinov2_vits14", "taskset=vision_vit"]
    if args.image_size:
        overrides.append(f"model.options.image_size={args.image_size}")
    cfg = compose_config(overrides)
    family, data = embedded_family(cfg["model"], cfg["taskset"], args.seed)
    model = timm_backbone(family.image_size)
    print(f"| task | train | test | linear probe ({family.image_size} px) |")
    print("| --- | ---: | ---: | ---: |")
    speeds = []
    for task in data.tasks:
        x_train, y_train, s1 = features(data, model, task, "train", None)
        x_test, y_test, s2 = features(data, model, task, "test", args.max_test)
        speeds += [s1, s2]
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        accuracy = probe.fit(x_train, y_train).score(x_test, y_test)
        print(f"| {task} | {len(y_train)} | {len(y_test)} | {accuracy:.3f} |", flush=True)
    print(f"forward: {np.median(speeds):.0f} images/s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
