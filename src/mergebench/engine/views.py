"""Checkpoints seen through a change, without copying them: keys hidden or aliased (tied
embeddings), a declared output dtype, and vocabulary rows cut or extended.

Each view is a `TensorReader`, so the stream, the key plan and every method read it
as they read a file. A view that changes the tensors' values (`RowsView` with extra rows,
`DtypeView`) has no backing files: a task-conditioned result then stores the pretrained
tensors it saw instead of a reference to a file that holds other ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mergebench.engine.checkpoints import TensorReader


class SourceView(TensorReader):
    """Delegates everything to the wrapped source."""

    def __init__(self, inner: TensorReader) -> None:
        self.inner = inner
        self.name = inner.name

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(key)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_into(key, out)

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.inner.read_rows_into(key, out, start)

    def files(self) -> list[Path]:
        return self.inner.files()

    def __contains__(self, key: str) -> bool:
        return key in self.inner


class KeyView(SourceView):
    """Some keys hidden (a tied output matrix that is the embedding), others served as
    another key (`{alias: key}`: an untied base's `lm_head.weight` read from a tied
    expert's embedding)."""

    def __init__(
        self,
        inner: TensorReader,
        hidden: frozenset[str] | set[str] = frozenset(),
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(inner)
        self.hidden = set(hidden)
        self.aliases = dict(aliases or {})

    def _key(self, key: str) -> str:
        if key in self.hidden:
            raise self._missing(key)
        return self.aliases.get(key, key)

    def keys(self) -> list[str]:
        own = [k for k in self.inner.keys() if k not in self.hidden]
        return own + [a for a in self.aliases if a not in own]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self._key(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self._key(key))

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self._key(key))

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return self.inner.read_into(self._key(key), out)

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.inner.read_rows_into(self._key(key), out, start)

    def __contains__(self, key: str) -> bool:
        return key not in self.hidden and (key in self.aliases or key in self.inner)


class DtypeView(SourceView):
    """Floating-point tensors declared (and handed out by `get`) in `dtype`: methods write
    their outputs in the pretrained model's dtype, so a view of the base chooses the output
    dtype. `read_into` still gives the stored values exactly (the stream reads float32)."""

    def __init__(self, inner: TensorReader, dtype: torch.dtype) -> None:
        super().__init__(inner)
        self.out_dtype = dtype

    def dtype(self, key: str) -> torch.dtype:
        stored = self.inner.dtype(key)
        return self.out_dtype if stored.is_floating_point else stored

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(key).to(self.dtype(key))

    def files(self) -> list[Path]:
        return []


class RowsView(SourceView):
    """Vocabulary keys with other row counts: `rows[key] = (keep, total)` reads the first
    `keep` rows of the source and takes rows `keep:total` from `fill[key]` (absent: no
    extra rows). Only the kept rows are read, never the whole stored matrix."""

    def __init__(
        self,
        inner: TensorReader,
        rows: Mapping[str, tuple[int, int]],
        fill: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(inner)
        self.rows = dict(rows)
        self.fill = dict(fill or {})

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self.inner.shape(key)
        if key not in self.rows:
            return shape
        return (self.rows[key][1], *shape[1:])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.rows:
            return self.inner.get(key)
        out = torch.empty(self.shape(key), dtype=self.inner.dtype(key))
        return self.read_into(key, out)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        if key not in self.rows:
            return self.inner.read_into(key, out)
        self._check_numel(key, out)
        view = out.view(self.shape(key))
        keep, total = self.rows[key]
        self.inner.read_rows_into(key, view[:keep])
        if total > keep:
            view[keep:].copy_(self.fill[key])
        return out

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        if key not in self.rows:
            return self.inner.read_rows_into(key, out, start)
        self._check_rows(key, out, start)
        keep, stop = self.rows[key][0], start + out.shape[0]
        if start < keep:  # the stored rows straight from the source
            self.inner.read_rows_into(key, out[: min(stop, keep) - start], start)
        if stop > keep:
            first = max(start, keep)
            out[first - start :].copy_(self.fill[key][first - keep : stop - keep])
        return out

    def files(self) -> list[Path]:
        return [] if self.fill else self.inner.files()
