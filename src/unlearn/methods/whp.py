"""Who's Harry Potter (WHP): fine-tune on what a model that never saw the forget data would predict.

    v_g  = v_base - alpha * relu(v_reinf - v_base)       (logits at one answer position, per token)
    y~_t = argmax_v v_g_t                                 (the "generic" label of position t)
    L    = mean_{answer positions t} CE(softmax(z_theta_t), y~_t)

Eldan & Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs", arXiv:2310.02238.
v_base are the starting model's logits, v_reinf those of a *reinforced* model: the starting model
trained further on the forget data. Tokens whose logit the reinforcement raised are the ones the
forget data made likely, so lowering them by alpha times the increase approximates what a model
without that knowledge would predict; the ReLU keeps tokens the reinforcement lowered from being
promoted. Training towards these labels is ordinary fine-tuning: the loss is bounded below, and the
model is given a plausible alternative continuation instead of being pushed away from the answer
(gradient ascent's failure mode).

The loop trains the reinforced copy before the first step (`Needs.reinforce`), caches its logits
and the starting model's on the forget examples ("reinforced_logits", "logits") and frees it, so
no second model stays in memory during unlearning.

Anchored terms (the paper's second ingredient, `anchors`): the paper replaces idiosyncratic terms
in the forget text by generic ones ("Hogwarts" -> "Mystic Academy"), takes the starting model's
predictions on the translated text and maps them back onto the original tokens. We simplify that to
the token level: where the next original token starts an anchored term (at the first token in which
the term and its generic replacement differ), the label becomes the replacement's token there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs, Reinforce


@dataclass(frozen=True)
class WHPParams:
    # alpha: not stated as a number in the parts of the paper we could check (it calls alpha "a
    # positive coefficient"); 5 is the value public re-implementations of the formula use.
    # reinforce_steps: the paper trains its reinforced model for about 3 epochs on the target;
    # 30 steps are 3 epochs of TOFU forget01 (40 QA) at the loop's default batch size 4. Set it to
    # ~3 * N / batch_size for another forget set of N examples.
    # reinforce_lr: 1e-5, TOFU's fine-tuning learning rate (and this loop's default).
    alpha: float = 5.0  # how far the reinforcement's increase is subtracted from v_base
    reinforce_steps: int = 30  # optimizer steps of plain NLL on the forget data for the copy
    reinforce_lr: float = 1e-5  # learning rate of those steps
    anchors: str | None = None  # JSON file of anchored terms: {term: generic} or {term: [generic]}

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.reinforce_steps < 1:
            raise ValueError(f"reinforce_steps must be >= 1, got {self.reinforce_steps}")
        if not (math.isfinite(self.reinforce_lr) and self.reinforce_lr > 0):
            raise ValueError(f"reinforce_lr must be a finite number > 0, got {self.reinforce_lr}")
        if self.anchors is not None:
            load_anchors(self.anchors)  # a missing or malformed file fails here, in one line


# ---------------------------------------------------------------------------- generic labels
def generic_labels(
    ref_logits: torch.Tensor, reinforced_logits: torch.Tensor, alpha: float
) -> torch.Tensor:
    """argmax over the vocabulary (last axis) of v_base - alpha * relu(v_reinf - v_base)."""
    base = ref_logits.float()
    increase = (reinforced_logits.float() - base).clamp(min=0)
    return (base - alpha * increase).argmax(-1)


def whp_forget_term(
    logits: losses.Logits,
    ref_logits: torch.Tensor,
    reinforced_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    overrides: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE of the logits against the generic labels, the labels [N]) over answer positions.

    As everywhere in `losses`, the logits at position t predict labels[:, t + 1]; the cached
    reference and reinforced logits are aligned the same way. `overrides` [B, T-1] (shifted like
    the labels, -100 = none) replaces the generic label where set (anchored terms).
    """
    student, mask = losses.answer_logits(logits, labels)  # [N, V], answer positions only
    base = ref_logits[:, :-1, :].to(student.device)[mask]
    reinforced = reinforced_logits[:, :-1, :].to(student.device)[mask]
    target = generic_labels(base, reinforced, alpha)
    if overrides is not None:
        forced = overrides.to(target.device)[mask]
        target = torch.where(forced != losses.IGNORE_INDEX, forced, target)
    if student.shape[0] == 0:
        return student.sum(), target  # no answer tokens: a zero that keeps the graph
    return F.cross_entropy(student, target), target


