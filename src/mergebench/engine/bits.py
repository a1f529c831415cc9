"""Bit packing of masks: 8 entries per byte (little bit order), on the CPU with numpy, on a
GPU with torch ops."""

from __future__ import annotations

import math

import numpy as np
import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor `[N, *shape]` into uint8 `[N, ceil(numel/8)]` (little bit order)."""
    flat = mask.reshape(mask.shape[0], -1)
    if flat.device.type == "cpu":  # numpy's packbits is one fast C loop
        packed = np.packbits(flat.to(torch.bool).numpy(), axis=-1, bitorder="little")
        return torch.from_numpy(packed)
    return _pack_bits_torch(flat)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits` for one row: uint8 `[ceil(numel/8)]` -> bool `shape`
    (or `[..., ceil(numel/8)]` -> bool `[..., *shape]`)."""
    numel = math.prod(shape)
    lead = tuple(packed.shape[:-1])
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), axis=-1, count=numel, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_)).reshape(lead + tuple(shape))
    return _unpack_bits_torch(packed, shape)


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:
    """`pack_bits` in torch ops, for tensors on a GPU: `[N, numel]` -> `[N, ceil(numel/8)]`."""
    flat = flat.to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(flat.shape[0], -1, 8)
    # An 8-term sum of distinct powers of two fits in uint8 exactly.
    return (groups * _BIT_WEIGHTS.to(flat.device)).sum(dim=-1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    lead = tuple(packed.shape[:-1])
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(*lead, -1)[..., :numel].reshape(lead + tuple(shape))
