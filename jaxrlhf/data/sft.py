"""SFT dataset: records -> (token ids, loss mask) per sample, checked and tokenized up front, OpenRLHF's semantics.

A sample is built from text pieces, each with a flag "the model learns these tokens"; pieces are tokenized
separately (``add_special_tokens=False``) and concatenated, so the loss mask follows the prompt/response split
exactly (a BPE merge never straddles it: generation also starts right after the prompt's tokens).

Modes (OpenRLHF ``SFTDataset`` / ``preprocess_data``):
- plain (default): prompt = ``record[input_key]`` (``--input_template`` applied: ``template.format(prompt)``),
  response = ``record[output_key]``; loss on the response.
- ``apply_chat_template``: prompt messages = ``record[input_key]`` (a string becomes one user message, or a list of
  ``{"role", "content"}``); response = ``record[output_key]`` (a string becomes one assistant message, or a message
  or list of messages). prompt text = ``template(prompt, add_generation_prompt=True)``, response text = the rest of
  ``template(prompt + response)``. Without ``output_key`` the conversation in ``input_key`` ends with the response.
- no ``output_key`` given and every record has string ``input_key`` and ``output`` fields (the rows
  ``batch_inference``'s ``rs`` / ``csft`` post-processors write): ``output`` is the response field, so those files
  train with the default keys (``summary()`` says so).
- ``multiturn`` (with the chat template): the conversation in ``input_key`` (plus ``record[output_key]`` appended
  when given); loss on every assistant turn: for assistant message i, the text between
  ``template(msgs[:i], add_generation_prompt=True)`` and ``template(msgs[:i+1])``; everything else is context.
- ``pretrain_mode`` (continued pre-training): text = ``record[input_key]``, no template, loss on every token.

Every sample ends with EOS (appended when the text does not already end with it; outside --pretrain_mode trailing
newlines of the last piece are stripped first, as OpenRLHF does, so a template ending "<|im_end|>\\n" ends on its
EOS). A sample longer than ``max_len`` is cut to ``max_len`` tokens and its last token replaced by EOS
(``num_truncated``). A sample whose first learned token sits at position ``>= max_len - 2`` (the prompt alone fills
the row, OpenRLHF's rule) is dropped (``num_dropped_too_long``), and so is a sample with nothing to learn, e.g. an
empty response (``num_dropped_empty``). The caller logs ``summary()``; nothing is dropped silently.

``loss_mask[t] = 1`` marks token t as a training target (predicted from tokens < t); ``loss_mask[0]`` is always 0
(nothing predicts a sample's first token), so packed and padded layouts learn exactly the same tokens.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from jaxrlhf.data.loader import right_pad
from jaxrlhf.data.prompts import _column, _columns, implicit_text_field

Messages = list[dict[str, str]]
Piece = tuple[str, bool]  # (text, learned)


@dataclass(frozen=True)
class SFTSample:
    """Token ids (ending with EOS) and the 0/1 loss mask aligned with them."""

    input_ids: list[int]
    loss_mask: list[int]


class SFTDataset:
    """Samples built once from records; ``ds.batch(indices)`` gives the padded arrays of a train/eval batch."""

    def __init__(
        self,
        records: Dataset | Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        input_key: str = "input",
        output_key: str | None = None,
        input_template: str | None = None,
        apply_chat_template: bool = False,
        multiturn: bool = False,
        pretrain_mode: bool = False,
        max_len: int = 2048,
        source: str = "<records>",
    ) -> None:
        """``source`` names the dataset in error messages and the summary."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if pretrain_mode and (apply_chat_template or input_template or multiturn or output_key):
            raise ValueError("--pretrain_mode trains on the raw --input_key text: drop --apply_chat_template, "
                             "--input_template, --multiturn and --output_key")
        if multiturn and not apply_chat_template:
            raise ValueError("--multiturn needs --apply_chat_template (assistant turns are found through the chat "
                             "template)")
        if apply_chat_template and input_template is not None:
            raise ValueError("pass either --apply_chat_template or --input_template, not both (OpenRLHF ignores "
                             "--input_template when the chat template is applied)")
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--apply_chat_template is set but the tokenizer has no chat_template: pass "
                             "--tokenizer_chat_template or use --input_template")
        if input_template is not None and "{}" not in input_template:
            raise ValueError(f"--input_template {input_template!r} has no '{{}}' placeholder for the input text")
        self.implicit_key = None
        if output_key is None and not (pretrain_mode or multiturn):
            output_key = self.implicit_key = implicit_text_field(records, "output", [input_key])
        if not (pretrain_mode or apply_chat_template or output_key):
            raise ValueError("--output_key is required (the response field) unless --apply_chat_template takes the "
                             "response from the conversation, or --pretrain_mode trains on the input text")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; SFT samples end with EOS")
        if len(records) == 0:
            raise ValueError(f"dataset {source} is empty: it has 0 records")
        columns = _columns(records)
        for flag, key in (("--input_key", input_key), ("--output_key", output_key)):
            if key is not None and key not in columns:
                raise KeyError(f"{flag} '{key}' is not a field of dataset {source}; available keys: {columns}")

        self.source, self.max_len, self.pretrain_mode = source, max_len, pretrain_mode
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs = _column(records, input_key, source)
        outputs = _column(records, output_key, source) if output_key else [None] * len(inputs)
        fmt = _Formatter(tokenizer, input_key, output_key, input_template, apply_chat_template, multiturn,
                         pretrain_mode, source)
        pieces = [fmt(i, x, y) for i, (x, y) in enumerate(zip(inputs, outputs))]

        # one batched tokenizer call over every piece of every record
        flat = [text for ps in pieces for text, _ in ps]
        encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        eos = tokenizer.eos_token_id
        self.samples: list[SFTSample] = []
        self.num_truncated = self.num_dropped_too_long = self.num_dropped_empty = 0
        k = 0
        for ps in pieces:
            ids: list[int] = []
            mask: list[int] = []
            for _, learned in ps:
                ids += encoded[k]
                mask += [int(learned)] * len(encoded[k])
                k += 1
            if ids:
                mask[0] = 0  # nothing predicts the first token
            if not any(mask):  # nothing to learn besides the EOS we would append
                self.num_dropped_empty += 1
                continue
            if ids[-1] != eos:
                ids.append(eos)
                mask.append(int(ps[-1][1]))
            first = mask.index(1)
            if not pretrain_mode and first >= max_len - 2:
                self.num_dropped_too_long += 1
                continue
            if len(ids) > max_len:
                ids, mask = ids[:max_len], mask[:max_len]
                ids[-1] = eos
                self.num_truncated += 1
            self.samples.append(SFTSample(ids, mask))
        self.num_records = len(inputs)
        if not self.samples:
            raise ValueError(f"no usable samples in dataset {source}: {self.summary()}")
        longest = max(len(s.input_ids) for s in self.samples)
        self.max_token_id = max(max(s.input_ids) for s in self.samples)  # checked against the model's vocab_size
        self.seq_len = min(max_len, -(-longest // 8) * 8)  # one padded length for every batch: one compile

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> SFTSample:
        return self.samples[idx]

    def summary(self) -> str:
        """One line for the log: kept samples and every reason a record was changed or dropped."""
        return (f"{len(self.samples)} of {self.num_records} records kept; {self.num_dropped_too_long} dropped (the "
                f"prompt fills --max_len {self.max_len} - 2), {self.num_dropped_empty} dropped (nothing to learn: "
                f"empty response or no assistant turn); {self.num_truncated} truncated to --max_len (EOS kept)"
                + (f"; responses from the '{self.implicit_key}' field (no --output_key given)" if self.implicit_key
                   else ""))

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Right-padded ``input_ids``/``attention_mask`` [n, seq_len] int32, ``loss_mask`` [n, seq_len] float32, and
        ``num_tokens`` (float32 scalar) = the number of learned tokens in these rows (the loss normaliser)."""
        chosen = [self.samples[int(i)] for i in indices]
        ids, attn = right_pad([s.input_ids for s in chosen], self.pad_id, length=self.seq_len)
        lm, _ = right_pad([s.loss_mask for s in chosen], 0, length=self.seq_len)
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm.astype(np.float32),
                "num_tokens": np.float32(lm.sum())}


# ---------------------------------------------------------------------------------------------------------------------
# Record -> text pieces
# ---------------------------------------------------------------------------------------------------------------------


def _messages(value: Any, *, default_role: str, row: int, key: str, source: str) -> Messages:
    """A string -> one message of ``default_role``; a message dict or a list of them is checked and kept."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    items = [value] if isinstance(value, Mapping) else value
    if isinstance(items, (list, tuple)) and items:
        out = []
        for j, m in enumerate(items):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"row {row} of dataset {source}: message {j} of '{key}' is {str(m)[:80]!r} "
                                 f"({type(m).__name__}); expected a dict with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise ValueError(f"row {row} of dataset {source}: '{key}' is {type(value).__name__} ({str(value)[:80]!r}); "
                     "expected a string or a non-empty list of {'role', 'content'} messages")


def _text(value: Any, *, row: int, key: str, source: str, hint: str = "") -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"row {row} of dataset {source}: '{key}' is {type(value).__name__} ({str(value)[:80]!r}); "
                     f"expected a string{hint}")


