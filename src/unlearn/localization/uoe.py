"""UOE / SEUF: unlearn only the expert a mixture-of-experts model routes the forget data to.

Zhuang et al. 2025, "SEUF: Is Unlearning One Expert Enough for Mixture-of-Experts LLMs?", ACL 2025
(arXiv:2411.18797; v1 was titled "UOE: Unlearning One Expert Is Enough for Mixture-of-experts
LLMs"). Their pilot study (Sec. 3-4) finds that unlearning an MoE model end to end mostly teaches
the routers to send forget tokens to other experts ("expert selection shift"): the forget loss drops
while the knowledge stays in the expert that is no longer consulted, and the experts that now get
those tokens are damaged instead. Their fix (Sec. 4, Alg. 1) has three parts, each a function here:

* expert attribution (Eq. 2, `attribute`): the affinity of expert i in layer l is the router's
  top-K gate score g_{i,t} (the softmax probability if i is among the token's top-K experts, else 0;
  the g of Sec. 3), averaged over the tokens of each forget sequence and then over sequences;
  by default only the answer tokens count (see "Which tokens" below);
* selection (`choose_experts`): the layer-wise top-1 experts are ranked by that score and only the
  single best one is unlearned (M = 1 is best in Tab. 2 and Tab. 7, "Insight 4"; Tab. 5 ranks the
  layer-wise top-1 experts by affinity);
* training (`expert_mask`): only that expert and its layer's router get gradients (Alg. 1 step 4),
  everything else is frozen; 0.06% of Qwen1.5-MoE's parameters (Tab. 4);
* the router anchor loss (Eq. 3, `anchor_loss`): the squared L2 distance between the router's gate
  scores and the one-hot vector of the chosen expert, added with weight alpha = 1 (Eq. 4; best in
  their App. B, Tab. 6), so the router keeps sending forget tokens to the expert being unlearned.

Which tokens (`localize.uoe_tokens`, `selected_tokens`). The paper's forget sets are raw text
(WMDP, RWKU), so every token of a sequence is forget content and Eq. 2 averages over all of them.
Our forget data is question/answer pairs rendered with a chat template: a system prompt, headers
and the question precede the answer, and the same template opens every retain example too.
Counting those tokens would pick the expert that handles the template rather than the one the
forget answers go through. So by default ("answer") a token counts when its label is not -100:
labels are aligned with input_ids (the loss shifts them), and the router at position t sees input
token t, so these are the answer tokens (and the end token) themselves. "all" counts every
non-padding token, as the paper does. The anchor (Eq. 3) uses the same tokens as the attribution:
it keeps the tokens the expert was chosen for on that expert; anchoring the template would pull
the template of every prompt, retain data included, to the expert being unlearned.

Shared experts (Qwen-MoE, DeepSeek-MoE) are not routed, so they get no affinity and stay frozen: the
paper excludes them (Sec. 4, Tab. 2: adding the 4 shared experts to the top-1 expert cost utility).
In Qwen2-MoE that is `shared_expert` and its sigmoid `shared_expert_gate`, both untouched here.

Everything is model-agnostic: an MoE block is any module with an `experts` child and a router child
(`gate` or `router`) whose 2-D weight has one row per expert. Experts may be fused 3-D parameters
(transformers 5: `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) or a ModuleList
of per-expert modules (transformers 4, remote code); the masks select a slice or whole tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from unlearn.errors import UnlearnError
from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import Tokenized, collate

Score = Literal["gate", "prob", "count"]
Tokens = Literal["all", "answer"]

_ROUTER_NAMES = ("gate", "router")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "num_experts_per_token", "moe_topk")


@dataclass(frozen=True)
class UOEParams:
    """The paper's settings; each choice it leaves open is a field with the default we picked."""

    # Eq. 2 uses the top-K gate score g (Sec. 3). "prob" is the full softmax, "count" the token
    # assignment ratio of Fig. 2, which the paper calls coarser.
    score: Score = "gate"
    # Eq. 2 averages over every token of each sequence (L_j = its length), on raw-text forget
    # sets; "answer" keeps only the labelled tokens of question/answer data, so chat-template and
    # question tokens do not pick the expert. The anchor (Eq. 3) uses the same tokens.
    tokens: Tokens = "answer"
    # How many MoE layers get their top-1 expert unlearned: 1 is the paper's M = 1 (Tab. 2); None
    # is every MoE layer. (The paper's cross-layer M > 1 may take two experts of one layer; ours
    # takes at most one expert per layer.)
    layers: int | None = 1
    # Alg. 1 step 4 trains the chosen experts' routers too (the whole gate of that layer).
    train_router: bool = True
    # Eq. 4's alpha; alpha = 1 was best in App. B, Tab. 6.
    anchor_weight: float = 1.0
    # Eq. 3 compares the router "output" g, the top-K gate of Sec. 3; "prob" uses the full softmax.
    anchor_scores: Literal["gate", "prob"] = "gate"

    def __post_init__(self) -> None:
        if self.score not in ("gate", "prob", "count"):
            raise ValueError(f"score must be gate, prob or count, got {self.score!r}")
        if self.tokens not in ("all", "answer"):
            raise ValueError(f"tokens must be all or answer, got {self.tokens!r}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 or None, got {self.layers}")
        if not self.anchor_weight >= 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_scores not in ("gate", "prob"):
            raise ValueError(f"anchor_scores must be gate or prob, got {self.anchor_scores!r}")


