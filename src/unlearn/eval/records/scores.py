"""From logits to per-answer scores: the token-score maths, and which tokens an answer's score covers.

An answer is scored as TOFU and OpenUnlearning score it: every label token after the prompt, i.e.
the answer text, the template's end-of-turn marker and what the template puts after it, and EOS
(`PromptFormatter.label_end_ids`); `score_end=False` scores the answer text alone. A document
(question None) is scored whole, every token but the first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import PromptFormatter, Tokenized


@dataclass
class ScoreItem:
    """An answer to score after its question; a document (question None) is scored whole."""

    question: str | None
    answer: str
    # keep token-level values (only the main answer needs them): True = log-probs, tokens, top-1
    # and the vocabulary moments (Min-K%++); "tokens" = log-probs and tokens only
    detail: bool | str = False


@dataclass
class Score:
    """An answer's summed log-probability and length; token-level values for detailed items.

    `tokens` are the scored token pieces (`convert_ids_to_tokens`), so word-level metrics (key-word
    confidence) can be computed from records without the tokenizer.
    """

    logprob_sum: float
    n_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    vocab_mu: list[float] = field(default_factory=list)
    vocab_sigma: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d: dict = {"logprob_sum": self.logprob_sum, "n_tokens": self.n_tokens}
        if self.token_logprobs:
            d.update(token_logprobs=self.token_logprobs, tokens=self.tokens)
        if self.vocab_mu:
            d.update(top1=self.top1, vocab_mu=self.vocab_mu, vocab_sigma=self.vocab_sigma)
        return d


def answer_ids(
    formatter: PromptFormatter, question: str, answer: str, score_end: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids, scored answer ids): the answer text, plus the end tokens with `score_end`."""
    p_ids, a_ids = formatter.encode_qa(question, answer)
    text = a_ids[: len(a_ids) - len(formatter.end_ids)]
    if score_end or not text:
        return p_ids, text + formatter.label_end_ids
    return p_ids, text


def scored_sequence(
    formatter: PromptFormatter, item: ScoreItem, score_end: bool = True
) -> Tokenized:
    """The whole sequence with labels on the scored tokens only (IGNORE_INDEX elsewhere).

    A document has no prompt: every token but the first (which nothing predicts) is scored, after
    BOS where the tokenizer has one.
    """
    if item.question is None:
        tok = formatter.tokenizer
        ids = tok(item.answer, add_special_tokens=False)["input_ids"]
        head = [tok.bos_token_id] if tok.bos_token_id is not None else ids[:1]
        body = ids if tok.bos_token_id is not None else ids[1:]
        return Tokenized(head + body, [IGNORE_INDEX] * len(head) + body, 0)
    p_ids, a_ids = answer_ids(formatter, item.question, item.answer, score_end)
    return Tokenized(p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids, 0)


def token_scores(
    logits: torch.Tensor, target: torch.Tensor, detail: list[bool | str], tok
) -> list[Score]:
    """Scores of rows of logits [n, T, V] predicting target [n, T] (IGNORE_INDEX where unscored)."""
    mask = target != IGNORE_INDEX
    # Only answer positions matter: take them out before the [*, V] softmax work.
    return flat_scores(logits[mask], target[mask], mask.sum(-1).tolist(), detail, tok)


def flat_scores(
    logits: torch.Tensor, target: torch.Tensor, counts: list[int], detail: list[bool | str], tok
) -> list[Score]:
    """Scores from logits [N, V] predicting each scored token [N], answers one after another
    (`counts[k]` tokens for answer k; `detail[k]` asks for its token-level values)."""
    logits = logits.float()
    # log p(target) = logit - logsumexp: no [*, V] log-softmax for the many non-detailed answers;
    # by row blocks, so logsumexp's [n, V] temporary stays small
    lse = torch.cat([torch.logsumexp(b, dim=-1) for b in logits.split(MOMENT_ROWS)])
    tok_logp = (logits.gather(-1, target[:, None]).squeeze(-1) - lse).cpu()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    detailed = [k for k, d in enumerate(detail) if d is True]
    moments = _moments(logits, lse, target, offsets, detailed) if detailed else None
    out: list[Score] = []
    d = 0  # offset into the detailed positions
    for k, (a, b) in enumerate(itertools.pairwise(offsets)):
        lp = tok_logp[a:b]
        s = Score(logprob_sum=float(lp.sum()), n_tokens=b - a)
        if detail[k]:
            s.token_logprobs = [round(float(x), 5) for x in lp]
            s.tokens = tok.convert_ids_to_tokens(target[a:b].tolist())
        if detail[k] is True and moments is not None:
            top1, mu, sigma, _ = moments
            e = d + (b - a)
            s.top1 = [bool(x) for x in top1[d:e]]
            s.vocab_mu = [round(float(x), 5) for x in mu[d:e]]
            s.vocab_sigma = [round(float(x), 5) for x in sigma[d:e]]
            d = e
        out.append(s)
    return out


def _moments(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    offsets: list[int],
    detailed: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 flags and the mean and std of the vocabulary log-probabilities (Min-K%++) at the
    detailed answers' positions only, in their order: (top1, mu, sigma, target)."""
    pos = torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in detailed]).to(logits.device)
    target_d = target.index_select(0, pos)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # a few hundred positions at a time: [n, V] temporaries stay small (a 2k-token document's
    # whole [T, V] in float32 is ~0.4 GB per temporary on a 49k vocabulary)
    for chunk in pos.split(MOMENT_ROWS):
        lp = logits.index_select(0, chunk) - lse.index_select(0, chunk)[:, None]
        top1 = lp.argmax(-1) == target.index_select(0, chunk)
        p = lp.exp()
        mu = (p * lp).sum(-1)
        # E[(log p - mu)^2], not E[log p^2] - mu^2: the latter cancels badly in float32
        lp.sub_(mu[:, None]).square_()
        sigma = (p.mul_(lp)).sum(-1).sqrt()
        parts.append((top1, mu, sigma))
    top1, mu, sigma = (torch.cat(x) for x in zip(*parts, strict=True))
    return top1.cpu(), mu.cpu(), sigma.cpu(), target_d.cpu()


#: Positions whose vocabulary moments are computed together (bounds the [n, V] temporaries).
MOMENT_ROWS = 256
