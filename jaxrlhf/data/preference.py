"""Preference data: paired (chosen / rejected, for the reward model and DPO) and unpaired (desirable / undesirable,
for KTO), tokenized once and checked up front, then padded into batches.

Text, as OpenRLHF builds it (``openrlhf/datasets/reward_dataset.py`` and ``unpaired_preference_dataset.py``):

- ``apply_chat_template``: the prompt is ``template(prompt_messages, add_generation_prompt=True)`` and a response is
  ``template(prompt_messages + response_messages)[len(prompt):]``: the split runs through the chat template. A string
  prompt counts as one user message and a string response as one assistant message; lists of ``{"role",
  "content"}`` messages are taken as they are. Without a prompt field, the response conversations carry the prompt:
  the prompt is every message but the last, and chosen and rejected must share it.
- otherwise prompt and responses must be strings; the prompt is ``input_template.format(prompt)`` when a template
  is given (``""`` without a prompt field). Pairs without ``--prompt_key`` whose records all carry string
  ``prompt``, chosen and rejected fields (``batch_inference``'s ``iter_dpo`` rows) take ``prompt`` as the prompt
  field, so those files train with the default keys.

Tokens: the prompt and each response are tokenized separately with ``add_special_tokens=False`` (a chat template
writes its own BOS) and concatenated, so the prompt/response boundary is exact and the prompt tokens are the ones a
policy sees at generation time (OpenRLHF tokenizes the joined text and the prompt apart, which can disagree at the
boundary for BPE vocabularies). The response text loses trailing newlines and gets the EOS token id appended when it
does not already end with it. (OpenRLHF appends the text ``" " + eos_token``; appending the id adds no extra
space token.)

Length, as OpenRLHF: a sample whose prompt leaves fewer than 2 tokens for the response (``len(prompt) >= max_len - 2``)
is dropped; a longer sample is cut to ``max_len`` tokens and its last token set to EOS, so every sequence ends with
EOS. Both counts are kept (``num_dropped``, ``num_truncated``) for the trainer to log; nothing is dropped silently.

Batches (the ``BatchSource`` of ``train/supervised.py``): ``ds.batch(indices)`` pads every row to one ``seq_len`` per
dataset (one compile) and adds the additive normalisers the losses divide by (``num_pairs``; ``num_samples``,
``num_desirable``, ``num_undesirable``). ``loss_mask`` marks the response tokens whose log-probs DPO/KTO sum.
Bad input (a missing key, naming the available ones; an empty dataset; a row or value of the wrong type) is a
KeyError/ValueError naming the dataset and row, raised while the dataset is built, before any compute.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from jaxrlhf.data.loader import left_pad, right_pad
from jaxrlhf.data.prompts import _column, _columns, implicit_text_field
from jaxrlhf.data.sft import _messages, _text

Messages = list[dict[str, str]]
Records = Dataset | Sequence[Mapping[str, Any]]
PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class Pair:
    """One preference pair: the shared prompt tokens and each response's tokens (ending with EOS, uncut)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float


@dataclass(frozen=True)
class Unpaired:
    """One KTO sample: prompt tokens, response tokens (ending with EOS, uncut) and whether it is desirable."""

    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool


# ---------------------------------------------------------------------------------------------- text


def _check_records(records: Records, keys: list[str], source: str) -> list[str]:
    """Non-empty, rows are mappings, every key present; returns the available columns."""
    if len(records) == 0:
        raise ValueError(f"dataset {source} is empty: it has 0 records")
    if not isinstance(records, Dataset):
        for i, r in enumerate(records):
            if not isinstance(r, Mapping):
                raise ValueError(f"row {i} of dataset {source} is {type(r).__name__} ({str(r)[:80]!r}); expected a "
                                "JSON object (a mapping of field names to values)")
    columns = _columns(records)
    for key in keys:
        if key not in columns:
            raise KeyError(f"key '{key}' not in dataset {source}; available keys: {columns}")
    return columns


def _turns(value: Any, role: str, *, row: int, key: str, source: str) -> Messages:
    """A string -> one message with ``role``; a message dict or a list of them is checked and kept."""
    return _messages(value, default_role=role, row=row, key=key, source=source)


def _require_str(value: Any, *, row: int, key: str, source: str) -> str:
    hint = " (a list of messages needs --apply_chat_template)" if isinstance(value, (list, tuple)) else ""
    return _text(value, row=row, key=key, source=source, hint=hint)