@dataclass(frozen=True, eq=False)
class MoELayer:
    """One MoE block. Parameter names are those of `model.named_parameters()`.

    `fused` names tensors whose first dimension indexes the experts (expert e is `p[e]`);
    `per_expert[e]` names the whole tensors of expert e in a ModuleList layout. One of them is empty.
    """

    index: int  # decoder layer index (dense layers of mixed models are skipped, not renumbered)
    name: str  # the block's module path, e.g. "model.layers.3.mlp"
    router: torch.nn.Module
    router_params: tuple[str, ...]  # every parameter of the router; the weight first
    num_experts: int
    top_k: int
    fused: tuple[str, ...]
    per_expert: tuple[tuple[str, ...], ...]

    @property
    def router_weight(self) -> str:
        return self.router_params[0]

    def expert_params(self, expert: int) -> list[tuple[str, int | None]]:
        """(parameter name, index along dim 0 or None for the whole tensor) of one expert."""
        if not 0 <= expert < self.num_experts:
            raise UnlearnError(
                f"expert {expert} does not exist in MoE layer {self.index} "
                f"({self.num_experts} experts)"
            )
        if self.fused:
            return [(name, expert) for name in self.fused]
        return [(name, None) for name in self.per_expert[expert]]


@dataclass(frozen=True)
class ExpertChoice:
    """The expert to unlearn in one MoE layer, with its affinity score (Eq. 2)."""

    layer: int
    expert: int
    score: float


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """Every MoE block of `model`, in module order; UnlearnError when there is none."""
    names = {id(p): n for n, p in model.named_parameters()}
    config = getattr(model, "config", None)
    found: list[MoELayer] = []
    for block_name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        router_attr = next(
            (a for a in _ROUTER_NAMES if isinstance(getattr(block, a, None), torch.nn.Module)),
            None,
        )
        if router_attr is None:
            continue
        router = getattr(block, router_attr)
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        where = block_name or "<root>"
        n_experts = int(weight.shape[0])
        fused, per_expert = _expert_layout(experts, n_experts, names, where)
        router_params = [names[id(p)] for p in router.parameters() if id(p) in names]
        wname = names.get(id(weight))
        if wname is None:
            raise UnlearnError(f"the router weight of MoE block {where} is not a model parameter")
        router_params = [wname, *(n for n in router_params if n != wname)]
        found.append(
            MoELayer(
                index=_layer_index(block_name, len(found)),
                name=block_name,
                router=router,
                router_params=tuple(router_params),
                num_experts=n_experts,
                top_k=_top_k(router, block, config, where),
                fused=fused,
                per_expert=per_expert,
            )
        )
    if not found:
        kind = type(model).__name__
        raise UnlearnError(
            f"{kind} has no mixture-of-experts layer (no block with a router and experts); "
            "UOE needs an MoE model such as Mixtral, Qwen-MoE or OLMoE"
        )
    if len({layer.index for layer in found}) != len(found):
        raise UnlearnError(
            "could not number the MoE layers of this model uniquely from their module names; "
            "UOE supports models whose blocks live under a numbered layer list"
        )
    return found


