"""UOE / SEUF expert attribution, masks and router anchor loss on tiny random MoE models."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_mixtral
from unlearn.errors import UnlearnError
from unlearn.localization.uoe import (
    Anchor,
    ExpertChoice,
    UOEParams,
    anchor_loss,
    attribute,
    choose_experts,
    expert_mask,
    find_moe_layers,
    gate_scores,
    router_logits,
    selected_tokens,
)
from unlearn.prompts import Tokenized, collate

PROMPT_IDS = list(range(10, 16))  # routed to expert 1 by the hand-built router
ANSWER_IDS = list(range(20, 23))  # routed to expert 2
PAD = 0


def mixtral(**overrides):
    return build_tiny_mixtral(**{"max_position_embeddings": 64, **overrides})


def qwen2_moe(**overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**cfg, **overrides}))


BUILDERS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


def items(n: int = 3) -> list[Tokenized]:
    """Question/answer items: six prompt tokens (no labels) then three answer tokens."""
    out = []
    for i in range(n):
        prompt = PROMPT_IDS[i:] + PROMPT_IDS[:i]
        answer = ANSWER_IDS[: 3 - (i % 2)]  # unequal lengths, so the batch is padded
        out.append(Tokenized(prompt + answer, [-100] * len(prompt) + answer, source=i))
    return out


def hand_route(model, layer: int = 1, strength: float = 4.0) -> None:
    """Prompt tokens carry +1 on hidden dim 0, answer tokens on dim 1 (dwarfing the 0.02-scale
    random rest, so RMSNorm keeps it at about sqrt(32)); layer `layer`'s router maps dim 0 to
    expert 1 and dim 1 to expert 2, every other expert scoring 0."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[PROMPT_IDS, 0] = 1.0
        emb[ANSWER_IDS, 1] = 1.0
        gate = model.model.layers[layer].mlp.gate.weight
        gate.zero_()
        gate[1, 0] = strength
        gate[2, 1] = strength


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_find_moe_layers(arch):
    model = BUILDERS[arch]()
    layers = find_moe_layers(model)
    names = dict(model.named_parameters())
    assert [layer.index for layer in layers] == [0, 1]
    for layer in layers:
        assert (layer.num_experts, layer.top_k) == (4, 2)
        assert layer.router_weight == f"model.layers.{layer.index}.mlp.gate.weight"
        assert layer.router is model.model.layers[layer.index].mlp.gate
        assert layer.per_expert == ()
        assert set(layer.fused) == {
            f"model.layers.{layer.index}.mlp.experts.gate_up_proj",
            f"model.layers.{layer.index}.mlp.experts.down_proj",
        }
        assert all(names[n].shape[0] == 4 for n in layer.fused)
        # Qwen2-MoE's shared expert and its sigmoid gate are not routed experts.
        assert not any("shared_expert" in n for n in layer.fused + layer.router_params)


def test_find_moe_layers_keeps_decoder_indices_of_mixed_models():
    model = qwen2_moe(num_hidden_layers=3, mlp_only_layers=[1])
    assert [layer.index for layer in find_moe_layers(model)] == [0, 2]


def test_model_without_moe_raises():
    from conftest import build_tiny_model

    with pytest.raises(UnlearnError, match="no mixture-of-experts layer") as err:
        find_moe_layers(build_tiny_model(100))
    assert "\n" not in str(err.value)


def test_router_logits_hook_matches_output_router_logits():
    model = mixtral().eval()
    layers = find_moe_layers(model)
    ids = torch.tensor([PROMPT_IDS, ANSWER_IDS * 2])
    with router_logits(model, layers) as captured:
        out = model(input_ids=ids, output_router_logits=True)
    assert sorted(captured) == [0, 1]
    for layer in layers:
        assert captured[layer.index].shape == (ids.numel(), 4)
        torch.testing.assert_close(captured[layer.index], out.router_logits[layer.index])
    captured.clear()
    model(input_ids=ids)
    assert captured == {}  # the hooks are gone after the block


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_uoe_picks_the_expert_a_hand_built_router_sends_the_forget_tokens_to(arch):
    model = BUILDERS[arch]()
    hand_route(model, layer=1)
    model.train()
    affinity = attribute(model, items(), PAD, batch_size=2, tokens="answer")
    assert model.training  # mode restored
    assert sorted(affinity) == [0, 1] and affinity[1].shape == (4,)
    assert int(affinity[1].argmax()) == 2 and float(affinity[1][2]) > 0.9
    (choice,) = choose_experts(affinity, layers=1)
    # Layer 0's random router is near uniform (top-2 gate scores about 0.25); layer 1 wins.
    assert (choice.layer, choice.expert) == (1, 2)
    assert choice.score == pytest.approx(float(affinity[1][2]))

    # Over every token the six prompt tokens outweigh the three answer tokens: expert 1.
    everything = attribute(model, items(), PAD, tokens="all")
    assert choose_experts(everything)[0] == ExpertChoice(1, 1, float(everything[1][1]))