def _template(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _response_text(tokenizer: PreTrainedTokenizerBase, prompt_msgs: Messages, prompt_text: str,
                   response_msgs: Messages, *, row: int, key: str, source: str) -> str:
    """``template(prompt + response)[len(prompt_text):]``, checking that the prompt really is a prefix."""
    if not prompt_msgs:
        return _template(tokenizer, response_msgs, generation_prompt=False)
    full = _template(tokenizer, prompt_msgs + response_msgs, generation_prompt=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            f"row {row} of dataset {source}: the chat template does not render the prompt (with the generation "
            f"prompt) as a prefix of the conversation with '{key}', so the response cannot be split off: "
            f"prompt {prompt_text[-80:]!r} vs conversation {full[:len(prompt_text) + 20][-100:]!r}. Check that "
            f"'{key}' holds the assistant turn(s) only, or use a tokenizer whose template renders turns one by one.")
    return full[len(prompt_text):]


def split_prompt_response(
    prompt: Any,
    responses: Sequence[tuple[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    apply_chat_template: bool,
    input_template: str | None,
    prompt_key: str | None,
    row: int,
    source: str,
) -> tuple[str, list[str]]:
    """(prompt text, [response text]) for one record; ``responses`` is ``[(key, value)]``. See the module docstring.

    ``prompt`` is None when the dataset has no prompt field: with the chat template the prompt is then the shared
    conversation before the last message of every response; without it the prompt is ``""``.
    """
    if apply_chat_template:
        if prompt is not None:
            prompt_msgs = _turns(prompt, "user", row=row, key=prompt_key or "prompt", source=source)
            resp_msgs = [_turns(v, "assistant", row=row, key=k, source=source) for k, v in responses]
        else:
            convs = [_turns(v, "assistant", row=row, key=k, source=source) for k, v in responses]
            prompt_msgs = convs[0][:-1]
            for (k, _), conv in zip(responses[1:], convs[1:]):
                if conv[:-1] != prompt_msgs:
                    raise ValueError(
                        f"row {row} of dataset {source}: without --prompt_key the conversations in "
                        f"'{responses[0][0]}' and '{k}' must share every message but the last (the prompt); "
                        "they differ. Pass the prompt in its own field with --prompt_key.")
            resp_msgs = [conv[-1:] for conv in convs]
        prompt_text = _template(tokenizer, prompt_msgs, generation_prompt=True) if prompt_msgs else ""
        texts = [_response_text(tokenizer, prompt_msgs, prompt_text, m, row=row, key=k, source=source)
                 for (k, _), m in zip(responses, resp_msgs)]
        return prompt_text, texts
    if prompt is None:
        prompt_text = ""
    else:
        prompt_text = _require_str(prompt, row=row, key=prompt_key or "prompt", source=source)
        if input_template:
            prompt_text = input_template.format(prompt_text)
    return prompt_text, [_require_str(v, row=row, key=k, source=source) for k, v in responses]


# ---------------------------------------------------------------------------------------------- tokens


def with_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """``ids + [eos]`` unless ``ids`` already ends with EOS."""
    ids = list(ids)
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def join(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int, eos_id: int) -> tuple[list[int], bool]:
    """``prompt + response`` cut to ``max_len`` tokens with the last one set to EOS; returns (ids, whether cut)."""
    ids = list(prompt_ids) + list(response_ids)
    if len(ids) <= max_len:
        return ids, False
    ids = ids[:max_len]
    ids[-1] = eos_id
    return ids, True


def prompt_fits(prompt_ids: Sequence[int], max_len: int) -> bool:
    """OpenRLHF's filter: a prompt must leave at least 2 of the ``max_len`` tokens for the response."""
    return len(prompt_ids) < max_len - 2


def _check_common(tokenizer: PreTrainedTokenizerBase, *, max_len: int, input_template: str | None,
                  apply_chat_template: bool) -> tuple[int, int]:
    """Shared argument checks; returns the EOS id and the pad id (EOS when the tokenizer has no pad token)."""
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (a prompt token, a response token and EOS), got {max_len}")
    if input_template is not None and "{}" not in input_template:
        raise ValueError(f"input_template {input_template!r} has no '{{}}' placeholder for the prompt text")
    if apply_chat_template and input_template is not None:
        raise ValueError("pass either --apply_chat_template or --input_template, not both (OpenRLHF ignores "
                         "input_template when the chat template is applied)")
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--apply_chat_template is set but the tokenizer has no chat_template; drop the flag "
                         "(optionally use --input_template) or use a tokenizer that ships one")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every preference sample ends with EOS: set eos_token in "
                         "its tokenizer_config.json")
    eos_id = int(tokenizer.eos_token_id)
    return eos_id, int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id)


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fitting_rows(prompt_ids: list[list[int]], max_len: int, *, what: str, source: str) -> list[int]:
    """Rows whose prompt leaves room for a response (``prompt_fits``); an error when there is none."""
    rows = [i for i, p in enumerate(prompt_ids) if prompt_fits(p, max_len)]
    if not rows:
        raise ValueError(f"dataset {source}: all {len(prompt_ids)} {what} were dropped because their prompts leave "
                         f"fewer than 2 of --max_len {max_len} tokens for the response; raise --max_len")
    return rows


