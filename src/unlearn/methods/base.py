"""What every unlearning method is: hyperparameters, a loss, and a declaration of what it needs.

The shared training loop (`unlearn.train.loop`) runs the model on a forget batch (and a retain batch
when the method declares a retain term), looks up cached reference values, and hands everything to
the method's `loss`. A method never runs the model itself, never owns an optimizer, and never
inherits from another method: what methods share lives in `unlearn.losses` and
`unlearn.methods.retain`.

Everything beyond "logits of the forget batch" is a declaration, so a method file stays the one
place a method lives and the loop never looks for attribute names:

* `needs(params) -> Needs`: a retain term and its weight, cached reference values on the forget
  batch (sequence log-prob, per-token log-probs, full logits), a second answer per example (DPO),
  hidden states of named layers from the model and from a frozen reference (RMU);
* `forget_targets(examples, params, seed)`: the answers to train on instead of the data's (refusals);
* `second_targets(examples, params, seed)`: the second answer of every forget example (DPO's
  preferred answer when the forget answer is the rejected one);
* `parameter_mask(model, params)`: which parameter entries may change (GRIN-style localisation);
* `init_state` / `update_state`: a few floats the method carries from step to step (PDU's dual
  variable), saved in checkpoints and logged;
* `finalize(start, trained, params)`: new weights from the start and the trained ones, after the
  last step (task-vector negation).

How the forget and retain gradients combine is a declaration too (`Needs.gradients`): summed, the
forget gradient projected off the retain gradient (PCGrad), or UNO's: the method's loss and the
retain term descended with a penalty on the cosine of their gradient and the gradient of a `probe`
loss (a double backward), alternating with steps projected off that gradient (UNO-S). The loop
computes them; a method never calls autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from unlearn.losses import Logits

RefValue = Literal["sequence_logp", "token_logp", "logits", "reinforced_logits"]
REF_VALUES: tuple[str, ...] = ("sequence_logp", "token_logp", "logits", "reinforced_logits")
GRADIENTS: tuple[str, ...] = ("sum", "pcgrad", "uno", "uno_s")


@dataclass(frozen=True)
class RetainTerm:
    """A retain term on its own batch: `weight * term`, term = NLL, KL to the start, or `loss`.

    kind "nll" / "kl" use `unlearn.methods.retain.retain_term`; any other kind needs `loss`, a
    function of the retain batch's LossInputs (its fields `retain_*` and `ref_retain_*` are set).
    """

    weight: float
    kind: str = "nll"
    loss: Callable[[LossInputs], torch.Tensor] | None = None
    state_weight: str | None = (
        None  # the weight is `weight * state[state_weight]` (a dual variable)
    )
    # what the term averages over ("token": NLL and KL; "sequence"), so that processes holding
    # parts of a batch weigh their parts as the whole batch's mean would (`schedule.shard`)
    mean_over: str = "token"


@dataclass(frozen=True)
class Reinforce:
    """A reinforced model (WHP): the starting model fine-tuned further on the forget data with
    plain NLL, `steps` optimizer steps at `lr` (the run's batch size and seed), whose logits on the
    forget examples are cached as the reference value "reinforced_logits" before the copy is freed."""

    steps: int
    lr: float


@dataclass(frozen=True)
class Needs:
    """What the loop must provide for one set of hyperparameters.

    retain: the retain term, or None (no retain batch is forwarded at all).
    reference: values of the starting model on the forget batch, cached in one pass before training
        (no second model in memory): "sequence_logp" [B], "token_logp" [B, T-1] aligned with
        `losses.token_logprobs`, "logits" [B, T, V] (memory: N x T x V floats on the CPU).
    second_target: every forget example has a second answer (`Method.second_targets`); both are
        forwarded and the reference values above are cached for both.
    hidden_layers: decoder blocks (0-based) whose output hidden states the loss reads, [B, T, H]
        over the full sequence (what a forward hook on block i sees).
    reference_hidden_layers: the same from a frozen copy of the starting model that holds only the
        embeddings and the blocks up to the deepest one named, on the batches named in
        `reference_hidden_on` ("forget", "retain").
    logits: False when the loss reads hidden states only: the model then runs only up to the
        deepest block in `hidden_layers` and the logits in LossInputs are None.
    gradients: "sum" (the usual); "pcgrad" (when the forget gradient g_f and the weighted retain
        gradient g_r conflict, g_f . g_r < 0, g_f loses its component along g_r; needs a retain
        term); "uno" (with g_p the gradient of `Method.probe` and g_d that of the method's loss
        plus the retain term, the step minimises loss + retain + `orthogonal_weight` *
        (g_p . g_d)^2 / (|g_p|^2 |g_d|^2), by a double backward); "uno_s" ("uno" on odd steps;
        on even steps it follows g_d minus its component along g_p). The last two need a probe.
    reinforce: train a reinforced copy first and cache its logits (see `Reinforce`).
    """

    retain: RetainTerm | None = None
    reference: tuple[str, ...] = ()
    second_target: bool = False
    hidden_layers: tuple[int, ...] = ()
    reference_hidden_layers: tuple[int, ...] = ()
    reference_hidden_on: tuple[str, ...] = ("forget", "retain")
    logits: bool = True
    gradients: str = "sum"
    orthogonal_weight: float = 0.0
    reinforce: Reinforce | None = None

    def __post_init__(self) -> None:
        unknown = [r for r in self.reference if r not in REF_VALUES]
        if unknown:
            raise ValueError(f"unknown reference value {unknown[0]!r}; valid: {REF_VALUES}")
        if self.gradients not in GRADIENTS:
            raise ValueError(f"unknown gradients {self.gradients!r}; valid: {GRADIENTS}")
        if "reinforced_logits" in self.reference and self.reinforce is None:
            raise ValueError("reference 'reinforced_logits' needs `reinforce`")
        if not self.logits and not self.hidden_layers:
            raise ValueError("logits=False needs hidden_layers: the loss must read something")

    @property
    def reference_model(self) -> bool:
        """Whether a whole frozen copy of the starting model stays in memory during training (a KL
        retain term; reference hidden states keep only the blocks they need)."""
        return self.retain is not None and self.retain.kind == "kl"


@dataclass
class LossInputs:
    """One micro-batch's model outputs and cached values.

    forget_logits / forget_labels: the model on the forget batch, [B, T, V] and [B, T] (-100 masked),
        (logits None when `Needs.logits` is False; labels then cover the full sequence)
        where T counts positions from the one before the batch's first answer token (prompt
        positions before it carry no loss, so the loop computes no logits there; cached reference
        values and reference logits are cut the same way). With `train.logits_chunk` the logits
        are a `losses.HeadLogits` (not yet projected): read them through the `losses` functions
        (`token_logprobs`, `sequence_logprob`, `nll`, `kl_to_reference`, `answer_logits`).
    retain_logits / retain_labels: the model on the paired retain batch, or None if not requested.
    ref_forget_logp: log pi_ref(y|x) summed over answer tokens [B] (= ref_forget["sequence_logp"]).
    ref_forget: the declared cached reference values on the forget batch (see `Needs.reference`).
    ref_retain_logits: the frozen starting model on the retain batch (only for KL retain terms).
    second_logits / second_labels / ref_second: the same for the second answer (DPO-style methods).
    forget_hidden / retain_hidden / ref_forget_hidden / ref_retain_hidden: {layer: [B, T, H]}.
    state: the method's state before this step (`Method.init_state`), read-only.
    prepared: what `Method.prepare` returned (the same object for every batch), or None.
    """

    forget_logits: Logits | None
    forget_labels: torch.Tensor
    retain_logits: Logits | None = None
    retain_labels: torch.Tensor | None = None
    ref_forget_logp: torch.Tensor | None = None
    ref_retain_logits: Logits | None = None
    ref_forget: dict[str, torch.Tensor] = field(default_factory=dict)
    second_logits: Logits | None = None
    second_labels: torch.Tensor | None = None
    ref_second: dict[str, torch.Tensor] = field(default_factory=dict)
    forget_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    retain_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    ref_forget_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    ref_retain_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    state: dict[str, float] = field(default_factory=dict)
    prepared: Any = None


@dataclass(frozen=True)
class StepInfo:
    """What `Method.update_state` sees after an optimizer step: completed steps, total steps, and
    the step's loss terms averaged over its micro-batches (e.g. "retain_loss", unweighted)."""

    step: int
    total: int
    logs: dict[str, float]