def test_attribution_is_the_mean_over_sequences_of_per_sequence_means():
    model = mixtral()
    batch = items(2)
    layers = find_moe_layers(model)
    expected = {layer.index: torch.zeros(4) for layer in layers}
    on_answers = {layer.index: torch.zeros(4) for layer in layers}
    for item in batch:
        with torch.no_grad(), router_logits(model, layers) as captured:
            model(input_ids=torch.tensor([item.input_ids]))
        answer = torch.tensor(item.labels) != -100
        for layer in layers:
            g = gate_scores(captured[layer.index], 2, "gate")
            expected[layer.index] += g.mean(0) / len(batch)
            on_answers[layer.index] += g[answer].mean(0) / len(batch)
    # Padded together: padding must not count.
    got = attribute(model, batch, PAD, batch_size=2, tokens="all")
    for index, scores in expected.items():
        torch.testing.assert_close(got[index], scores, rtol=1e-4, atol=1e-6)
    got = attribute(model, batch, PAD, batch_size=2)
    for index, scores in on_answers.items():
        torch.testing.assert_close(got[index], scores, rtol=1e-4, atol=1e-6)
    counts = attribute(model, batch, PAD, score="count")
    torch.testing.assert_close(counts[0].sum(), torch.tensor(2.0))  # top-2 of every token


def test_choose_experts_ties_and_layer_count():
    affinity = {0: torch.tensor([0.1, 0.4, 0.4, 0.1]), 3: torch.tensor([0.4, 0.0, 0.0, 0.4])}
    assert choose_experts(affinity, layers=None) == [
        ExpertChoice(0, 1, pytest.approx(0.4)),
        ExpertChoice(3, 0, pytest.approx(0.4)),
    ]
    assert [c.layer for c in choose_experts(affinity, layers=1)] == [0]
    with pytest.raises(UnlearnError, match="the model has 2"):
        choose_experts(affinity, layers=3)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("train_router", [True, False])
def test_expert_mask_selects_exactly_the_chosen_expert(arch, train_router):
    model = BUILDERS[arch]()
    layers = find_moe_layers(model)
    masks = expert_mask(model, layers, [ExpertChoice(1, 2, 1.0)], train_router=train_router)
    params = dict(model.named_parameters())
    up, down = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    router = "model.layers.1.mlp.gate.weight"
    assert set(masks) == {up, down} | ({router} if train_router else set())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
    for name in (up, down):
        assert bool(masks[name][2].all()) and not bool(masks[name][[0, 1, 3]].any())
    expert_size = params[up][2].numel() + params[down][2].numel()
    total = sum(int(m.sum()) for m in masks.values())
    assert total == expert_size + (params[router].numel() if train_router else 0)


class ToyExpert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(8, 16, bias=False)
        self.w2 = torch.nn.Linear(16, 8, bias=True)


class ToyBlock(torch.nn.Module):
    """A transformers-4-style MoE block: a Linear router and a ModuleList of experts."""

    top_k = 1

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(8, 3, bias=False)
        self.experts = torch.nn.ModuleList(ToyExpert() for _ in range(3))


