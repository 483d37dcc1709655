"""WHP: generic labels and the loss against plain-float hand computations, anchored terms on the
tiny tokenizer and the real term maps, one-line errors, and a real run with its reinforced model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import unlearn
from conftest import SHARED, build_tokenizer
from unlearn.errors import UnlearnError
from unlearn.methods import build_params
from unlearn.methods.base import LossInputs
from unlearn.methods.whp import (
    METHOD,
    WHPParams,
    anchor_overrides,
    build_anchor_map,
    generic_labels,
    load_anchors,
    whp_forget_term,
    whp_loss,
)

FAST = ["train.progress=false", "train.batch_size=2"]
LABELS = torch.tensor([[-100, -100, 1, 3, 0], [-100, 2, 2, 1, -100]])


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(unlearn.methods.METHODS, "whp", METHOD)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model logits, starting logits, reinforced logits), each [2, 5, 4]."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 5, 4, generator=gen) * 2 for _ in range(3))


def hand_generic(base: list[float], reinf: list[float], alpha: float) -> int:
    scores = [b - alpha * max(r - b, 0.0) for b, r in zip(base, reinf, strict=True)]
    return max(range(len(scores)), key=lambda v: scores[v])


def hand_loss(logits, base, reinf, labels, alpha, forced=None) -> tuple[float, list[int]]:
    """Mean over answer tokens of -log softmax(logits[t-1])[generic label], in plain floats."""
    total, targets = 0.0, []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if int(labels[b, t]) == -100:
                continue
            row = [float(v) for v in logits[b, t - 1]]  # position t-1 predicts token t
            y = hand_generic(
                [float(v) for v in base[b, t - 1]], [float(v) for v in reinf[b, t - 1]], alpha
            )
            if forced is not None and (b, t - 1) in forced:
                y = forced[(b, t - 1)]
            total -= row[y] - math.log(sum(math.exp(v) for v in row))
            targets.append(y)
    return total / len(targets), targets


def test_generic_labels_by_hand():
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 0.4, 0.0]])
    reinf = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 0.2, 0.4, 0.1]])
    # row 0: token 0 gained 1.0 and token 2 0.5, so at alpha=2 the scores are [0, 1, -1, -1];
    # row 1: only token 3 gained (0.1), which cannot overtake token 1's 0.5.
    assert generic_labels(base, reinf, 0.0).tolist() == [0, 1]
    assert generic_labels(base, reinf, 2.0).tolist() == [1, 1]
    assert generic_labels(base, reinf, 10.0).tolist() == [1, 1]
    # a lowered logit is never promoted (the ReLU): without it token 1 would score 0 + 5 * 1
    assert generic_labels(torch.tensor([1.0, 0.0]), torch.tensor([1.0, -1.0]), 5.0).tolist() == 0


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
def test_loss_matches_hand_computation(alpha):
    logits, base, reinf = batch(0)
    loss, logs = whp_loss(
        LossInputs(logits, LABELS, ref_forget={"logits": base, "reinforced_logits": reinf}),
        WHPParams(alpha=alpha),
    )
    expected, targets = hand_loss(logits, base, reinf, LABELS, alpha)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert logs["forget_loss"] == pytest.approx(expected, rel=1e-5)
    original = [int(v) for v in LABELS[:, 1:].flatten() if v != -100]
    changed = sum(a != b for a, b in zip(targets, original, strict=True)) / len(original)
    assert logs["label_changed"] == pytest.approx(changed)


def test_loss_gradient_is_cross_entropy_towards_fixed_labels():
    """The labels are constants: d loss / d logits = (softmax - onehot) / N at answer positions."""
    logits, base, reinf = batch(1)
    x = logits.clone().requires_grad_(True)
    loss, target = whp_forget_term(x, base, reinf, LABELS, 5.0)
    loss.backward()
    mask = LABELS[:, 1:] != -100
    expected = torch.zeros_like(logits)
    probs = torch.softmax(logits[:, :-1], -1)
    onehot = torch.zeros_like(probs)
    onehot[mask] = torch.nn.functional.one_hot(target, 4).float()
    expected[:, :-1] = (probs - onehot) * mask[..., None] / mask.sum()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)


def test_overrides_replace_generic_labels():
    logits, base, reinf = batch(2)
    overrides = torch.full((2, 4), -100)
    overrides[0, 2] = 3  # predicts labels[0, 3]
    overrides[1, 0] = 0  # predicts labels[1, 1]
    overrides[1, 3] = 2  # predicts labels[1, 4] = -100: no answer token there, ignored
    loss, target = whp_forget_term(logits, base, reinf, LABELS, 1.0, overrides)
    expected, targets = hand_loss(logits, base, reinf, LABELS, 1.0, {(0, 2): 3, (1, 0): 0})
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert target.tolist() == targets


def test_empty_answer_gives_zero_with_graph():
    logits, base, reinf = batch(3)
    x = logits.clone().requires_grad_(True)
    loss, _ = whp_forget_term(x, base, reinf, torch.full((2, 5), -100), 5.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------- anchored terms
def test_anchor_overrides_on_tiny_tokenizer():
    tok = build_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    term, generic = "Maren Hollister", "Alice Bob"
    amap = build_anchor_map({term: generic}, tok)
    # the answer: the term at its start (no space before it), then again after a space
    parts = [enc(term), enc(" was born in"), enc(" " + term), enc(".")]
    ids = [i for p in parts for i in p]
    labels = torch.tensor([[-100, -100, -100, *ids]])
    over = anchor_overrides(labels, amap)
    assert over.shape == (1, labels.shape[1] - 1)

    def first_diff(a, b):
        return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)

    k0 = first_diff(enc(term), enc(generic))
    k1 = first_diff(enc(" " + term), enc(" " + generic))
    start0, start1 = 3, 3 + len(parts[0]) + len(parts[1])  # label indices of the occurrences
    expected = {start0 + k0 - 1: enc(generic)[k0], start1 + k1 - 1: enc(" " + generic)[k1]}
    got = {j: int(v) for j, v in enumerate(over[0]) if v != -100}
    assert got == expected


def test_anchor_map_prefers_the_longest_term_and_skips_prefix_pairs():
    tok = build_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    amap = build_anchor_map(
        {"Maren": "Alice", "Maren Hollister": "Bob Hollister", "Paris": "Paris"}, tok
    )
    ids = enc("Maren Hollister")
    labels = torch.tensor([[-100, *ids]])
    got = {j: int(v) for j, v in enumerate(anchor_overrides(labels, amap)[0]) if v != -100}
    assert got == {0: enc("Bob Hollister")[0]}  # not "Alice": the full name wins
    assert all(e[0] != tuple(enc("Paris")) for es in amap.by_first.values() for e in es)


@pytest.mark.skipif(not (SHARED / "whp").is_dir(), reason="needs ../shared/data/whp")
def test_load_anchors_reads_the_published_maps():
    terms = load_anchors(SHARED / "whp" / "replace_name_forget10.json")
    raw = json.loads((SHARED / "whp" / "replace_name_forget10.json").read_text())
    assert len(terms) == len(raw) == 20
    assert all(terms[k] == v[0] for k, v in raw.items())  # the first alternative


def test_load_anchors_plain_object_and_errors(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"Hogwarts": "Mystic Academy", "Ron": ["Tom", "Jon"]}))
    assert load_anchors(plain) == {"Hogwarts": "Mystic Academy", "Ron": "Tom"}
    for text in ("[1, 2]", "{}", '{"a": 3}', '{"a": []}', "{not json"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError) as err:
            load_anchors(bad)
        assert "\n" not in str(err.value) and "bad.json" in str(err.value)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"alpha": -1}, "alpha"),
        ({"alpha": "nan"}, "alpha"),
        ({"reinforce_steps": 0}, "reinforce_steps"),
        ({"reinforce_lr": 0}, "reinforce_lr"),
        ({"reinforce_lr": "inf"}, "reinforce_lr"),
        ({"anchors": "/no/such/anchors.json"}, "anchors"),
        ({"beta": 1.0}, "beta"),
    ],
)
def test_invalid_hyperparameters_are_one_line(registered, overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params("whp", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "whp" in msg


def test_loss_applies_anchored_terms(tmp_path):
    tok = build_tokenizer()
    path = tmp_path / "terms.json"
    path.write_text(json.dumps({"Maren Hollister": ["Alice Bob", "Tom"]}))
    params = WHPParams(alpha=1.0, anchors=str(path))
    amap = METHOD.prepare(params, tok)
    ids = tok(" Maren Hollister was born", add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[-100, -100, *ids]])
    gen = torch.Generator().manual_seed(4)
    logits, base, reinf = (torch.randn(1, labels.shape[1], len(tok), generator=gen) for _ in "abc")
    ref = {"logits": base, "reinforced_logits": reinf}
    loss, logs = whp_loss(LossInputs(logits, labels, ref_forget=ref, prepared=amap), params)
    over = anchor_overrides(labels, amap)
    expected, _ = whp_forget_term(logits, base, reinf, labels, 1.0, over)
    assert float(loss) == pytest.approx(float(expected)) and logs["anchored"] == 1
    plain, _ = whp_forget_term(logits, base, reinf, labels, 1.0)
    assert float(plain) != pytest.approx(float(expected))  # the override changed a label
    with pytest.raises(ValueError, match="anchored terms"):
        whp_loss(LossInputs(logits, labels, ref_forget=ref), params)


def test_training_with_anchors(registered, target_dir, qa_files, tmp_path, one_torch_thread):
    forget, _ = qa_files
    path = tmp_path / "terms.json"
    path.write_text(json.dumps({"city": "town"}))
    res = unlearn.forget(
        str(target_dir), str(forget), None, "whp", str(tmp_path / "out"),
        overrides=[*FAST, "train.max_steps=2", "method.reinforce_steps=1", f"method.anchors={path}",
                   "train.nll_check=false"],
    )  # fmt: skip
    assert res.metrics["final_losses"]["anchored"] == 2  # one "city" per answer, 2 per batch


def test_needs_declare_reinforcement():
    needs = METHOD.needs(WHPParams(reinforce_steps=7, reinforce_lr=3e-4))
    assert needs.reference == ("logits", "reinforced_logits") and needs.retain is None
    assert needs.reinforce is not None and (needs.reinforce.steps, needs.reinforce.lr) == (7, 3e-4)


# ---------------------------------------------------------------------------- training
def test_training_raises_forget_nll(registered, target_dir, qa_files, tmp_path, one_torch_thread):
    """A strong reinforcement on the tiny model (which half-memorised the answers) changes most
    labels; with alpha=0 a quarter differ, and 2 steps towards them lower the forget NLL."""
    forget, _ = qa_files
    out = tmp_path / "out"
    res = unlearn.forget(
        str(target_dir), str(forget), None, "whp", str(out),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=2", "method.reinforce_steps=6",
                   "method.reinforce_lr=1e-2", "method.alpha=20"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before, f"forget NLL {before:.4f} -> {after:.4f}"
    final = res.metrics["final_losses"]
    assert final["label_changed"] > 0.5 and "retain_loss" not in final
    reinforce_log = list((out / "logs" / "reinforce").rglob("train.jsonl"))
    assert reinforce_log and len(reinforce_log[0].read_text().splitlines()) == 6  # its 6 steps
