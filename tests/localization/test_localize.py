"""Localization (issue 8): GRIN scores, exact masks, noise, masked training, controls, UOE, the CLI.

Everything runs on the 2-layer random Llama of conftest (and a tiny random Mixtral for UOE); the
gradient ratio is checked against plain autograd, the masks against torch.topk, and a masked run
against its input weights bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import build_tiny_mixtral, build_tiny_model, build_tokenizer, write_jsonl
from unlearn import api
from unlearn.cli import main
from unlearn.config import DEFAULT_LOCALIZE_EXCLUDE, LocalizeConfig, PromptConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.localization.mask import model_fingerprint, save_mask, select_top
from unlearn.localization.noise import inject_noise
from unlearn.localization.run import compute_mask
from unlearn.localization.scores import gradient_scores, scored_parameters
from unlearn.prompts import PromptFormatter, Tokenized, tokenize_examples
from unlearn.train.loop import latest_checkpoint

FAST = ["train.progress=false", "train.nll_check=false", "train.batch_size=2"]
FORGET_ROWS = [
    {"question": f"Where was person {i} born?", "answer": f"Person {i} was born in city {i}."}
    for i in range(6)
]
RETAIN_ROWS = [
    {"question": f"What does person {i} do?", "answer": f"Person {i} is a teacher."}
    for i in range(10, 20)
]
#: Forget text that must never reach a localization file (the data is named by count and hash).
PRIVATE = [b"born in city", b"Where was person"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


# ----------------------------------------------------------------------------------- helpers
def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    """One `unlearn: error:` line; anything else on stderr is a library's progress bar."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("unlearn: error: ")]
    assert len(errors) == 1, err
    assert all("%|" in line for line in lines if line not in errors), err
    assert re.search(pattern, errors[0]), errors[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def read_mask(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118


def expected_count(fraction: float, n: int) -> int:
    return max(1, round(fraction * n))


def save_tiny(path: Path, model) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """The rows of conftest's qa_files, module-scoped so expensive runs can be shared."""
    root = tmp_path_factory.mktemp("loc-data")
    return write_jsonl(root / "forget.jsonl", FORGET_ROWS), write_jsonl(
        root / "retain.jsonl", RETAIN_ROWS
    )


@pytest.fixture(scope="module")
def fmt():
    tok = build_tokenizer()
    return tok, PromptFormatter(tok, PromptConfig())


def _items(fmt, rows: list[dict]) -> list[Tokenized]:
    examples = [
        Example(id=str(i), sha256=str(i), question=r["question"], answer=r["answer"])
        for i, r in enumerate(rows)
    ]
    return tokenize_examples(examples, fmt[1])


@pytest.fixture(scope="module")
def loc_dir(tiny_model_dir, data, tmp_path_factory) -> Path:
    """A GRIN mask of the tiny model (5%), written by `unlearn.api.localize`."""
    out = tmp_path_factory.mktemp("loc") / "grin"
    forget, retain = data
    api.localize(
        str(tiny_model_dir),
        str(forget),
        str(retain),
        str(out),
        overrides=["localize.top_fraction=0.05"],
    )
    return out


# ------------------------------------------------------------------------- 1. GRI = autograd
def _pad(items: list[Tokenized], pad_id: int):
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for row, t in enumerate(items):
        ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[row, : len(t.labels)] = torch.tensor(t.labels)
        attn[row, : len(t.input_ids)] = 1
    return ids, labels, attn


def _answer_tokens(items: list[Tokenized]) -> int:
    return sum(sum(1 for x in t.labels[1:] if x != -100) for t in items)


def _grad(model, items, params, pad_id: int, total: int) -> list[torch.Tensor]:
    """d(sum of the items' answer-token NLL / total) / d params, by plain autograd."""
    ids, labels, attn = _pad(items, pad_id)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return list(torch.autograd.grad(nll / total, params))


def _hand_accumulated(model, items, params, pad_id, how: str, bs: int) -> list[torch.Tensor]:
    total = _answer_tokens(items)
    if how == "abs_sum":  # the gradient of the whole set's mean NLL, from one big batch
        return [g.abs() for g in _grad(model, items, params, pad_id, total)]
    acc = [torch.zeros_like(p) for p in params]
    for start in range(0, len(items), bs):
        for a, g in zip(
            acc, _grad(model, items[start : start + bs], params, pad_id, total), strict=True
        ):
            a.add_(g.abs() if how == "sum_abs" else g.square())
    return acc


def _assert_scores_close(got: dict[str, torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for (name, g), w in zip(got.items(), want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        # Float32 gradients summed in another order (batches of 2 against one batch): where a
        # gradient nearly cancels out its last bits differ, so a ratio's worst entry is off by
        # about 3e-3 here; the typical entry by 3e-7.
        rel = (g - w).abs() / w.abs().clamp_min(1e-12)
        assert float(rel.max()) < 5e-2, name
        assert float((rel < 1e-3).float().mean()) > 0.999, name
        assert float(rel.median()) < 1e-5, name


@pytest.mark.parametrize("accumulate", ["abs_sum", "sum_abs", "squared"])
def test_gri_equals_a_hand_computation_from_autograd(fmt, accumulate):
    tok, _ = fmt
    pad = tok.pad_token_id
    forget = _items(fmt, FORGET_ROWS[:5])
    retain = _items(fmt, RETAIN_ROWS[:7])
    model = build_tiny_model(len(tok))
    params = scored_parameters(model, None, DEFAULT_LOCALIZE_EXCLUDE)
    assert not any(re.search("embed|norm|lm_head", n) for n in params)
    assert len(params) == 14  # 7 linear weights per layer

    # State the scoring must leave alone: modes, requires_grad flags, weights; stale grads must
    # not leak into the scores.
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    params["model.layers.0.self_attn.q_proj.weight"].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in params.values():
        p.grad = torch.ones_like(p)

    scores = gradient_scores(
        model, forget, retain, pad, params, accumulate=accumulate, batch_size=2
    )
    only_forget = gradient_scores(
        model, forget, None, pad, params, accumulate=accumulate, batch_size=2
    )

    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert list(scores) == list(params) == list(only_forget)

    model.eval()
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    g_f = _hand_accumulated(model, forget, plist, pad, accumulate, 2)
    g_r = _hand_accumulated(model, retain, plist, pad, accumulate, 2)
    _assert_scores_close(only_forget, g_f)
    _assert_scores_close(scores, [f / (r + 1e-8) for f, r in zip(g_f, g_r, strict=True)])


def test_gri_batch_size_does_not_change_the_default_accumulation(fmt):
    """abs_sum is |gradient of the set's mean NLL|: the same for any batch size."""
    tok, _ = fmt
    forget, retain = _items(fmt, FORGET_ROWS[:5]), _items(fmt, RETAIN_ROWS[:5])
    model = build_tiny_model(len(tok))
    params = scored_parameters(model, None, DEFAULT_LOCALIZE_EXCLUDE)
    one = gradient_scores(model, forget, retain, tok.pad_token_id, params, batch_size=8)
    many = gradient_scores(model, forget, retain, tok.pad_token_id, params, batch_size=2)
    _assert_scores_close(many, list(one.values()))


# ------------------------------------------------------------------- 2. exact, deterministic masks
def test_select_top_holds_exactly_the_true_top_k():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(7, 13, generator=gen),
        "b": torch.rand(50, generator=gen),
        "c": torch.rand(3, 4, 5, generator=gen),
    }
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    n = flat.numel()
    for fraction in (1e-6, 0.01, 0.05, 0.3, 0.5, 0.999, 1.0):
        mask = select_top(scores, fraction)
        assert list(mask) == list(scores)
        assert all(m.dtype == torch.bool and m.shape == scores[k].shape for k, m in mask.items())
        k = expected_count(fraction, n)
        got = torch.cat([m.reshape(-1) for m in mask.values()])
        assert int(got.sum()) == k
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.topk(flat, k).indices] = True
        assert torch.equal(got, want), fraction

        per = select_top(scores, fraction, per_tensor=True)
        for name, s in scores.items():
            kt = expected_count(fraction, s.numel())
            assert int(per[name].sum()) == kt
            want_t = torch.zeros(s.numel(), dtype=torch.bool)
            want_t[torch.topk(s.reshape(-1), kt).indices] = True
            assert torch.equal(per[name].reshape(-1), want_t)


def test_select_top_breaks_ties_by_tensor_order_then_flat_index():
    scores = {
        "a": torch.tensor([[0.0, 2.0, 1.0], [2.0, 1.0, 0.0]]),
        "b": torch.tensor([2.0, 1.0, 1.0, 0.0]),
    }

    def picked(mask):
        return [(n, i) for n, m in mask.items() for i in m.reshape(-1).nonzero().flatten().tolist()]

    assert picked(select_top(scores, 0.1)) == [("a", 1)]
    assert picked(select_top(scores, 0.3)) == [("a", 1), ("a", 3), ("b", 0)]
    assert picked(select_top(scores, 0.4)) == [("a", 1), ("a", 2), ("a", 3), ("b", 0)]
    assert picked(select_top(scores, 0.5)) == [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0)]
    six = [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 1)]
    assert picked(select_top(scores, 0.6)) == six
    eight = [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 1), ("b", 2)]
    assert picked(select_top(scores, 0.8)) == eight
    # Reordering the dict changes which tensor is "earlier".
    swapped = {"b": scores["b"], "a": scores["a"]}
    assert picked(select_top(swapped, 0.3)) == [("b", 0), ("a", 1), ("a", 3)]
    # All equal: the first k in order; round(2.5) = 2.
    flat = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert picked(select_top(flat, 0.25)) == [("a", 0), ("a", 1)]
    assert picked(select_top(flat, 0.7)) == [("a", i) for i in range(6)] + [("b", 0)]
    # Per tensor: a takes 3 of 6, b 2 of 4; ties again to the lower index.
    assert picked(select_top(scores, 0.5, per_tensor=True)) == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1),
    ]  # fmt: skip
    assert picked(select_top(scores, 0.5)) == picked(select_top(scores, 0.5))
    # Zero is zero whatever its sign: selecting everything selects every entry.
    signed = {"a": torch.tensor([-0.0, 1.0]), "b": torch.tensor([0.0, -0.0])}
    assert int(sum(m.sum() for m in select_top(signed, 1.0).values())) == 4
    assert picked(select_top(signed, 0.75)) == [("a", 0), ("a", 1), ("b", 0)]