def check_vocab(data: Any, vocab_size: int, model: str) -> None:
    """Every token id of ``data`` (its ``max_token_id``) must exist in the model's embedding table (a tokenizer/model mismatch is an error here, not an
    out-of-range gather on the device)."""
    if data.max_token_id >= vocab_size:
        raise ValueError(f"the tokenizer of {model} produced token id {data.max_token_id}, beyond the model's "
                         f"vocab_size {vocab_size}: the tokenizer and the model do not belong together")


def padded_length(longest: int, max_len: int) -> int:
    """One row length for every batch of a dataset (one compile): the longest row rounded up to 8, at most max_len."""
    return min(max_len, -(-longest // 8) * 8)


def pad_rows(seqs: list[list[int]], prompt_lens: list[int], pad_id: int, *, length: int,
             side: PaddingSide = "right") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``input_ids`` [B, T] int32, ``attention_mask`` [B, T] int32 and ``loss_mask`` [B, T] float32.

    ``loss_mask[b, t] = 1`` on the response tokens (EOS included) of row b: the tokens whose log-probabilities DPO
    and KTO sum; as in SFT, position 0 is never a target (nothing predicts it). ``side`` is the padding side.
    """
    pad = left_pad if side == "left" else right_pad
    ids, attn = pad(seqs, pad_id, length=length)
    resp = [[0] * p + [1] * (len(s) - p) for s, p in zip(seqs, prompt_lens)]
    for r in resp:
        if r:
            r[0] = 0
    loss_mask, _ = pad(resp, 0, length=length)
    return ids, attn, loss_mask.astype(np.float32)


# ---------------------------------------------------------------------------------------------- paired


class PairedDataset:
    """Preference pairs for the reward model and DPO; ``ds.batch(indices)`` gives padded NumPy arrays.

    ``margin_key``: a numeric field read as the pair's margin when the dataset has it (null gives 0; OpenRLHF
    reads the field "margin"); without the field every margin is 0 (``has_margin`` False).
    ``padding_side``: right (default) or left; the models read positions from the attention mask, so the results
    are the same either way.
    """

    def __init__(
        self,
        records: Records,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_key: str | None = None,
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        margin_key: str | None = "margin",
        input_template: str | None = None,
        apply_chat_template: bool = False,
        max_len: int = 512,
        padding_side: PaddingSide = "right",
        source: str = "<records>",
    ) -> None:
        self.eos_id, self.pad_id = _check_common(tokenizer, max_len=max_len, input_template=input_template,
                                                 apply_chat_template=apply_chat_template)
        self.max_len, self.padding_side, self.source = max_len, padding_side, source
        self.implicit_key = None
        if prompt_key is None:  # plain prompt/chosen/rejected strings (batch_inference's iter_dpo rows)
            prompt_key = self.implicit_key = implicit_text_field(records, "prompt", [chosen_key, rejected_key])
        keys = ([prompt_key] if prompt_key else []) + [chosen_key, rejected_key]
        columns = _check_records(records, keys, source)
        self.has_margin = margin_key is not None and margin_key in columns
        n = len(records)
        prompts = _column(records, prompt_key, source) if prompt_key else [None] * n
        chosens = _column(records, chosen_key, source)
        rejecteds = _column(records, rejected_key, source)
        margins = [_as_margin(v, row=i, key=margin_key, source=source)
                   for i, v in enumerate(_column(records, margin_key, source))] if self.has_margin else [0.0] * n

        prompt_texts, chosen_texts, rejected_texts = [], [], []
        for i in range(n):
            p, (c, r) = split_prompt_response(
                prompts[i], [(chosen_key, chosens[i]), (rejected_key, rejecteds[i])], tokenizer,
                apply_chat_template=apply_chat_template, input_template=input_template, prompt_key=prompt_key,
                row=i, source=source)
            prompt_texts.append(p)
            chosen_texts.append(c.rstrip("\n"))
            rejected_texts.append(r.rstrip("\n"))
        prompt_ids = _tokenize(tokenizer, prompt_texts)
        chosen_ids = _tokenize(tokenizer, chosen_texts)
        rejected_ids = _tokenize(tokenizer, rejected_texts)

        self.rows = _fitting_rows(prompt_ids, max_len, what="pairs", source=source)  # source row of each kept pair
        self.items: list[Pair] = [Pair(prompt_ids[i], with_eos(chosen_ids[i], self.eos_id),
                                       with_eos(rejected_ids[i], self.eos_id), margins[i]) for i in self.rows]
        self.num_records, self.num_dropped = n, n - len(self.rows)
        self.num_truncated = sum(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) > max_len
                                 for p in self.items)
        self.seq_len = padded_length(max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                         for p in self.items), max_len)
        self.max_token_id = max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Pair:
        return self.items[idx]

    def summary(self) -> str:
        """One log line: kept pairs, dropped and truncated counts."""
        return (f"{len(self.items)} of {self.num_records} pairs kept; {self.num_dropped} dropped (the prompt fills "
                f"--max_len {self.max_len} - 2), {self.num_truncated} truncated to --max_len (EOS kept)"
                + (f"; prompts from the '{self.implicit_key}' field (no --prompt_key given)" if self.implicit_key
                   else ""))

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The pairs at ``indices`` as arrays of ``seq_len`` columns (fixed per dataset: one compile):

        ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` (see ``pad_rows``), the same three for
        ``rejected_*``, ``margin`` [n] float32, and the normaliser ``num_pairs`` = n (float32 scalar).
        """
        items = [self.items[int(i)] for i in indices]
        plens = [len(p.prompt_ids) for p in items]
        out: dict[str, np.ndarray] = {}
        for side in ("chosen", "rejected"):
            seqs = [join(p.prompt_ids, getattr(p, f"{side}_ids"), self.max_len, self.eos_id)[0] for p in items]
            ids, attn, loss_mask = pad_rows(seqs, plens, self.pad_id, length=self.seq_len, side=self.padding_side)
            out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_loss_mask": loss_mask})
        out["margin"] = np.asarray([p.margin for p in items], np.float32)
        out["num_pairs"] = np.float32(len(items))
        return out


def _as_margin(value: Any, *, row: int, key: str, source: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"row {row} of dataset {source}: margin '{key}' is {type(value).__name__} "
                     f"({str(value)[:80]!r}); expected a finite number (or null for 0)")


# ---------------------------------------------------------------------------------------------- unpaired (KTO)


def _as_desirable(value: Any, *, row: int, key: str, source: str) -> bool:
    """true/false, or 1/0 (OpenRLHF's labels); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"row {row} of dataset {source}: label '{key}' is {type(value).__name__} ({str(value)[:80]!r}); "
                     "expected true/false (or 1/0): is the response desirable?")


class UnpairedDataset:
    """KTO samples ``(prompt, response, desirable)``; ``ds.batch(indices)`` adds the mismatched pairs for the KL term.

    Fields follow OpenRLHF's ``train_kto.py``: ``input_key`` (prompt), ``output_key`` (response; None: with the chat
    template the input conversation holds the response as its last message) and ``label_key`` (desirable true/false).
    """

    def __init__(
        self,
        records: Records,
        tokenizer: PreTrainedTokenizerBase,
        *,
        input_key: str = "input",
        output_key: str | None = "output",
        label_key: str = "label",
        input_template: str | None = None,
        apply_chat_template: bool = False,
        max_len: int = 512,
        padding_side: PaddingSide = "right",
        source: str = "<records>",
    ) -> None:
        self.eos_id, self.pad_id = _check_common(tokenizer, max_len=max_len, input_template=input_template,
                                                 apply_chat_template=apply_chat_template)
        self.max_len, self.padding_side, self.source = max_len, padding_side, source
        if output_key is None and not apply_chat_template:
            raise ValueError("--output_key is required unless --apply_chat_template is set (then the last message of "
                             "the --input_key conversation is the response)")
        _check_records(records, [input_key, label_key] + ([output_key] if output_key else []), source)
        n = len(records)
        inputs = _column(records, input_key, source)
        outputs = _column(records, output_key, source) if output_key else None
        labels = [_as_desirable(v, row=i, key=label_key, source=source)
                  for i, v in enumerate(_column(records, label_key, source))]
        prompt_texts, response_texts = [], []
        for i in range(n):
            if outputs is None:  # the whole conversation is in the input field
                p, (r,) = split_prompt_response(None, [(input_key, inputs[i])], tokenizer, apply_chat_template=True,
                                                input_template=None, prompt_key=None, row=i, source=source)
            else:
                p, (r,) = split_prompt_response(inputs[i], [(output_key, outputs[i])], tokenizer,
                                                apply_chat_template=apply_chat_template,
                                                input_template=input_template, prompt_key=input_key, row=i,
                                                source=source)
            prompt_texts.append(p)
            response_texts.append(r.rstrip("\n"))
        prompt_ids = _tokenize(tokenizer, prompt_texts)
        response_ids = _tokenize(tokenizer, response_texts)

        rows = _fitting_rows(prompt_ids, max_len, what="samples", source=source)
        self.items: list[Unpaired] = [Unpaired(prompt_ids[i], with_eos(response_ids[i], self.eos_id), labels[i])
                                      for i in rows]
        self.num_records, self.num_dropped = n, n - len(rows)
        self.num_truncated = sum(len(it.prompt_ids) + len(it.response_ids) > max_len for it in self.items)
        if len(self.items) < 2:
            raise ValueError(f"dataset {self.source} has {len(self.items)} usable sample(s); KTO pairs each prompt "
                             "with another sample's response (the KL reference point): give it at least 2")
        # a mismatched pair joins any prompt with any response
        self.seq_len = padded_length(max(len(it.prompt_ids) for it in self.items)
                                     + max(len(it.response_ids) for it in self.items), max_len)
        self.max_token_id = max(max(it.prompt_ids + it.response_ids) for it in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Unpaired:
        return self.items[idx]

    @property
    def num_desirable(self) -> int:
        return sum(it.desirable for it in self.items)

    def summary(self) -> str:
        return (f"{len(self.items)} of {self.num_records} samples kept ({self.num_desirable} desirable); "
                f"{self.num_dropped} dropped (the prompt fills --max_len {self.max_len} - 2), {self.num_truncated} "
                "truncated to --max_len (EOS kept)")

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The samples at ``indices`` plus their mismatched pairs (KTO's KL reference point), ``seq_len`` columns:

        ``input_ids``, ``attention_mask``, ``loss_mask`` [n, T]: prompt_i + response_i (see ``pad_rows``);
        ``desirable`` [n] float32 (1 desirable, 0 undesirable);
        ``kl_input_ids``, ``kl_attention_mask``, ``kl_loss_mask`` [n, T]: prompt_i + response_{(i+1) mod n}, the
        completions shifted by one within the batch as in OpenRLHF's ``collate_fn`` (a batch of one sample, e.g. the
        last eval chunk, takes the response of the next sample of the dataset instead);
        normalisers ``num_samples`` = n, ``num_desirable``, ``num_undesirable`` (float32 scalars).
        """
        items = [self.items[int(i)] for i in indices]
        partners = ([items[(i + 1) % len(items)] for i in range(len(items))] if len(items) > 1
                    else [self.items[(int(indices[0]) + 1) % len(self.items)]])
        plens = [len(it.prompt_ids) for it in items]
        matched = [join(it.prompt_ids, it.response_ids, self.max_len, self.eos_id)[0] for it in items]
        shifted = [join(it.prompt_ids, other.response_ids, self.max_len, self.eos_id)[0]
                   for it, other in zip(items, partners)]
        out: dict[str, np.ndarray] = {}
        for prefix, seqs in (("", matched), ("kl_", shifted)):
            ids, attn, loss_mask = pad_rows(seqs, plens, self.pad_id, length=self.seq_len, side=self.padding_side)
            out.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": attn, f"{prefix}loss_mask": loss_mask})
        desirable = np.asarray([it.desirable for it in items], np.float32)
        out.update(desirable=desirable, num_samples=np.float32(len(items)),
                   num_desirable=np.float32(desirable.sum()), num_undesirable=np.float32(len(items) - desirable.sum()))
        return out
