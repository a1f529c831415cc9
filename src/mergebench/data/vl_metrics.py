"""Vision-language metrics as each task's own evaluation computes them (BEiT-3 tasks).

- VQA accuracy (the VQAv2 evaluation script): answers normalised where the humans disagree
  (punctuation, number words, articles, common contractions); against each of the ten human
  answers left out in turn,
  min(#matches among the other nine / 3, 1); the mean of the ten.
- Retrieval recall@k (unilm's retrieval evaluation): an image query hits when one of its
  captions is among the k best texts; a caption query when its image is among the k best
  images. The task's score is the mean of the six recalls (R@1/5/10, both directions).
- Captioning: BLEU-4, METEOR, ROUGE-L, CIDEr from `pycocoevalcap`, after its PTB tokenizer.
  METEOR and the PTB tokenizer run Java: without `java` METEOR is left out (said in
  `CaptionScores.skipped`) and captions are tokenized by `simple_tokenize` instead.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# --------------------------------------------------------------------------- VQA accuracy
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The evaluation script's contractions written without their apostrophe, most frequent first.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "isnt": "isn't", "itll": "it'll", "ive": "i've", "im": "i'm",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've", "lets": "let's",
    "shes": "she's", "hes": "he's", "its": "it's", "whos": "who's", "wheres": "where's",
}  # fmt: skip
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer processing (punctuation, then digits and articles)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQA accuracy against its (ten) human answers, as the evaluation script
    computes it (answers normalised where they are not all the same)."""
    if not answers:
        return 0.0
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = list(answers)
    if len(set(gts)) > 1:  # the script normalises only where the humans disagree
        pred = normalize_answer(pred)
        gts = [normalize_answer(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        matches = sum(gt == pred for j, gt in enumerate(gts) if j != i)
        scores.append(min(1.0, matches / 3.0))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- retrieval
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalScores:
    """Recalls (fractions) and each image's share of the mean (for the bootstrap)."""

    recalls: dict[str, float]  # tr_r1 .. tr_r10 (image -> text), ir_r1 .. ir_r10
    mean: float
    per_image: np.ndarray


def retrieval_scores(
    image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: Sequence[int]
) -> RetrievalScores:
    """Recall@1/5/10 both ways; `text_image[j]` is the image (row of `image_feats`) of text j.

    `per_image[i]` is the mean of image i's three text-retrieval hits and of its captions'
    mean image-retrieval hits: its mean over images equals `mean` when every image has the
    same number of captions (COCO's five)."""
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    scores = image_feats.float() @ text_feats.float().T  # [images, texts]
    recalls: dict[str, float] = {}
    tr_hits, ir_hits = [], []
    for k in RECALL_KS:
        top_t = scores.topk(min(k, n_txt), dim=1).indices  # texts per image
        tr = (owner[top_t] == torch.arange(n_img)[:, None]).any(dim=1).double()
        top_i = scores.T.topk(min(k, n_img), dim=1).indices  # images per text
        ir = (top_i == owner[:, None]).any(dim=1).double()
        recalls[f"tr_r{k}"], recalls[f"ir_r{k}"] = float(tr.mean()), float(ir.mean())
        tr_hits.append(tr)
        ir_hits.append(ir)
    counts = torch.bincount(owner, minlength=n_img).clamp(min=1).double()
    ir_per_image = [
        torch.zeros(n_img, dtype=torch.float64).index_add_(0, owner, h) / counts for h in ir_hits
    ]
    per_image = (sum(tr_hits) + sum(ir_per_image)) / (2 * len(RECALL_KS))
    order = [f"{d}_r{k}" for d in ("tr", "ir") for k in RECALL_KS]
    mean = float(np.mean([recalls[name] for name in order]))
    return RetrievalScores({n: recalls[n] for n in order}, mean, per_image.numpy())


# --------------------------------------------------------------------------- captioning
@dataclass
class CaptionScores:
    scores: dict[str, float]  # bleu4, meteor, rouge_l, cider
    per_image_cider: np.ndarray  # in the order of the image ids given
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it is missing


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Lower case, punctuation dropped as the PTB tokenizer's output is filtered (no Java)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(
    predictions: Mapping[int, str], references: Mapping[int, Sequence[str]]
) -> CaptionScores:
    """COCO caption metrics of one caption per image against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(predictions)
    res = {i: [{"caption": predictions[i]}] for i in ids}
    gts = {i: [{"caption": c} for c in references[i]] for i in ids}
    skipped: dict[str, str] = {}
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    else:
        why = "no `java` on PATH (install a JRE, e.g. Debian's default-jre-headless)"
        skipped["meteor"] = why
        skipped["ptb_tokenizer"] = why + "; captions tokenized by simple_tokenize"
        gts_t = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in gts.items()}
        res_t = {i: [simple_tokenize(c["caption"]) for c in v] for i, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    cider, per_image = Cider().compute_score(gts_t, res_t)
    rouge, _ = Rouge().compute_score(gts_t, res_t)
    scores = {"bleu4": float(bleu[3]), "cider": float(cider), "rouge_l": float(rouge)}
    if "meteor" not in skipped:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        scores["meteor"] = float(meteor.compute_score(gts_t, res_t)[0])
        close = getattr(meteor, "close", None)
        if close is not None:
            close()
    return CaptionScores(scores, np.asarray(per_image, dtype=np.float64), skipped)


__all__ = [
    "RECALL_KS",
    "CaptionScores",
    "RetrievalScores",
    "caption_scores",
    "java_available",
    "normalize_answer",
    "retrieval_scores",
    "simple_tokenize",
    "vqa_accuracy",
]