def _expert_layout(
    experts: torch.nn.Module, n_experts: int, names: dict[int, str], where: str
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    if isinstance(experts, torch.nn.ModuleList):
        if len(experts) != n_experts:
            raise UnlearnError(
                f"MoE block {where}: the router scores {n_experts} experts but there are "
                f"{len(experts)}; this layout is not supported"
            )
        per = tuple(tuple(names[id(p)] for p in e.parameters() if id(p) in names) for e in experts)
        return (), per
    fused = []
    for p in experts.parameters():
        if id(p) not in names:
            continue
        if p.ndim == 0 or p.shape[0] != n_experts:
            raise UnlearnError(
                f"MoE block {where}: expert parameter {names[id(p)]} has shape {tuple(p.shape)}, "
                f"not [{n_experts}, ...] (one slice per expert); this layout is not supported"
            )
        fused.append(names[id(p)])
    if not fused:
        raise UnlearnError(f"MoE block {where}: its experts have no parameters")
    return tuple(fused), ()


def _layer_index(block_name: str, ordinal: int) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", block_name)
    return int(numbers[-1]) if numbers else ordinal


def _top_k(router: torch.nn.Module, block: torch.nn.Module, config: object, where: str) -> int:
    for owner in (router, block, config):
        for attr in _TOP_K_NAMES:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UnlearnError(
        f"MoE block {where}: cannot tell how many experts each token uses "
        "(no top_k / num_experts_per_tok on the router, the block or the config)"
    )


@contextmanager
def router_logits(
    model: torch.nn.Module, layers: Sequence[MoELayer] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the router logits of `layers` (default: every MoE layer) with forward hooks.

    Yields {layer index: logits [tokens, n_experts]}, tokens flattened batch-major ([B*T] rows in
    the order of `mask.reshape(-1)` for a [B, T] mask). Filled (and overwritten) by each forward
    pass inside the block; the tensors keep their graph, so a loss on them trains the router. Not
    `output_router_logits`, which not every model supports. Under reentrant gradient checkpointing
    the captured logits would carry no graph.
    """
    chosen = find_moe_layers(model) if layers is None else list(layers)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer: MoELayer):
        def hook(module, args, output) -> None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(logits, torch.Tensor) or logits.shape[-1] != layer.num_experts:
                raise UnlearnError(
                    f"the router of MoE layer {layer.index} did not return logits over its "
                    f"{layer.num_experts} experts first; this router is not supported"
                )
            captured[layer.index] = logits.reshape(-1, layer.num_experts)

        return hook

    try:
        for layer in chosen:
            handles.append(layer.router.register_forward_hook(hook_for(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def gate_scores(logits: torch.Tensor, top_k: int, score: Score = "gate") -> torch.Tensor:
    """Per-token expert scores [N, E] from router logits [N, E], in float32.

    "gate" is g of the paper's Sec. 3: the softmax probability where the expert is among the token's
    top-K, else 0 (not renormalised over the top-K, as in the paper's formula even for models that
    renormalise when mixing outputs); "prob" is the full softmax; "count" is 1 for the top-K.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if score == "prob":
        return probs
    k = min(top_k, probs.shape[-1])
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(k, dim=-1).indices, 1.0)
    if score == "count":
        return chosen
    if score == "gate":
        return probs * chosen
    raise ValueError(f"score must be gate, prob or count, got {score!r}")


def selected_tokens(
    attention_mask: torch.Tensor, labels: torch.Tensor | None, tokens: Tokens
) -> torch.Tensor:
    """The [B, T] bool mask of the tokens whose routing counts: attention mask, and with
    `tokens="answer"` a label other than -100 at that position (input token t is an answer token;
    the router at t sees it). `labels` may hold only the last columns of the batch (the training
    loop cuts them to the positions whose logits it keeps); they are aligned to the right.
    """
    keep = attention_mask.bool()
    if tokens == "all":
        return keep
    if tokens != "answer":
        raise UnlearnError(f"UOE tokens must be 'answer' or 'all', got {tokens!r}")
    if labels is None:
        raise UnlearnError(
            "UOE on answer tokens needs the batch's labels to find them; pass labels, or use "
            "localize.uoe_tokens=all"
        )
    rows, width = keep.shape
    if labels.ndim != 2 or labels.shape[0] != rows or labels.shape[1] > width:
        raise UnlearnError(
            f"UOE got labels of shape {tuple(labels.shape)} for a batch of shape {(rows, width)}"
        )
    answer = torch.zeros_like(keep)
    answer[:, width - labels.shape[1] :] = labels.to(keep.device) != IGNORE_INDEX
    return keep & answer


@torch.no_grad()
def attribute(
    model: torch.nn.Module,
    items: list[Tokenized],
    pad_id: int,
    batch_size: int = 8,
    tokens: Tokens = "answer",
    score: Score = "gate",
    layers: Sequence[MoELayer] | None = None,
) -> dict[int, torch.Tensor]:
    """Affinity of the forget data to each expert, per MoE layer: {layer index: [n_experts]}.

    Eq. 2 of the paper: s_i = (1/Z) sum_j (1/L_j) sum_t g_{i,t}, the per-sequence mean of the gate
    score, averaged over the Z sequences (sequences with no counted token are skipped). The paper
    computes it on a random subset of the forget set (over 100,000 tokens was enough); pass a subset
    to save time. `tokens="answer"` counts only the tokens with a label (the answer and its end
    token, not the chat template or question); "all" every non-padding token (the paper's L_j is
    the sequence length). Runs in eval mode; the mode is restored after.
    """
    if not items:
        raise UnlearnError("UOE expert attribution got no forget examples")
    if batch_size < 1:
        raise UnlearnError(f"attribution batch size must be >= 1, got {batch_size}")
    if tokens not in ("all", "answer"):
        raise UnlearnError(f"UOE attribution tokens must be 'answer' or 'all', got {tokens!r}")
    moe = find_moe_layers(model) if layers is None else list(layers)
    device = next(model.parameters()).device
    totals = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in moe}
    counted = 0
    was_training = model.training
    model.eval()
    try:
        with router_logits(model, moe) as captured:
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size], pad_id)
                keep = selected_tokens(batch["attention_mask"], batch["labels"], tokens)
                lengths = keep.sum(1)
                rows = lengths > 0
                if not bool(rows.any()):
                    continue
                captured.clear()
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
                weights = (keep / lengths.clamp(min=1)[:, None]).reshape(-1, 1).to(device)
                for layer in moe:
                    scores = gate_scores(captured[layer.index], layer.top_k, score)
                    totals[layer.index] += (
                        (scores * weights.to(scores.device)).sum(0).cpu().double()
                    )
                counted += int(rows.sum())
    finally:
        model.train(was_training)
    if counted == 0:
        raise UnlearnError(
            "UOE expert attribution found no tokens to count "
            + (
                "(no answer labels; use localize.uoe_tokens=all)"
                if tokens == "answer"
                else "(empty sequences)"
            )
        )
    return {index: (total / counted).float() for index, total in totals.items()}


