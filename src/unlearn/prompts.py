"""Turning examples into token ids and labels, with the loss only where it belongs.

A question/answer pair is rendered with the model's chat template when it has one (else a plain
"Question: ... Answer: ..." template) and labelled so that only the answer tokens and the token that
ends the answer carry loss. The end token matters: SmolLM2's pad token is its end-of-turn token, so
a collator that masks padding by id would also mask the end of every answer and the model would
never learn to stop. We therefore build labels ourselves from positions, not from token ids.
Documents are tokenized whole and cut into windows of `max_length` tokens, every token labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from unlearn.config import PromptConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.losses import IGNORE_INDEX

PLAIN_QUESTION = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Tokenized:
    """One training sequence. `source` is the index of the example it came from."""

    input_ids: list[int]
    labels: list[int]
    source: int


#: How an evaluation set is put to the model (`EvalSet.prompt`): "model" follows the PromptConfig
#: (chat template or plain, as the model was trained); "plain" forces PLAIN_QUESTION; "raw" uses
#: the question text verbatim (a prefix to continue, or a prompt the data already renders);
#: "few_shot" puts the set's rendered examples before a plain question.
PROMPT_STYLES = ("model", "plain", "raw", "few_shot")


class PromptFormatter:
    """Renders prompts for one tokenizer and one PromptConfig, consistently in training and eval.

    `style`, `shots` and `stop` are an evaluation set's declaration (see PROMPT_STYLES): a set
    that is not asked the model's way gets its own formatter, not a subclass. `stop` strings end a
    generation (the text is cut before the first one); a stop string that is one token also stops
    decoding there, so nothing is spent past it.
    """

    def __init__(
        self,
        tokenizer,
        cfg: PromptConfig,
        style: str = "model",
        shots: str = "",
        stop: tuple[str, ...] = (),
        template: str | None = None,
    ) -> None:
        if style not in PROMPT_STYLES:
            raise UnlearnError(
                f"unknown prompt style '{style}'; choose one of {', '.join(PROMPT_STYLES)}"
            )
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.style = style
        self.shots = shots
        self.stop = tuple(stop)
        self.template = template or PLAIN_QUESTION
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.template == "chat" and not has_template and style == "model":
            raise UnlearnError(
                "prompt.template=chat, but this tokenizer has no chat template; "
                "use prompt.template=plain"
            )
        self.use_chat = style == "model" and (
            cfg.template == "chat" or (cfg.template == "auto" and has_template)
        )
        self._end_ids = self._answer_end_ids()

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """Stop strings that are a single token: decoding can stop at them."""
        out = []
        for s in self.stop:
            ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out.append(ids[0])
        return out

    def cut(self, text: str) -> str:
        """A generation up to its first stop string (the whole text when none occurs)."""
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text.strip()

    @property
    def end_ids(self) -> list[int]:
        """The token ids that close an answer (end-of-turn marker, or EOS for plain prompts)."""
        return self._end_ids

    def _messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        msgs = []
        if self.cfg.system_prompt == "none":
            msgs.append({"role": "system", "content": ""})
        elif self.cfg.system_prompt != "default":
            msgs.append({"role": "system", "content": self.cfg.system_prompt})
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def prompt_text(self, question: str) -> str:
        """The text a model sees before it answers (used for generation too)."""
        if self.style == "raw":
            return question
        if self.style == "few_shot":
            return self.shots + self.template.format(question=question)
        if not self.use_chat:
            return self.template.format(question=question)
        try:
            return self.tokenizer.apply_chat_template(
                self._messages(question), tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # templates raise their own exception types (jinja, ValueError)
            raise UnlearnError(
                f"the tokenizer's chat template failed ({str(exc).splitlines()[0][:120]}); "
                "try prompt.system_prompt=default or prompt.template=plain"
            ) from None

    def _answer_end_ids(self) -> list[int]:
        """Tokens that close an answer: the template's end-of-turn marker, or EOS for plain."""
        tok = self.tokenizer
        if self.use_chat:
            marker = "\u2063ANSWER\u2063"
            full = tok.apply_chat_template(
                self._messages("q", marker), tokenize=False, add_generation_prompt=False
            )
            suffix = full.split(marker, 1)[1].rstrip()
            ids = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
            if ids:
                return list(ids)
        if tok.eos_token_id is None:
            raise UnlearnError("the tokenizer has no EOS token; set one before training")
        return [tok.eos_token_id]

    @cached_property
    def label_end_ids(self) -> list[int]:
        """The tokens evaluation scores after an answer, as TOFU's and OpenUnlearning's label
        builders do: everything the template renders after the answer (for ChatML `<|im_end|>` and
        the newline after it), then EOS unless that already ends with EOS. Training keeps
        `end_ids`; this only fixes which tokens an answer's probability covers."""
        tok = self.tokenizer
        ids: list[int] = []
        if self.use_chat:
            marker = "\u2063ANSWER\u2063"
            full = tok.apply_chat_template(
                self._messages("q", marker), tokenize=False, add_generation_prompt=False
            )
            suffix = full.split(marker, 1)[1]
            ids = list(tok(suffix, add_special_tokens=False)["input_ids"]) if suffix else []
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids.append(tok.eos_token_id)
        return ids or list(self._end_ids)

    def encode_qa(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids including the end marker)."""
        tok = self.tokenizer
        text = self.prompt_text(question)
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        if not self.use_chat and _adds_bos(tok):
            prompt_ids = [tok.bos_token_id, *prompt_ids]
        # a plain prompt's answer follows a space, unless the prompt already ends with one
        lead = "" if self.use_chat or text[-1:].isspace() else " "
        answer_ids = tok(lead + answer.strip(), add_special_tokens=False)["input_ids"]
        return list(prompt_ids), [*answer_ids, *self._end_ids]


def _adds_bos(tok) -> bool:
    """Plain text is tokenized without special tokens, so add BOS by hand where the model wants it."""
    return getattr(tok, "bos_token_id", None) is not None and bool(
        getattr(tok, "add_bos_token", False)
    )


def tokenize_examples(
    examples: list[Example],
    formatter: PromptFormatter,
    answers: list[str] | None = None,
) -> list[Tokenized]:
    """Tokenize a data set. `answers` replaces the examples' answers (refusal targets)."""
    max_len = formatter.cfg.max_length
    out: list[Tokenized] = []
    for i, ex in enumerate(examples):
        if ex.kind == "qa":
            answer = answers[i] if answers is not None else ex.answer
            p_ids, a_ids = formatter.encode_qa(ex.question or "", answer or "")
            if len(p_ids) >= max_len:
                raise UnlearnError(
                    f"example id {ex.id}: the prompt alone is {len(p_ids)} tokens, over "
                    f"prompt.max_length={max_len}; raise prompt.max_length"
                )
            ids = (p_ids + a_ids)[:max_len]
            labels = ([IGNORE_INDEX] * len(p_ids) + a_ids)[:max_len]
            out.append(Tokenized(ids, labels, i))
        else:
            tok = formatter.tokenizer
            ids = tok(ex.text, add_special_tokens=False)["input_ids"]
            if _adds_bos(tok):
                ids = [tok.bos_token_id, *ids]
            for start in range(0, len(ids), max_len):
                chunk = ids[start : start + max_len]
                if len(chunk) >= 2:
                    out.append(Tokenized(chunk, list(chunk), i))
    return out


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100 by position, never by id."""
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, t in enumerate(items):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