def whp_loss(inputs: LossInputs, params: WHPParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy towards the generic labels on the forget batch; no retain term (the paper)."""
    logits = inputs.forget_logits
    ref_logits = inputs.ref_forget.get("logits")
    reinforced = inputs.ref_forget.get("reinforced_logits")
    if logits is None or ref_logits is None or reinforced is None:
        raise ValueError(
            "WHP needs forget logits and ref_forget['logits'] and ['reinforced_logits'] "
            "(declared in Needs.reference)"
        )
    labels = inputs.forget_labels
    overrides = None
    if params.anchors is not None:
        if not isinstance(inputs.prepared, AnchorMap):
            raise ValueError("WHP with anchors needs the anchored terms (Method.prepare)")
        overrides = anchor_overrides(labels, inputs.prepared)
    forget, target = whp_forget_term(
        logits, ref_logits, reinforced, labels, params.alpha, overrides
    )
    original = labels[:, 1:][labels[:, 1:] != losses.IGNORE_INDEX]
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(losses.nll(logits.detach(), labels)),
        # share of answer tokens whose generic label differs from the data's token: near 0 means
        # the run fine-tunes on the forget answers (reinforce more: steps, lr, or raise alpha)
        "label_changed": float((target != original).float().mean()) if len(original) else 0.0,
    }
    if overrides is not None:  # answer tokens whose label an anchored term set
        logs["anchored"] = float((overrides != losses.IGNORE_INDEX).sum())
    return forget, logs


# ---------------------------------------------------------------------------- anchored terms
def load_anchors(path: str | Path) -> dict[str, str]:
    """{term: generic term} from a JSON object whose values are a string or a non-empty list of
    strings (the first is used: the maps in the WHP literature list alternatives per term)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"anchors file {str(file)!r} does not exist")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"anchors file {str(file)!r} is not valid JSON ({exc})") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"anchors file {str(file)!r} must hold a non-empty JSON object")
    terms: dict[str, str] = {}
    for term, value in raw.items():
        generic = value[0] if isinstance(value, list) and value else value
        if not term.strip() or not isinstance(generic, str) or not generic.strip():
            raise ValueError(
                f"anchors file {str(file)!r}: entry {term!r} must map a non-empty term to a "
                "string or a non-empty list of strings"
            )
        terms[term] = generic
    return terms


# One anchored term as tokens: (term ids, index k of the first token where term and replacement
# differ, the replacement's token at k).
AnchorEntry = tuple[tuple[int, ...], int, int]


@dataclass(frozen=True)
class AnchorMap:
    """Anchored terms in token ids, grouped by first token, longest term first."""

    by_first: dict[int, tuple[AnchorEntry, ...]]


def build_anchor_map(terms: Mapping[str, str], tokenizer) -> AnchorMap:
    """Tokenize every term and its replacement as they appear in running text: after a space and
    at the start of an answer (no space). Pairs identical up to the shorter one are skipped."""
    entries: dict[tuple[int, ...], AnchorEntry] = {}
    for term, generic in terms.items():
        for lead in (" ", ""):
            t = tuple(tokenizer(lead + term, add_special_tokens=False)["input_ids"])
            g = tuple(tokenizer(lead + generic, add_special_tokens=False)["input_ids"])
            k = next((i for i, (a, b) in enumerate(zip(t, g, strict=False)) if a != b), None)
            if t and k is not None and t not in entries:
                entries[t] = (t, k, g[k])
    grouped: dict[int, list[AnchorEntry]] = {}
    for entry in entries.values():
        grouped.setdefault(entry[0][0], []).append(entry)
    return AnchorMap({f: tuple(sorted(e, key=lambda x: -len(x[0]))) for f, e in grouped.items()})


def anchor_overrides(labels: torch.Tensor, anchors: AnchorMap) -> torch.Tensor:
    """[B, T-1] labels forced by anchored terms (-100 elsewhere), aligned with labels[:, 1:].

    Scans each row's label ids for term occurrences (longest first, no overlaps); for one starting
    at label index i, the position predicting the term's k-th token (shifted index i + k - 1) gets
    the replacement's token.
    """
    rows = labels.tolist()
    width = labels.shape[1] - 1
    out = [[losses.IGNORE_INDEX] * width for _ in rows]
    for b, row in enumerate(rows):
        i = 0
        while i < len(row):
            step = 1
            for ids, k, generic in anchors.by_first.get(row[i], ()):
                if tuple(row[i : i + len(ids)]) == ids:
                    if 0 <= i + k - 1 < width:
                        out[b][i + k - 1] = generic
                    step = len(ids)
                    break
            i += step
    return torch.tensor(out, dtype=torch.long, device=labels.device).view(len(rows), width)


def whp_prepare(params: WHPParams, tokenizer) -> AnchorMap | None:
    """The anchored terms as token ids, once per run (None without `anchors`)."""
    if params.anchors is None:
        return None
    return build_anchor_map(load_anchors(params.anchors), tokenizer)


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="whp",
    summary="fine-tune on generic labels: start logits minus alpha times a reinforced model's gain",
    params=WHPParams,
    loss=whp_loss,
    needs=lambda p: Needs(
        reference=("logits", "reinforced_logits"),
        reinforce=Reinforce(steps=p.reinforce_steps, lr=p.reinforce_lr),
    ),
    prepare=whp_prepare,
    citation=(
        "Eldan & Russinovich 2023, Who's Harry Potter? Approximate Unlearning in LLMs, "
        "arXiv:2310.02238; anchored terms simplified to token-level label overrides"
    ),
)
