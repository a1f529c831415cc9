"""Caption decoding for BEiT-3's masked-LM captioner, model-agnostic: a `step` callable gives
the next-token logits at the last position of each prefix (a [MASK] slot), so the search
itself is testable with a stub scorer.

`beam` is the decoding of unilm's `CaptioningHandler.eval_batch` (beit3/engine_for_finetuning.py)
with `utils.BeamHypotheses`: `num_beams` beams (default 3, `--num_beams`), the best 3 x beams
candidates per step (`TOPN_PER_BEAM`), a candidate ending in [eos] is a finished hypothesis
scored `sum log p / len ** length_penalty` (default 0.6, `--length_penalty`) where `len` counts
[bos], the words and the [eos] slot; at the last step (length `max_len - 1`, from
`--num_max_bpe_tokens`, 64 in the evaluation command) every candidate is a finished
hypothesis of the words before it (the candidate word itself is dropped, as there); an image
is done once no live beam can beat its best hypothesis (`early_stopping=False`); the best one
hypothesis is kept. No repetition penalty, no n-gram blocking, no minimum length: unilm has
none. `greedy` is plain argmax decoding until [eos] (not unilm's beam search with one beam,
which goes on past an [eos] hypothesis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergebench.util.errors import MergeBenchError

# prefix ids [M, L] (last position a [MASK]), owner [M] (the image of each row) -> logits [M, V]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TOPN_PER_BEAM = 3  # unilm: candidates looked at per step = TOPN_PER_BEAM * num_beams
METHODS = ("beam", "greedy")


@dataclass(frozen=True)
class Tokens:
    bos: int
    eos: int
    pad: int
    mask: int


@dataclass(frozen=True)
class CaptionDecoding:
    """How captions are decoded; the defaults are unilm's COCO captioning evaluation."""

    method: str = "beam"
    num_beams: int = 3
    length_penalty: float = 0.6
    max_len: int = 64  # tokens, [bos] and the [eos] slot included

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeBenchError(
                f"model.options.caption_decoding: {self.method!r} is not one of {METHODS}"
            )
        if self.num_beams < 1:
            raise MergeBenchError(f"model.options.caption_beams: {self.num_beams} is below 1")
        if self.max_len < 3:
            raise MergeBenchError(
                f"model.options.caption_max_len: {self.max_len} leaves no room for a word "
                "([bos], a word and [eos] need 3)"
            )

    def decode(self, step: Step, n: int, tokens: Tokens, device: torch.device) -> list[list[int]]:
        """The token ids of `n` captions, [bos] left out (greedy: up to [eos] and padding)."""
        if self.method == "greedy":
            return greedy(step, n, tokens, self.max_len, device)
        return beam_search(
            step, n, tokens, self.num_beams, self.length_penalty, self.max_len, device
        )


def greedy(
    step: Step, n: int, tokens: Tokens, max_len: int, device: torch.device
) -> list[list[int]]:
    """Argmax at each [MASK] after the prefix, until [eos] or `max_len` tokens."""
    text = torch.full((n, max_len), tokens.pad, dtype=torch.long, device=device)
    text[:, 0], text[:, 1] = tokens.bos, tokens.mask
    owner = torch.arange(n, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for cur in range(1, max_len):
        nxt = step(text[:, : cur + 1], owner).argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, tokens.pad), nxt)
        text[:, cur] = nxt
        done |= nxt == tokens.eos
        if bool(done.all()) or cur + 1 == max_len:
            break
        text[:, cur + 1] = tokens.mask
    return [row[1:].tolist() for row in text]


class _Best:
    """unilm's `BeamHypotheses` with one hypothesis kept (`num_keep_best = 1`)."""

    def __init__(self, max_len: int, length_penalty: float) -> None:
        self.max_len = max_len - 1  # as unilm: the [bos] is not counted here
        self.length_penalty = length_penalty
        self.score: float | None = None
        self.hyp: list[int] = []

    def add(self, hyp: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(hyp) ** self.length_penalty
        if self.score is None or score > self.score:  # a tie keeps the earlier one
            self.score, self.hyp = score, hyp

    def is_done(self, best_sum_logprobs: float) -> bool:
        bound = best_sum_logprobs / self.max_len**self.length_penalty
        return self.score is not None and self.score >= bound


def beam_search(
    step: Step,
    n: int,
    tokens: Tokens,
    num_beams: int,
    length_penalty: float,
    max_len: int,
    device: torch.device,
) -> list[list[int]]:
    """unilm's captioning beam search (module docstring), one best caption per image."""
    beams = num_beams
    results = torch.full((n * beams, max_len), tokens.mask, dtype=torch.long, device=device)
    results[:, 0] = tokens.bos
    owner = torch.arange(n, device=device).repeat_interleave(beams)
    scores = torch.zeros(n, beams, device=device)
    scores[:, 1:] = -1e9  # the beams start as copies: only the first one is live
    beam_scores = scores.view(-1)
    best = [_Best(max_len, length_penalty) for _ in range(n)]
    done = [False] * n
    cur_len = 2  # [bos] [MASK]
    # unilm loops up to cur_len == max_len, a step that can finish no hypothesis: stop before.
    while cur_len < max_len:
        logprobs = F.log_softmax(step(results[:, :cur_len], owner).float(), dim=-1)
        vocab = logprobs.shape[-1]
        total = (logprobs + beam_scores[:, None]).view(n, beams * vocab)
        top_scores, top_ids = total.topk(TOPN_PER_BEAM * beams, dim=1, largest=True, sorted=True)
        last = cur_len + 1 == max_len
        chosen: list[tuple[float, int, int]] = []  # (score, word, row it extends)
        for ex in range(n):
            done[ex] = done[ex] or best[ex].is_done(float(top_scores[ex].max()))
            keep: list[tuple[float, int, int]] = []
            if not done[ex]:
                for score, idx in zip(top_scores[ex].tolist(), top_ids[ex].tolist(), strict=True):
                    beam, word = divmod(int(idx), vocab)
                    row = ex * beams + beam
                    if word == tokens.eos or last:
                        best[ex].add(results[row, :cur_len].tolist(), score)
                    else:
                        keep.append((score, word, row))
                    if len(keep) == beams:
                        break
            chosen += keep or [(0.0, tokens.pad, ex * beams)] * beams  # done: padding
        beam_scores = torch.tensor([c[0] for c in chosen], device=device)
        rows = torch.tensor([c[2] for c in chosen], device=device)
        results = results[rows]
        results[:, cur_len - 1] = torch.tensor([c[1] for c in chosen], device=device)
        cur_len += 1
        if all(done):
            break
    return [b.hyp[1:-1] for b in best]  # [bos] and the [eos] slot left out