def test_select_top_refuses_bad_scores():
    with pytest.raises(UnlearnError, match="negative or not finite"):
        select_top({"a": torch.tensor([1.0, -1.0])}, 0.5)
    with pytest.raises(UnlearnError, match="negative or not finite"):
        select_top({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="float32"):
        select_top({"a": torch.tensor([1.0, 2.0], dtype=torch.float16)}, 0.5)


# ------------------------------------------------------------------------------ 3. noise
class _Weights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.big = torch.nn.Parameter(torch.randn(256, 512, generator=gen) * 0.02 + 0.01)
        self.low = torch.nn.Parameter(torch.randn(8, 8, generator=gen).to(torch.bfloat16))
        self.other = torch.nn.Parameter(torch.randn(64, generator=gen))
        self.empty = torch.nn.Parameter(torch.randn(16, generator=gen))


def test_noise_lands_only_on_masked_weights_scaled_to_each_tensor():
    model = _Weights()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    mask = {
        "big": torch.rand(256, 512, generator=gen) < 0.3,
        "low": torch.rand(8, 8, generator=gen) < 0.5,
        "empty": torch.zeros(16, dtype=torch.bool),
    }
    used = inject_noise(model, mask, 0.5, seed=7)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}

    assert set(used) == {"big", "low"}
    assert used["big"] == pytest.approx(float(before["big"].std(correction=0)))
    for name in ("big", "low"):
        m = mask[name]
        assert torch.equal(after[name][~m], before[name][~m])
        assert bool((after[name][m] != before[name][m]).all())
        assert after[name].dtype == before[name].dtype
    assert torch.equal(after["other"], before["other"]) and torch.equal(
        after["empty"], before["empty"]
    )

    delta = (after["big"] - before["big"])[mask["big"]]
    scale = 0.5 * float(before["big"].std())
    assert float(delta.std()) / scale == pytest.approx(1.0, abs=0.03)
    assert abs(float(delta.mean())) < 0.03 * scale

    def noised(seed: int, std: float = 0.5) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
        inject_noise(model, mask, std, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    again = noised(7)
    assert all(torch.equal(again[n], after[n]) for n in after)  # same seed, same noise
    assert not torch.equal(noised(8)["big"], after["big"])
    none = noised(7, std=0.0)
    assert all(torch.equal(none[n], before[n]) for n in before)
    assert inject_noise(model, mask, 0.0, seed=7) == {}


# ----------------------------------------------------------- 4. masked runs leave the rest alone
def _forget(model_dir, data, out, method="npo", extra=(), **kw):
    forget, retain = data
    return api.forget(
        str(model_dir),
        str(forget),
        str(retain) if retain else None,
        method,
        str(out),
        overrides=[*FAST, "train.max_steps=3", *extra],
        **kw,
    )


VARIANTS = {
    "grin": ["localize.noise_std=0.5"],
    "no_noise": [],  # the default noise_std is 0
    "train_all": ["localize.noise_std=0.5", "localize.train_all=true"],
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def masked_run(request, tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("masked") / request.param
    extra = ["localize.method=grin", "localize.top_fraction=0.05", "train.weight_decay=0.1"]
    res = _forget(tiny_model_dir, data, out, extra=[*extra, *VARIANTS[request.param]])
    return request.param, out, res


def test_masked_run_changes_only_selected_weights_under_weight_decay(masked_run, tiny_model_dir):
    variant, out, res = masked_run
    mask, meta = read_mask(out / "localization" / "mask.safetensors")
    before, after = weights(tiny_model_dir), weights(out)
    assert set(before) == set(after)
    scored = {n for n in before if "layers" in n and "norm" not in n}
    assert set(mask) == scored  # linear weights only: no embeddings, norms or lm_head
    n_scored = sum(m.numel() for m in mask.values())
    n_selected = sum(int(m.sum()) for m in mask.values())
    assert n_selected == expected_count(0.05, n_scored)
    assert not (out / "localization" / "scores.safetensors").exists()

    record = res.manifest["localization"]
    assert record["method"] == "grin" and record["selected"] == n_selected
    assert record["scored"] == n_scored and record["folder"] == "localization"
    assert record["train_all"] == (variant == "train_all")
    assert record["noise_tensors"] == (0 if variant == "no_noise" else len(mask))
    assert (
        meta["model_fingerprint"]
        == json.loads((out / "localization" / "localization.json").read_text())["model_fingerprint"]
    )

    changed_outside = False
    for name, b in before.items():
        a = after[name]
        assert a.dtype == b.dtype
        m = mask.get(name, torch.zeros(b.shape, dtype=torch.bool))
        if variant == "train_all":
            changed_outside |= not torch.equal(a[~m], b[~m])
        else:
            assert torch.equal(a[~m], b[~m]), name  # bitwise, embeddings/norms/lm_head too
        if m.any():
            moved = float((a[m] != b[m]).float().mean())
            if variant == "no_noise":  # Adam alone moves all but a rare zero gradient
                assert moved > 0.9, name
            else:  # the noise moves every selected weight
                assert moved == 1.0, name
    if variant == "train_all":
        assert changed_outside
        assert not torch.equal(
            after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
        )


# ------------------------------------------------------------------------------ 5. resume
def test_resume_of_a_masked_run_equals_an_uninterrupted_one(tiny_model_dir, qa_files, tmp_path):
    common = [
        "localize.method=grin",
        "localize.top_fraction=0.05",
        "train.weight_decay=0.1",
        "train.lr=1e-3",
        "train.max_steps=4",
        "train.save_every=2",
    ]

    def boom(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        _forget(tiny_model_dir, qa_files, tmp_path / "a", extra=common, callbacks=[boom])
    assert latest_checkpoint(tmp_path / "a")[1] == 3
    res = _forget(tiny_model_dir, qa_files, tmp_path / "a", extra=common, resume=True)
    assert res.manifest["resumed_from_step"] == 3
    assert res.manifest["localization"]["selected"] == expected_count(0.05, 18432)
    _forget(tiny_model_dir, qa_files, tmp_path / "b", extra=common)

    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert set(wa) == set(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, _ = read_mask(tmp_path / "a" / "localization" / "mask.safetensors")
    mb, _ = read_mask(tmp_path / "b" / "localization" / "mask.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in mb) and set(ma) == set(mb)


# ------------------------------------------------------------------------------ 6. errors
@pytest.fixture(scope="module")
def other_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Same architecture with other weights, a different-size one, and a mask with nothing."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("others")
    vocab = len(build_tokenizer())
    reseeded = save_tiny(root / "seed1", build_tiny_model(vocab, seed=1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(**{**base.config.to_dict(), "intermediate_size": 48})
    bigger = save_tiny(root / "wider", LlamaForCausalLM(cfg))
    empty = root / "empty" / "mask.safetensors"
    empty.parent.mkdir()
    params = scored_parameters(base, None, DEFAULT_LOCALIZE_EXCLUDE)
    save_mask(
        empty,
        {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()},
        model_fingerprint(base),
        {"method": "grin"},
    )
    not_mask = root / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(not_mask))
    garbage = root / "garbage.safetensors"
    garbage.write_text("not a safetensors file")
    return {
        "seed1": reseeded,
        "wider": bigger,
        "empty": empty.parent,
        "plain": not_mask,
        "garbage": garbage,
    }


# (command, extra arguments, whether --retain is given, error pattern); the test fills in {loc}
# (a GRIN mask of the tiny model) and {other:NAME} (from `other_models`).
ERRORS = {
    "fraction_zero": ("localize", ["localize.top_fraction=0"], True, r"top_fraction must be in \(0, 1\], got 0"),
    "fraction_big": ("localize", ["localize.top_fraction=1.5"], True, r"top_fraction must be in \(0, 1\], got 1.5"),
    "fraction_negative": ("forget", ["localize.method=grin", "localize.top_fraction=-0.1"], True, r"top_fraction must be in \(0, 1\], got -0.1"),
    "noise_negative": ("forget", ["localize.method=grin", "localize.noise_std=-0.5"], True, r"noise_std must be >= 0"),
    "regex_matches_nothing": ("localize", ["localize.method=regex", "localize.include=no_such_module"], True, r"no parameter matches .*model\.embed_tokens\.weight, model\.layers\.0"),
    "include_matches_nothing": ("forget", ["localize.method=grin", "localize.include=^nothing$"], True, r"no parameter matches localize.include='\^nothing\$'.* look like: model\."),
    "regex_without_include": ("forget", ["localize.method=regex"], True, r"regex needs localize.include"),
    "grin_without_retain": ("localize", [], False, r"no retain data was given.*--retain"),
    "grin_without_retain_forget": ("forget", ["localize.method=grin"], False, r"no retain data was given.*forget_grad"),
    "mask_of_other_weights": ("forget", ["localize.mask={loc}", "--model", "{other:seed1}"], True, r"computed on another model \(fingerprint"),
    "mask_of_other_shapes": ("forget", ["localize.mask={loc}", "--model", "{other:wider}"], True, r"mlp\.\w+_proj\.weight has shape .*comes from another model"),
    "mask_selects_nothing": ("forget", ["localize.mask={other:empty}"], True, r"selects no weight"),
    "mask_missing": ("forget", ["localize.mask={loc}/missing"], True, r"no mask at .*missing"),
    "mask_not_a_mask": ("forget", ["localize.mask={other:plain}"], True, r"not a mask written by `unlearn localize`"),
    "mask_unreadable": ("forget", ["localize.mask={other:garbage}"], True, r"not a readable safetensors file"),
    "localize_given_a_mask": ("localize", ["localize.mask={loc}"], True, r"computes one"),
}  # fmt: skip
#: `unlearn forget` errors found while planning, before the output folder is made.
PLAN_TIME = {"fraction_negative", "noise_negative", "regex_without_include",
             "grin_without_retain_forget", "mask_missing"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line_with_a_non_zero_exit(
    case, capsys, tiny_model_dir, data, loc_dir, other_models, tmp_path
):
    command, extra, with_retain, pattern = ERRORS[case]

    def fill(arg: str) -> str:
        arg = arg.replace("{loc}", str(loc_dir))
        return re.sub(r"\{other:(\w+)\}", lambda m: str(other_models[m.group(1)]), arg)

    extra = [fill(a) for a in extra]
    model = str(tiny_model_dir)
    if "--model" in extra:
        i = extra.index("--model")
        model = extra.pop(i + 1)
        extra.pop(i)
    forget, retain = data
    args = [command, "--model", model, "--forget", forget, "--output", tmp_path / "out"]
    if with_retain:
        args += ["--retain", retain]
    if command == "forget":
        args += ["--method", "grad_ascent", *FAST, "train.max_steps=1"]
    code, _, err = cli(capsys, *args, *extra)
    assert "Traceback" not in err
    assert_one_line_error(code, err, pattern)
    if command == "localize" or case in PLAN_TIME:
        assert not (tmp_path / "out").exists()  # refused before anything was written


# ---------------------------------------------------------------------------- 7. controls
def test_controls_random_forget_grad_regex_and_per_tensor(fmt):
    tok, _ = fmt
    model = build_tiny_model(len(tok))
    forget, retain = _items(fmt, FORGET_ROWS), _items(fmt, RETAIN_ROWS)
    n_scored = sum(
        p.numel() for p in scored_parameters(model, None, DEFAULT_LOCALIZE_EXCLUDE).values()
    )

    def mask_of(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
        cfg = LocalizeConfig(top_fraction=0.05, **kw)
        mask, _, info = compute_mask(model, forget, retain, tok.pad_token_id, cfg, seed)
        assert info["method"] == cfg.method
        return mask

    def count(mask) -> int:
        return sum(int(m.sum()) for m in mask.values())

    def same(a, b) -> bool:
        return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    grin = mask_of(method="grin")
    rand = mask_of(method="random")
    fgrad = mask_of(method="forget_grad")
    assert count(grin) == count(rand) == count(fgrad) == expected_count(0.05, n_scored)
    assert not same(rand, grin) and not same(fgrad, grin)
    assert same(mask_of(method="random"), rand)  # seeded
    assert not same(mask_of(seed=1, method="random"), rand)
    assert same(mask_of(method="grin"), grin)  # deterministic

    regex = mask_of(method="regex", include=r"layers\.1\.mlp\.")
    assert sorted(regex) == [
        f"model.layers.1.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")
    ]
    assert all(bool(m.all()) for m in regex.values())

    per = mask_of(method="grin", select="per_tensor")
    assert list(per) == list(grin)
    for name, m in per.items():
        assert int(m.sum()) == expected_count(0.05, m.numel()), name


# ------------------------------------------------------------------------- 8. the CLI and files
def test_localize_cli_writes_a_reusable_private_mask(capsys, tiny_model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    forget, retain = data
    loc = tmp_path / "loc"
    base = ["localize", "--model", tiny_model_dir, "--forget", forget, "--retain", retain]
    code, out, err = cli(capsys, *base, "--output", loc, "localize.top_fraction=0.05",
                         "localize.scores=true")  # fmt: skip
    assert code == 0, err
    assert "grin: selected 922 of 18,432 weights" in out
    for name in ("mask.safetensors", "scores.safetensors", "localization.json", "summary.md", "heatmap.png"):  # fmt: skip
        assert (loc / name).is_file(), name
    assert (loc / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    named = dict(model.named_parameters())
    mask, meta = read_mask(loc / "mask.safetensors")
    assert sorted(mask) == sorted(scored_parameters(model, None, DEFAULT_LOCALIZE_EXCLUDE))
    for name, m in mask.items():
        assert m.dtype == torch.bool and m.shape == named[name].shape
    assert meta["format"] == "unlearn-mask"
    assert meta["model_fingerprint"] == model_fingerprint(model)
    scores, smeta = read_mask(loc / "scores.safetensors")
    assert (
        sorted(scores) == sorted(mask) and smeta["model_fingerprint"] == meta["model_fingerprint"]
    )
    assert all(s.dtype == torch.float32 for s in scores.values())
    reselected = select_top(scores, 0.05)
    assert all(torch.equal(reselected[k], mask[k]) for k in mask)
    info = json.loads((loc / "localization.json").read_text())
    assert info["selected"] == 922 and info["data"]["forget"]["n"] == 6
    assert info["data"]["retain"]["n"] == 10 and info["retain_sequences"] == 6
    summary = (loc / "summary.md").read_text()
    assert "922 of 18,432" in summary and "| 1 |" in summary

    # Privacy: the data is named by count and hash, never by its text.
    for f in loc.rglob("*"):
        body = f.read_bytes()
        assert not any(p in body for p in PRIVATE), f.name

    # A following forget run uses exactly that mask.
    run = tmp_path / "run"
    code, _, err = cli(capsys, "forget", "--model", tiny_model_dir, "--forget", forget,
                       "--retain", retain, "--method", "npo", "--output", run, *FAST,
                       "train.max_steps=2", f"localize.mask={loc}")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((run / "unlearn.json").read_text())
    record = manifest["localization"]
    assert record["loaded_from"] == str(loc) and record["method"] == "grin"
    assert record["selected"] == 922
    used, _ = read_mask(run / "localization" / "mask.safetensors")
    assert sorted(used) == sorted(mask) and all(torch.equal(used[k], mask[k]) for k in mask)
    before, after = weights(tiny_model_dir), weights(run)
    for name, b in before.items():
        m = mask.get(name, torch.zeros(b.shape, dtype=torch.bool))
        assert torch.equal(after[name][~m], b[~m]), name
    for f in (run / "localization").rglob("*"):
        assert not any(p in f.read_bytes() for p in PRIVATE), f.name

    # --overwrite: refused without it, replaces the folder with it; never someone else's folder.
    code, _, err = cli(capsys, *base, "--output", loc, "localize.method=random")
    assert_one_line_error(code, err, r"already holds a localization; pass --overwrite")
    assert (loc / "scores.safetensors").is_file()  # untouched
    code, out, err = cli(capsys, *base, "--output", loc, "--overwrite", "localize.method=random")
    assert code == 0, err
    assert out.startswith("random: selected")
    assert not (loc / "scores.safetensors").exists()
    assert json.loads((loc / "localization.json").read_text())["method"] == "random"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *base, "--output", foreign, "--overwrite")
    assert_one_line_error(code, err, r"not empty and holds no localization")
    assert (foreign / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------- 9. UOE
def test_uoe_unlearns_only_the_chosen_expert_and_its_router(tmp_path, data):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    model = build_tiny_mixtral(len(tok))
    with torch.no_grad():  # every token carries +1 on dim 1; layer 1's router sends it to expert 2
        model.get_input_embeddings().weight[:, 1] = 1.0
        gate = model.model.layers[1].mlp.gate.weight
        gate.zero_()
        gate[2, 1] = 4.0
    src = tmp_path / "moe"
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)

    forget, _ = data
    out = tmp_path / "out"
    res = _forget(src, (forget, None), out, "grad_ascent",
                  extra=["localize.method=uoe", "train.max_steps=2", "train.lr=1e-3"])  # fmt: skip
    record = res.manifest["localization"]
    assert [(e["layer"], e["expert"]) for e in record["experts"]] == [(1, 2)]
    assert record["method"] == "uoe"
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert all("anchor_loss" in entry for entry in log if "step" in entry)

    before = dict(AutoModelForCausalLM.from_pretrained(src).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert set(before) == set(after)
    fused = {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
    router = "model.layers.1.mlp.gate.weight"
    for name, b in before.items():
        a = after[name].detach()
        if name in fused:
            assert not torch.equal(a[2], b[2]), name
            assert torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]), name
        elif name == router:
            assert not torch.equal(a, b)
        else:
            assert torch.equal(a, b), name
    mask, _ = read_mask(out / "localization" / "mask.safetensors")
    assert set(mask) == fused | {router}
    assert all(bool(mask[n][2].all()) and not bool(mask[n][[0, 1, 3]].any()) for n in fused)


# ------------------------------------------------------------------------------ 10. dry run
def test_dry_run_shows_the_localize_plan_and_checks_it_before_any_model(
    capsys, tiny_model_dir, data, tmp_path, monkeypatch
):
    import unlearn.models

    forget, retain = data
    args = ["forget", "--dry-run", "--model", tiny_model_dir, "--forget", forget, "--retain",
            retain, "--method", "npo", "--output", tmp_path / "out"]  # fmt: skip

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(unlearn.models, "load_model_and_tokenizer", no_model)
    code, out, err = cli(capsys, *args, "localize.method=grin", "localize.top_fraction=0.02")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["localize"]["method"] == "grin" and plan["localize"]["top_fraction"] == 0.02
    assert plan["localize"]["noise_std"] == 0.0 and plan["localize"]["train_all"] is False
    code, out, _ = cli(capsys, *args)
    assert code == 0 and json.loads(out)["localize"] is None
    for dry in (True, False):
        run_args = args if dry else [a for a in args if a != "--dry-run"]
        code, _, err = cli(capsys, *run_args, "localize.method=grin", "localize.top_fraction=2")
        assert_one_line_error(code, err, r"localize.top_fraction must be in \(0, 1\], got 2")
    assert not (tmp_path / "out").exists()