LossFn = Callable[[LossInputs, Any], "tuple[torch.Tensor, dict[str, float]]"]
TargetsFn = Callable[[Sequence[Any], Any, int], "list[str]"]
MaskFn = Callable[[torch.nn.Module, Any], "dict[str, torch.Tensor]"]
StateFn = Callable[[Any], "dict[str, float]"]
PrepareFn = Callable[[Any, Any], Any]
ProbeFn = Callable[[LossInputs, Any], torch.Tensor]
UpdateFn = Callable[["dict[str, float]", StepInfo, Any], "dict[str, float]"]
FinalizeFn = Callable[
    ["dict[str, torch.Tensor]", "dict[str, torch.Tensor]", Any], "dict[str, torch.Tensor]"
]


def _no_needs(params: Any) -> Needs:
    return Needs()


@dataclass(frozen=True)
class Method:
    """A registered unlearning method.

    name: CLI name (`--method npo`).
    summary: one line for `unlearn methods`.
    params: the frozen hyperparameter dataclass; every field has the paper's default.
    loss: (LossInputs, params) -> (the forget term to minimise, {term name: float} to log). The
        retain term is not part of it: it is declared once (`needs(params).retain`) and the loop
        adds it, on its own batch and in a backward pass of its own.
    citation: where the defaults and the formula come from.
    needs: params -> Needs, what the loop must provide (default: the forget logits only).
    forget_targets: (forget examples, params, seed) -> the answer to train on for each example,
        replacing the data's (refusal-style methods); None keeps the data's answers.
    second_targets: (forget examples, params, seed) -> a second answer per example; required when
        `needs(params).second_target`.
    parameter_mask: (model, params) -> {parameter name: bool tensor of its shape}. Only the
        selected entries change: gradients are masked, weight decay touches only selected entries,
        and parameters not in the dict (or with no entry selected) get no optimizer state.
    init_state: params -> {name: float}, the state the loss reads in `LossInputs.state`.
    update_state: (state, StepInfo, params) -> new state, after every optimizer step.
    finalize: (start weights {name: CPU tensor}, trained weights, params) -> {name: new weight},
        applied after the last step; the loop keeps a CPU copy of the start only for such methods.
    prepare: (params, tokenizer) -> a value the loss reads as `LossInputs.prepared`, computed
        once before training (WHP's anchored terms as token ids).
    mean_over: "sequence" or "token", what the forget loss averages over (see the field).
    probe: (LossInputs, params) -> a loss on the same batch that is never minimised: its gradient
        is what the "uno"/"uno_s" gradient modes keep the descent orthogonal to (UNO's L_f).
    """

    name: str
    summary: str
    params: type
    loss: LossFn
    citation: str
    needs: Callable[[Any], Needs] = _no_needs
    forget_targets: TargetsFn | None = None
    second_targets: TargetsFn | None = None
    parameter_mask: MaskFn | None = None
    init_state: StateFn | None = None
    update_state: UpdateFn | None = None
    finalize: FinalizeFn | None = None
    prepare: PrepareFn | None = None
    probe: ProbeFn | None = None
    # what the forget loss averages over: "sequence" (NPO, DPO: a mean of per-sequence terms),
    # "token" (NLL-like: a mean over the batch's answer tokens), or (sequence, params) -> how many
    # of its tokens the mean counts. Data-parallel and sharded runs weigh each process's part by
    # it, so the result does not depend on the process count.
    mean_over: Any = "sequence"

    def needs_retain(self, params: Any) -> bool:
        """Whether the loop must forward a retain batch (a declared retain term, weight != 0)."""
        term = self.needs(params).retain
        return term is not None and term.weight != 0

    def needs_reference_model(self, params: Any) -> bool:
        """Whether a frozen copy of the starting model is kept during training."""
        return self.needs(params).reference_model

    @property
    def needs_reference_logp(self) -> bool:
        """Whether the default hyperparameters cache log pi_ref(y|x) (for `--dry-run` listings)."""
        return "sequence_logp" in self.needs(self.params()).reference
