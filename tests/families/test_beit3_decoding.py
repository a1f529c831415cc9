"""BEiT-3 caption decoding (families/beit3_decoding.py): unilm's beam search against greedy on
hand-made next-token distributions whose best caption is computed by hand, unilm's
max-length rule, and the options that choose the decoding."""

from __future__ import annotations

import math

import pytest
import torch

from mergebench.families.beit3_decoding import CaptionDecoding, Tokens
from mergebench.util.errors import MergeBenchError

# A six-token vocabulary: the four specials and two words.
BOS, PAD, EOS, A, B, MASK = range(6)
TOKENS = Tokens(bos=BOS, eos=EOS, pad=PAD, mask=MASK)
EPS = {BOS: 1e-6, PAD: 2e-6, MASK: 3e-6}  # distinct, so that no two candidates tie


def scorer(table: dict[int, dict[int, float]], calls: list[torch.Tensor] | None = None):
    """A stub model: the next-token distribution depends on the last word of the prefix
    (the token before the [MASK] slot), as `table[last]` gives it (log-probabilities out)."""

    def step(text: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        assert bool((text[:, -1] == MASK).all())  # the next token is read at a [MASK]
        if calls is not None:
            calls.append(text.clone())
        rows = []
        for last in text[:, -2].tolist():
            probs = dict.fromkeys(range(6), 1e-6) | EPS | table.get(last, {})
            rows.append([math.log(probs[t]) for t in range(6)])
        return torch.tensor(rows)

    return step


# After [bos]: A is likelier than B; after A nothing is sure (greedy keeps taking A); after B
# the caption ends almost surely.
TABLE = {
    BOS: {A: 0.6, B: 0.4},
    A: {EOS: 0.3, A: 0.36, B: 0.34},
    B: {EOS: 0.9, A: 0.05, B: 0.05},
}


def unilm_score(words: list[int], length_penalty: float = 0.6) -> float:
    """unilm's hypothesis score: sum log p (words and [eos]) / len ** lp, where len counts
    [bos], the words and the [eos] slot."""
    prev, total = BOS, 0.0
    for w in [*words, EOS]:
        total += math.log(TABLE[prev][w])
        prev = w
    return total / (len(words) + 2) ** length_penalty


def test_beam_search_finds_the_hand_computed_best_caption_greedy_does_not():
    step = scorer(TABLE)
    beam = CaptionDecoding(method="beam", num_beams=3, length_penalty=0.6, max_len=6)
    greedy = CaptionDecoding(method="greedy", max_len=6)
    # By hand: [B] scores (log .4 + log .9) / 3 ** 0.6 = -0.528, above [A] (-0.887),
    # [A, B] (-0.738), [A, A] (-1.191) and the three-word captions (below -1.0).
    candidates = [[A], [B], [A, A], [A, B], [B, A], [A, A, A], [A, A, B], [A, B, A]]
    best = max(candidates, key=unilm_score)
    assert best == [B] and unilm_score([B]) == pytest.approx(-0.5285, abs=1e-4)
    (caption,) = beam.decode(step, 1, TOKENS, torch.device("cpu"))
    assert caption == [B]
    (plain,) = greedy.decode(step, 1, TOKENS, torch.device("cpu"))
    assert plain == [A, A, A, A, A]  # argmax never reaches [eos] before max_len


def test_beam_search_batches_images_independently_and_stops_early():
    calls: list[torch.Tensor] = []
    # Image 1 sees the same table; the beam rows of both images run together.
    beam = CaptionDecoding(max_len=64)  # unilm's defaults: 3 beams, 0.6, 64 tokens
    captions = beam.decode(scorer(TABLE, calls), 2, TOKENS, torch.device("cpu"))
    assert captions == [[B], [B]]
    assert calls[0].shape == (6, 2)  # 2 images x 3 beams, [bos] [MASK]
    # Done once no candidate can beat [B] (-0.529) even at the longest length: the best
    # candidate at length c is A..A B [eos], log .6 + (c - 4) log .36 + log .34 + log .9,
    # and -0.529 >= that / 63 ** 0.6 first at c = 9, the 8th step (not 62).
    assert len(calls) == 8


def test_beam_search_at_max_len_drops_the_last_candidate_as_unilm_does():
    # [eos] is never likely: every caption runs to max_len = 4, where unilm turns each
    # candidate of the step at length 3 into a hypothesis of the words *before* it.
    table = {BOS: {A: 0.7, B: 0.3}, A: {A: 0.2, B: 0.8}, B: {A: 0.5, B: 0.5}}
    (caption,) = CaptionDecoding(max_len=4).decode(scorer(table), 1, TOKENS, torch.device("cpu"))
    # Best pair: A then B (0.7 * 0.8); the hypothesis kept is [bos] A [slot]: caption [A].
    assert caption == [A]


def test_one_beam_is_not_greedy_it_goes_on_past_an_eos_hypothesis():
    # unilm with --num_beams 1 records [A, eos] and goes on; plain greedy stops at [eos].
    table = {BOS: {A: 0.9, B: 0.1}, A: {EOS: 0.4, B: 0.35, A: 0.25}, B: {EOS: 0.99}}
    cpu = torch.device("cpu")
    (caption,) = CaptionDecoding(num_beams=1, max_len=8).decode(scorer(table), 1, TOKENS, cpu)
    (plain,) = CaptionDecoding(method="greedy", max_len=8).decode(scorer(table), 1, TOKENS, cpu)
    assert plain[:2] == [A, EOS]
    # [A, eos]: (log .9 + log .4) / 3**.6 = -0.529 < [A, B, eos]:
    # (log .9 + log .35 + log .99) / 4**.6 = -0.507.
    assert caption == [A, B]


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"method": "nucleus"}, "caption_decoding"),
        ({"num_beams": 0}, "caption_beams"),
        ({"max_len": 2}, "caption_max_len"),
    ],
)
def test_decoding_options_are_checked(kwargs, option):
    with pytest.raises(MergeBenchError, match=f"model.options.{option}"):
        CaptionDecoding(**kwargs)