def choose_experts(
    affinity: Mapping[int, torch.Tensor], layers: int | None = 1
) -> list[ExpertChoice]:
    """The top-1 expert of the `layers` MoE layers whose top-1 expert scores highest, best first.

    The paper unlearns one expert in total (layers=1, its M = 1); None takes every MoE layer. Ties
    go to the lowest expert index, then to the lowest layer index.
    """
    if not affinity:
        raise UnlearnError("UOE got no expert affinity to choose from")
    if layers is not None and not 1 <= layers <= len(affinity):
        raise UnlearnError(
            f"UOE was asked to unlearn experts in {layers} MoE layers, but the model has "
            f"{len(affinity)}; use a number from 1 to {len(affinity)}"
        )
    best = []
    for index, scores in affinity.items():
        values = [float(v) for v in scores.reshape(-1)]
        expert = values.index(max(values))  # the first maximum: the lowest index wins ties
        best.append(ExpertChoice(layer=int(index), expert=expert, score=values[expert]))
    best.sort(key=lambda c: (-c.score, c.layer))
    return best if layers is None else best[:layers]


def expert_mask(
    model: torch.nn.Module,
    moe_layers: Sequence[MoELayer],
    choices: Sequence[ExpertChoice],
    train_router: bool = True,
) -> dict[str, torch.Tensor]:
    """Boolean masks (CPU, each its parameter's shape) selecting the chosen experts' entries.

    Only parameters with a selected entry are in the dict (the training loop freezes the rest).
    A fused expert tensor gets its expert's slice; a ModuleList expert its whole tensors.
    `train_router` (Alg. 1 step 4) adds every parameter of the chosen layers' routers, whole.
    """
    by_index = {layer.index: layer for layer in moe_layers}
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}

    def mask_of(name: str) -> torch.Tensor:
        if name not in masks:
            masks[name] = torch.zeros(params[name].shape, dtype=torch.bool)
        return masks[name]

    for choice in choices:
        layer = by_index.get(choice.layer)
        if layer is None:
            raise UnlearnError(
                f"UOE chose MoE layer {choice.layer}, which the model does not have "
                f"(MoE layers: {sorted(by_index)})"
            )
        for name, index in layer.expert_params(choice.expert):
            if index is None:
                mask_of(name).fill_(True)
            else:
                mask_of(name)[index] = True
        if train_router:
            for name in layer.router_params:
                mask_of(name).fill_(True)
    return masks