def test_module_list_experts_are_masked_whole():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), ToyBlock()])
    (layer,) = find_moe_layers(model)
    assert (layer.index, layer.num_experts, layer.top_k, layer.fused) == (1, 3, 1, ())
    masks = expert_mask(model, [layer], [ExpertChoice(1, 1, 0.5)], train_router=False)
    assert sorted(masks) == ["layers.1.experts.1.w1.weight", "layers.1.experts.1.w2.bias",
                             "layers.1.experts.1.w2.weight"]  # fmt: skip
    assert all(bool(m.all()) for m in masks.values())
    with pytest.raises(UnlearnError, match="expert 3 does not exist"):
        expert_mask(model, [layer], [ExpertChoice(1, 3, 0.5)])


def test_anchor_loss_equals_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(2 * 3, 4)
    token_mask = torch.tensor([[True, True, False], [True, False, False]])
    model = mixtral()
    layers = find_moe_layers(model)
    choice = ExpertChoice(1, 2, 1.0)
    probs = logits.softmax(-1)
    top2 = probs.topk(2, dim=-1).indices
    gate = torch.zeros_like(probs).scatter(-1, top2, probs.gather(-1, top2))
    onehot = torch.tensor([0.0, 0.0, 1.0, 0.0])
    keep = token_mask.reshape(-1)
    want = ((gate - onehot) ** 2).sum(-1)[keep].mean()
    got = anchor_loss({1: logits}, [choice], layers, token_mask)
    torch.testing.assert_close(got, want)
    dense = ((probs - onehot) ** 2).sum(-1)[keep].mean()
    torch.testing.assert_close(
        anchor_loss({1: logits}, [choice], layers, token_mask, "prob"), dense
    )
    torch.testing.assert_close(
        anchor_loss({1: logits}, [choice], layers), ((gate - onehot) ** 2).sum(-1).mean()
    )
    # A token already sent only to the chosen expert costs nothing.
    sure = torch.tensor([[0.0, 0.0, 30.0, 0.0]])
    assert float(anchor_loss({1: sure}, [choice], layers)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_anchor_loss_gradient_reaches_only_the_router_among_trained_entries(arch):
    model = BUILDERS[arch]()
    layers = find_moe_layers(model)
    choices = [ExpertChoice(1, 2, 1.0)]
    masks = expert_mask(model, layers, choices)
    ids = torch.tensor([PROMPT_IDS, ANSWER_IDS * 2])
    with router_logits(model, [layers[1]]) as captured:
        model(input_ids=ids)
    assert sorted(captured) == [1]
    loss = anchor_loss(captured, choices, layers, torch.ones_like(ids, dtype=torch.bool))
    loss.backward()
    params = dict(model.named_parameters())
    router = "model.layers.1.mlp.gate.weight"
    assert float(params[router].grad.abs().sum()) > 0
    for name, mask in masks.items():
        if name != router:
            grad = params[name].grad
            assert grad is None or float((grad * mask).abs().sum()) == 0.0


def test_attribute_and_anchor_errors():
    model = mixtral()
    no_answer = [Tokenized([10, 11], [-100, -100], source=0)]
    with pytest.raises(UnlearnError, match="no answer labels"):
        attribute(model, no_answer, PAD, tokens="answer")
    with pytest.raises(UnlearnError, match="no router logits"):
        anchor_loss({}, [ExpertChoice(1, 2, 1.0)], find_moe_layers(model))
    with pytest.raises(ValueError):
        UOEParams(layers=0)
    assert UOEParams() == UOEParams(
        score="gate", tokens="answer", layers=1, train_router=True, anchor_weight=1.0
    )


# ------------------------------------------- which tokens pick the expert (issue 16)
# In question/answer data the chat template, system prompt and question come before the answer
# in every sequence; here they are PROMPT_IDS (routed to expert 1 in layer 1, and twice as many
# as the answer tokens, routed to expert 2).


def test_attribution_counts_answer_tokens_by_default_and_every_token_with_all():
    model = mixtral()
    hand_route(model, layer=1)
    by_default = attribute(model, items(), PAD, batch_size=2)
    assert choose_experts(by_default)[0] == ExpertChoice(1, 2, float(by_default[1][2]))
    assert float(by_default[1][1]) < 0.05  # the prompt's expert gets no credit from the answer
    everything = attribute(model, items(), PAD, batch_size=2, tokens="all")
    assert choose_experts(everything)[0] == ExpertChoice(1, 1, float(everything[1][1]))
    assert UOEParams().tokens == "answer"


def test_selected_tokens_are_the_labelled_input_positions():
    batch = collate(items(2), PAD)  # row 1 is one answer token shorter, so padded
    mask, labels = batch["attention_mask"], batch["labels"]
    want = torch.zeros_like(mask, dtype=torch.bool)
    want[0, 6:9] = True  # input tokens 6..8 are the answer (labels aligned with input_ids)
    want[1, 6:8] = True
    assert torch.equal(selected_tokens(mask, labels, "answer"), want)
    assert torch.equal(selected_tokens(mask, labels, "all"), mask.bool())
    # The training loop keeps only the last columns of the labels (logits_to_keep).
    assert torch.equal(selected_tokens(mask, labels[:, -4:], "answer"), want)
    with pytest.raises(UnlearnError, match="needs the batch's labels"):
        selected_tokens(mask, None, "answer")
    with pytest.raises(UnlearnError, match="labels of shape"):
        selected_tokens(mask, labels[:1], "answer")


@pytest.mark.parametrize("tokens", ["answer", "all"])
def test_anchor_holds_the_tokens_the_expert_was_chosen_on(tokens):
    model = mixtral()
    hand_route(model, layer=1)
    batch = collate(items(), PAD)
    mask, labels = batch["attention_mask"], batch["labels"]
    anchor = Anchor.from_info([{"layer": 1, "expert": 2, "score": 0.9}], 1.0, tokens)
    assert anchor.tokens == tokens and Anchor((ExpertChoice(1, 2, 0.9),)).tokens == "answer"
    with anchor.capture(model) as captured:
        model(input_ids=batch["input_ids"], attention_mask=mask)
    keep = mask.bool() & (labels != -100) if tokens == "answer" else mask.bool()
    layers = find_moe_layers(model)
    want = anchor_loss(captured, anchor.choices, layers, keep)
    got = anchor.loss(model, captured, mask.bool(), labels[:, -4:]).detach()
    torch.testing.assert_close(got, want)
    # Answer tokens already go to expert 2: little to anchor. The prompt tokens go to expert 1.
    if tokens == "answer":
        assert float(got) < 0.05
    else:
        assert float(got) > 0.5
        torch.testing.assert_close(anchor.loss(model, captured, mask.bool()), want.detach())


def test_anchor_on_answer_tokens_without_labels_is_an_error():
    model = mixtral()
    anchor = Anchor((ExpertChoice(1, 2, 0.9),))
    ids = torch.tensor([PROMPT_IDS + ANSWER_IDS])
    with anchor.capture(model) as captured:
        model(input_ids=ids)
    with pytest.raises(UnlearnError, match="uoe_tokens=all"):
        anchor.loss(model, captured, torch.ones_like(ids, dtype=torch.bool))


def test_uoe_tokens_setting_is_parsed_and_recorded():
    from unlearn.config import LocalizeConfig, apply_overrides, build_config, to_dict

    assert LocalizeConfig().uoe_tokens == "answer"
    cfg = build_config(apply_overrides({}, ["localize.method=uoe", "localize.uoe_tokens=all"]))
    assert cfg.localize.uoe_tokens == "all"
    assert to_dict(cfg)["localize"]["uoe_tokens"] == "all"
    with pytest.raises(UnlearnError, match=r"localize\.uoe_tokens"):
        build_config(apply_overrides({}, ["localize.uoe_tokens=prompt"]))


@pytest.mark.parametrize(("tokens", "expert"), [("answer", 2), ("all", 1)])
def test_localize_uoe_follows_uoe_tokens(tmp_path, tokens, expert):
    import json

    from unlearn.config import LocalizeConfig
    from unlearn.localization.run import INFO_FILE, localize

    model = mixtral()
    hand_route(model, layer=1)
    cfg = LocalizeConfig(method="uoe", batch_size=2, uoe_tokens=tokens)
    loc = localize(model, items(), None, PAD, cfg, seed=0, output=tmp_path)
    assert [(e["layer"], e["expert"]) for e in loc.info["experts"]] == [(1, expert)]
    assert loc.anchor.tokens == tokens and loc.anchor.choices[0].expert == expert
    written = json.loads((tmp_path / INFO_FILE).read_text())
    assert written["settings"]["uoe_tokens"] == tokens
