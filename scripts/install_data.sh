#!/usr/bin/env bash
# Fashion-MNIST for the vision task set, from Debian's dataset-fashion-mnist package.
# Installs it when we are root and it is missing; otherwise prints how. Never fails the
# build: without it only the fashion_mnist task is unavailable (with a clear error).
set -u
DIR="${MERGEBENCH_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
    echo "data: Fashion-MNIST found in $DIR"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "data: installing dataset-fashion-mnist (Debian) ..."
    if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
        echo "data: Fashion-MNIST installed in /usr/share/datasets/fashion-mnist"
        exit 0
    fi
    echo "data: NOTE: apt-get could not install dataset-fashion-mnist"
else
    echo "data: NOTE: Fashion-MNIST is missing; as root run: apt-get install dataset-fashion-mnist"
    echo "data:       (or point MERGEBENCH_FASHION_MNIST_DIR at a folder with its IDX .gz files)"
fi
exit 0
