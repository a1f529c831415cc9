#!/usr/bin/env bash
# Packaged data for the vision task sets: Debian's dataset-fashion-mnist and openclipart-png
# (apt-get, when we are root), and npm's emoji-datasource-google (into the mergebench cache).
# Never fails the build: without a package only its task is unavailable (with a clear error).
set -u

# apt_data NAME PACKAGE PROBE DEST: install a Debian data package unless PROBE exists.
apt_data() {
    local name=$1 package=$2 probe=$3 dest=$4
    if [ -e "$probe" ]; then
        echo "data: $name found in $dest"
        return
    fi
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "data: installing $package (Debian) ..."
        if apt-get install -y -q "$package" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$package" >/dev/null 2>&1; }; then
            echo "data: $name installed in $dest"
            return
        fi
        echo "data: NOTE: apt-get could not install $package"
    else
        echo "data: NOTE: $name is missing; as root run: apt-get install $package"
    fi
}

FASHION="${MERGEBENCH_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$FASHION/train-images-idx3-ubyte.gz" ] && [ -f "$FASHION/t10k-labels-idx1-ubyte.gz" ]; then
    echo "data: Fashion-MNIST found in $FASHION"
else
    apt_data Fashion-MNIST dataset-fashion-mnist "$FASHION/t10k-labels-idx1-ubyte.gz" "$FASHION"
    [ -f "$FASHION/t10k-labels-idx1-ubyte.gz" ] \
        || echo "data:       (or point MERGEBENCH_FASHION_MNIST_DIR at a folder with its IDX .gz files)"
fi

CLIPART="${MERGEBENCH_OPENCLIPART_DIR:-/usr/share/openclipart/png}"
apt_data "Open Clip Art" openclipart-png "$CLIPART/animals" "$CLIPART"

# Noto emoji (Apache-2.0 images) from npm, into $MERGEBENCH_CACHE/npm unless
# MERGEBENCH_EMOJI_DIR points at an unpacked copy.
EMOJI_PREFIX="${MERGEBENCH_CACHE:-$HOME/.cache/mergebench}/npm"
EMOJI="${MERGEBENCH_EMOJI_DIR:-$EMOJI_PREFIX/node_modules/emoji-datasource-google}"
if [ -f "$EMOJI/emoji.json" ]; then
    echo "data: emoji-datasource-google found in $EMOJI"
elif ! command -v npm >/dev/null 2>&1; then
    echo "data: NOTE: npm is missing, so the emoji task is unavailable (install Node.js and npm)"
elif npm install --prefix "$EMOJI_PREFIX" --no-audit --no-fund --silent \
        emoji-datasource-google@16.0.0 >/dev/null 2>&1; then
    echo "data: emoji-datasource-google installed in $EMOJI_PREFIX/node_modules"
else
    echo "data: NOTE: npm could not install emoji-datasource-google@16.0.0"
fi
exit 0
