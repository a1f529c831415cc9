"""A checkpoint seen under other key names: the key names of the model that runs it.

The same weights are saved under different names: a GPT-2 hub checkpoint is a bare
`GPT2Model` (`h.0.attn...`) while its classifier is `transformer.h.0.attn...`; transformers
5 saves a `CLIPVisionModel` without the `vision_model.` prefix that version 4 (and every
FusionBench checkpoint) has. Keys the model does not have (a language-model head, the text
tower of a full CLIP model, old buffers such as `position_ids`) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mergebench.engine.checkpoints import TensorReader
from mergebench.util.errors import MergeBenchError


class CanonicalSource(TensorReader):
    """A checkpoint seen under the key names of a family's model, plus extra tensors that
    the family supplies (CLIP's zero-shot head). Read lazily, one key at a time."""

    def __init__(
        self,
        source: TensorReader,
        names: Mapping[str, str],
        extra: Mapping[str, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        self.source = source
        self.name = name or source.name
        self._names = dict(names)  # our key -> the source's key
        self._extra = dict(extra or {})

    def keys(self) -> list[str]:
        return list(self._names) + list(self._extra)

    def __contains__(self, key: str) -> bool:
        return key in self._names or key in self._extra

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._extra:
            return tuple(self._extra[key].shape)
        return self.source.shape(self._source_key(key))

    def dtype(self, key: str) -> torch.dtype:
        if key in self._extra:
            return self._extra[key].dtype
        return self.source.dtype(self._source_key(key))

    def get(self, key: str) -> torch.Tensor:
        if key in self._extra:
            return self._extra[key]
        return self.source.get(self._source_key(key))

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        if key in self._extra:
            return super().read_into(key, out)
        return self.source.read_into(self._source_key(key), out)  # the source's fast path

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        if key in self._extra:
            return super().read_rows_into(key, out, start)
        return self.source.read_rows_into(self._source_key(key), out, start)

    def files(self) -> list[Path]:
        # A saved result refers to the pretrained file by path and reopens it with its own
        # key names: that only works when we did not rename or add anything.
        renamed = any(ours != theirs for ours, theirs in self._names.items())
        return [] if renamed or self._extra else self.source.files()

    def _source_key(self, key: str) -> str:
        try:
            return self._names[key]
        except KeyError:
            raise self._missing(key) from None


def canonical_source(
    source: TensorReader,
    wanted: Iterable[str],
    prefix: str,
    option: str,
    optional: Iterable[str] = (),
    extra: Mapping[str, torch.Tensor] | None = None,
) -> CanonicalSource:
    """`source` under the names in `wanted` (the model's keys): each found as it is, or
    without the model's base prefix (`prefix.`), or with one. `optional` keys may be absent
    (a task head in a pretrained checkpoint)."""
    have = set(source.keys())
    names: dict[str, str] = {}
    optional = set(optional)
    for key in wanted:
        candidates = [key]
        if key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1 :])
        else:
            candidates.append(f"{prefix}.{key}")
        found = next((c for c in candidates if c in have), None)
        if found is not None:
            names[key] = found
        elif key not in optional:
            raise MergeBenchError(
                f"{option}: {source.name} lacks key {key!r} of the model (is it the right "
                "checkpoint for this model family?)"
            )
    return CanonicalSource(source, names, extra=extra)


__all__ = ["CanonicalSource", "canonical_source"]
