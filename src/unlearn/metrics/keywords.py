"""GRIN's keyword metrics: does the model still produce (or still believe) the answer's key facts?

Anjarlekar & Pombra 2025, "LLM Unlearning using Gradient Ratio-Based Influence Estimation and Noise
Injection" (GRIN), arXiv:2508.06467, evaluate TOFU with Keyword Accuracy and Keyword Confidence:
ROUGE rewards a generation for reproducing function words ("the", "was", "born in"), while what
unlearning must remove is the name, the place, the year. The paper gives no code we could check, so
the key-word rule below is ours:

    key words of a text = its lowercased words (runs of letters/digits, a possessive 's dropped),
                          minus `STOP_WORDS`; numbers are kept; each word counted once.

- keyword accuracy (per example) = |key words of the reference found among the words of the
  generation| / |key words of the reference|. Exact word match, no stemming.
- keyword confidence (per example) = mean over the reference answer's tokens that overlap a key
  word of exp(log p(token)) under teacher forcing. No generation needed: one forward pass.

An example whose reference has no key word (e.g. "Yes.") has no value: NaN, so aggregate with
`np.nanmean` and report how many were NaN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from unlearn.metrics import _inputs
from unlearn.metrics.declare import GENERATED_ROLES, SetData, SetMetric, mean

# English function words: articles, pronouns, auxiliaries, prepositions, conjunctions, and the
# filler verbs and adverbs of TOFU-style answers. Content words, names and numbers stay out.
_STOP_WORD_TEXT = """
    a an the this that these those there here
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    who whom whose which what whatever whoever when where why how
    am is are was were be been being have has had having do does did doing done
    will would shall should can could may might must ought
    and or but nor so yet if then than because as while until although though unless whether
    of at by for with without about against between into through during before after above
    below to from up down in out on off over under again further once upon within along across
    behind beyond toward towards among around via per onto
    all any both each few more most other some such no not only own same too very just also
    even ever still already quite rather really much many several
    s t d ll m o re ve y yes
    i'm i've i'd i'll you're you've you'd you'll we're we've we'd we'll they're they've they'd
    they'll he'd he'll she'd she'll don't doesn't didn't isn't aren't wasn't weren't won't
    wouldn't shouldn't couldn't can't cannot hasn't haven't hadn't
"""
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_POSSESSIVE = re.compile(r"'s$")
# Word-start markers that tokenizers put in token strings instead of a space or newline:
# SentencePiece "▁", byte-level BPE "Ġ" (space) and "Ċ" (newline).
_MARKERS = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": "\n"})


def _normalize(word: str) -> str:
    return _POSSESSIVE.sub("", word.lower().replace("’", "'"))


def _key_word_spans(text: str) -> list[tuple[int, int, str]]:
    spans = []
    for match in _WORD.finditer(text):
        word = _normalize(match.group())
        if word and word not in STOP_WORDS:
            spans.append((match.start(), match.end(), word))
    return spans


def key_words(text: str) -> list[str]:
    """The distinct key words of `text`, in order of first appearance."""
    return list(dict.fromkeys(word for _, _, word in _key_word_spans(text)))


def keyword_accuracy(generations: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Share of each reference's key words that the generation contains, [N]; NaN if none."""
    _inputs.same_length(generations, references, "generations and references")
    out = np.full(len(references), np.nan)
    for i, (generation, reference) in enumerate(zip(generations, references, strict=True)):
        wanted = key_words(reference)
        if wanted:
            produced = {_normalize(word) for word in _WORD.findall(generation)}
            out[i] = sum(word in produced for word in wanted) / len(wanted)
    return out


def keyword_token_mask(token_pieces: Sequence[str], text_length: int | None = None) -> np.ndarray:
    """Which of an answer's tokens overlap one of its key words, [T] bool.

    `token_pieces` must concatenate to the answer text: decode with offsets, or pass the token
    strings of `tokenizer.convert_ids_to_tokens`, whose "▁"/"Ġ"/"Ċ" markers are read as spaces and
    newlines. A token that covers part of a key word (" Par" of "Paris") counts. `text_length`:
    the answer text's length in characters when the pieces go on past it (the scored end-of-turn
    marker, `<|im_end|>`): words starting after it are not the answer's.
    """
    pieces = [piece.translate(_MARKERS) for piece in token_pieces]
    ends = np.cumsum([len(piece) for piece in pieces])
    starts = ends - np.array([len(piece) for piece in pieces], dtype=int)
    mask = np.zeros(len(pieces), dtype=bool)
    for start, end, _ in _key_word_spans("".join(pieces)):
        if text_length is None or start < text_length:
            mask |= (starts < end) & (ends > start)
    return mask


def keyword_confidence(
    token_pieces: Sequence[Sequence[str]],
    token_logprobs: Sequence[ArrayLike],
    text_lengths: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Mean teacher-forced probability of each reference answer's key-word tokens, [N]; NaN if none.

    token_pieces[i]: the reference answer's tokens as strings (see `keyword_token_mask`).
    token_logprobs[i]: log p of each of those tokens given the question and the tokens before it.
    text_lengths[i]: characters of answer text the pieces start with (tokens after it, e.g. an
    end-of-turn marker, are not the answer's words); None: all of them.
    """
    _inputs.same_length(token_pieces, token_logprobs, "token_pieces and token_logprobs")
    logprobs = _inputs.ragged(token_logprobs, "token_logprobs")
    out = np.full(len(logprobs), np.nan)
    for i, (pieces, logp) in enumerate(zip(token_pieces, logprobs, strict=True)):
        if len(pieces) != logp.size:
            raise ValueError(
                f"example {i}: {len(pieces)} token pieces but {logp.size} token log-probs"
            )
        mask = keyword_token_mask(pieces, None if text_lengths is None else text_lengths[i])
        if mask.any():
            out[i] = float(np.mean(np.exp(logp[mask])))
    return out


# ---------------------------------------------------------------------------- declarations
def _keyword_accuracy(data: SetData) -> dict[str, np.ndarray]:
    gens = [r["generation"] for r in data.records]
    return {"keyword_accuracy": keyword_accuracy(gens, list(data.texts))}


def _keyword_confidence(data: SetData) -> dict[str, np.ndarray]:
    """The scored tokens may end with the end-of-turn marker: only the answer text's words count."""
    answers = [r["answer"] for r in data.records]
    return {
        "keyword_confidence": keyword_confidence(
            [a["tokens"] for a in answers],
            [a["token_logprobs"] for a in answers],
            [len(t.strip()) for t in data.texts],
        )
    }


KEYWORD_ACCURACY = SetMetric(
    "keyword_accuracy", _keyword_accuracy, mean, "nanmean",
    frozenset({"generation", "data.text"}), kinds=("qa",), roles=GENERATED_ROLES,
    needs_generation=True,
)  # fmt: skip
KEYWORD_CONFIDENCE = SetMetric(
    "keyword_confidence", _keyword_confidence, mean, "nanmean",
    frozenset({"answer.tokens", "answer.token_logprobs", "data.text"}), kinds=("qa",),
    roles=GENERATED_ROLES,
)  # fmt: skip