def anchor_loss(
    logits: Mapping[int, torch.Tensor],
    choices: Sequence[ExpertChoice],
    moe_layers: Sequence[MoELayer],
    token_mask: torch.Tensor | None = None,
    scores: Literal["gate", "prob"] = "gate",
) -> torch.Tensor:
    """The router anchor loss (Eq. 3): ||g - onehot(chosen expert)||^2 per token.

    Averaged over the tokens where `token_mask` ([B, T] bool, the batch the logits came from; None
    counts every row) is true, and summed over the chosen layers (Eq. 4 adds one such term per
    anchored layer). `scores="gate"` uses the top-K gate score of Sec. 3, as the paper's g;
    "prob" the full softmax. The paper leaves the token set open; the mask should select the
    tokens the expert was chosen on (`selected_tokens`, as `Anchor.loss` does).
    """
    if not choices:
        raise UnlearnError("UOE anchor loss needs at least one chosen expert")
    by_index = {layer.index: layer for layer in moe_layers}
    terms = []
    for choice in choices:
        if choice.layer not in logits:
            raise UnlearnError(
                f"no router logits were captured for MoE layer {choice.layer}; run the forward "
                "pass inside router_logits(model, layers) with that layer"
            )
        layer = by_index.get(choice.layer)
        if layer is None:
            raise UnlearnError(f"MoE layer {choice.layer} is not among the given MoE layers")
        g = gate_scores(logits[choice.layer], layer.top_k, scores)
        target = F.one_hot(torch.tensor(choice.expert, device=g.device), g.shape[-1]).to(g)
        per_token = (g - target).pow(2).sum(-1)
        if token_mask is not None:
            keep = token_mask.reshape(-1).to(device=per_token.device, dtype=torch.bool)
            if keep.numel() != per_token.numel():
                raise UnlearnError(
                    f"anchor loss token mask has {keep.numel()} entries, the router logits of "
                    f"layer {choice.layer} {per_token.numel()} tokens"
                )
            per_token = per_token[keep]
        terms.append(per_token.mean() if per_token.numel() else per_token.sum())
    return torch.stack(terms).sum()


@dataclass(frozen=True)
class Anchor:
    """The router anchor as the training loop applies it: which experts, and the loss weight.

    The loop runs the forget batch inside `capture` and adds `loss` to the method's forget term.
    `tokens` is the attribution's token selection (localize.uoe_tokens): the anchor holds the
    same tokens on the chosen expert.
    """

    choices: tuple[ExpertChoice, ...]
    weight: float = 1.0
    scores: Literal["gate", "prob"] = "gate"
    tokens: Tokens = "answer"

    @classmethod
    def from_info(
        cls, experts: Sequence[Mapping[str, Any]], weight: float, tokens: Tokens = "answer"
    ) -> Anchor:
        """From the `experts` list a localization records (layer, expert, score per choice)."""
        choices = tuple(
            ExpertChoice(int(e["layer"]), int(e["expert"]), float(e["score"])) for e in experts
        )
        return cls(choices=choices, weight=weight, tokens=tokens)

    def _layers(self, model: torch.nn.Module) -> list[MoELayer]:
        wanted = {c.layer for c in self.choices}
        return [layer for layer in find_moe_layers(model) if layer.index in wanted]

    @contextmanager
    def capture(self, model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
        with router_logits(model, self._layers(model)) as captured:
            yield captured

    def loss(
        self,
        model: torch.nn.Module,
        captured: Mapping[int, torch.Tensor],
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """weight * Eq. 3 over the chosen layers, on the forget batch's `selected_tokens`: the
        answer tokens (labels required; they may be cut to the last columns) or, with
        tokens="all", every token of `attention_mask` ([B, T], the batch the logits came from).
        """
        keep = selected_tokens(attention_mask, labels, self.tokens)
        term = anchor_loss(captured, self.choices, self._layers(model), keep, self.scores)
        return self.weight * term