class _Formatter:
    """One record's (input, output) values -> [(text, learned), ...] for the chosen mode (module docstring)."""

    def __init__(self, tokenizer, input_key, output_key, input_template, apply_chat_template, multiturn,
                 pretrain_mode, source):
        self.tok, self.input_key, self.output_key = tokenizer, input_key, output_key
        self.input_template, self.chat, self.multiturn = input_template, apply_chat_template, multiturn
        self.pretrain_mode, self.source = pretrain_mode, source

    def render(self, messages: Messages, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def after(self, full: str, prefix: str, row: int, what: str) -> str:
        """``full`` minus its prefix ``prefix``; a template that renders a prefix differently is an error."""
        if not full.startswith(prefix):
            raise ValueError(
                f"row {row} of dataset {self.source}: the chat template renders {what} differently from the start "
                f"of the longer conversation ({prefix[-40:]!r} vs {full[:len(prefix)][-40:]!r}), so the learned "
                "tokens cannot be located; pass a prefix-consistent --tokenizer_chat_template")
        return full[len(prefix):]

    def __call__(self, row: int, value: Any, output: Any) -> list[Piece]:
        try:
            return self.pieces(row, value, output)
        except ValueError as e:  # row numbers move with blending and splits: show the record itself too
            record = {self.input_key: value, **({self.output_key: output} if self.output_key else {})}
            raise ValueError(f"{e}. The record: {str(record)[:200]}") from None

    def pieces(self, row: int, value: Any, output: Any) -> list[Piece]:
        ik, ok, src = self.input_key, self.output_key, self.source
        if self.pretrain_mode:
            return [(_text(value, row=row, key=ik, source=src), True)]
        if not self.chat:
            hint = " (a list of messages needs --apply_chat_template)" if isinstance(value, (list, tuple)) else ""
            prompt = _text(value, row=row, key=ik, source=src, hint=hint)
            prompt = self.input_template.format(prompt) if self.input_template else prompt
            return [(prompt, False), (_text(output, row=row, key=ok, source=src).rstrip("\n"), True)]
        if self.multiturn:
            msgs = _messages(value, default_role="user", row=row, key=ik, source=src)
            if ok is not None and output is not None:
                msgs = msgs + _messages(output, default_role="assistant", row=row, key=ok, source=src)
            return self.turns(msgs, row)
        if ok is not None:
            prompt_msgs = _messages(value, default_role="user", row=row, key=ik, source=src)
            response_msgs = _messages(output, default_role="assistant", row=row, key=ok, source=src)
        else:
            msgs = _messages(value, default_role="user", row=row, key=ik, source=src)
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise ValueError(f"row {row} of dataset {src}: without --output_key the conversation in '{ik}' must "
                                 f"end with an assistant message (the response), got roles "
                                 f"{[m['role'] for m in msgs]}")
            prompt_msgs, response_msgs = msgs[:-1], msgs[-1:]
        prompt = self.render(prompt_msgs, True)
        response = self.after(self.render(prompt_msgs + response_msgs, False), prompt, row, "the prompt")
        return [(prompt, False), (response.rstrip("\n"), True)]

    def turns(self, msgs: Messages, row: int) -> list[Piece]:
        """Context and assistant pieces of a whole conversation (loss on every assistant turn)."""
        pieces: list[Piece] = []
        done = ""  # text rendered so far
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self.render(msgs[:i], True)
            upto = self.render(msgs[:i + 1], False)
            pieces.append((self.after(prefix, done, row, f"the conversation before message {i}"), False))
            pieces.append((self.after(upto, prefix, row, f"the prompt of message {i}"), True))
            done = upto
        tail = self.after(self.render(msgs, False), done, row, "the conversation")
        if tail:
            pieces.append((tail, False))
        if pieces:  # OpenRLHF strips trailing newlines before appending EOS
            text, learned = pieces[-1]
            pieces[-1] = (text.rstrip("\n"), learned)
        return [p for p in pieces if p[0]] or [("", False)]
