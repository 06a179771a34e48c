"""Prompt dataset for PPO/GRPO rollouts: records -> (prompt text, prompt token ids, label), all checked up front.

Semantics follow OpenRLHF's PromptDataset (`preprocess_data`):
- apply_chat_template: the input field is either a string, wrapped as one user message, or a list of
  {"role", "content"} messages; the prompt is `tokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)`. `input_template` is not used on this path.
- otherwise the input field must be a string; with `input_template` (e.g. "Question: {}\\nAnswer:") the prompt is
  `input_template.format(text)`.
- label: the `label_key` field (for reward functions that check answers), or None without a label_key.
- datasource: the record's "datasource" field when present, else "default".

Tokenization matches OpenRLHF's rollout path: `tokenizer(prompt, add_special_tokens=False)` (a chat template
writes its own BOS). Unlike OpenRLHF, which lets the tokenizer cut the right end, prompts longer than
`prompt_max_len` keep their LAST `prompt_max_len` tokens (the end holds the question and the generation prompt);
`num_truncated` counts them so the caller can log it, or `on_too_long="error"` rejects them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptItem:
    """One rollout prompt: the full prompt text, its token ids cut to the last prompt_max_len, the label."""

    prompt: str
    prompt_ids: list[int]
    label: str | None
    datasource: str


def truncate_left(ids: Sequence[int], max_len: int) -> tuple[list[int], bool]:
    """Keep the last `max_len` ids: ids[-max_len:]. Returns (ids, whether anything was cut)."""
    if len(ids) <= max_len:
        return list(ids), False
    return list(ids[len(ids) - max_len :]), True


def _as_messages(value: Any, *, row: int, key: str, source: str) -> Messages:
    """A string -> [{"role": "user", "content": value}]; a list of role/content dicts is checked and kept."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for j, m in enumerate(value):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TypeError(
                    f"row {row} of dataset {source}: message {j} of '{key}' is {m!r} ({type(m).__name__}); "
                    "expected a dict with string 'role' and 'content'"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    raise TypeError(
        f"row {row} of dataset {source}: '{key}' is {type(value).__name__} ({str(value)[:80]!r}); expected a string "
        "or a non-empty list of {'role', 'content'} messages"
    )


def format_prompt(
    value: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    apply_chat_template: bool,
    input_template: str | None,
    row: int = 0,
    key: str = "input",
    source: str = "<records>",
) -> str:
    """The prompt text for one record's input value (see the module docstring)."""
    if apply_chat_template:
        messages = _as_messages(value, row=row, key=key, source=source)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        hint = " (a list of messages needs --apply_chat_template)" if isinstance(value, (list, tuple)) else ""
        raise TypeError(
            f"row {row} of dataset {source}: '{key}' is {type(value).__name__} ({str(value)[:80]!r}); "
            f"expected a string{hint}"
        )
    return input_template.format(value) if input_template else value


def _as_label(value: Any, *, row: int, key: str, source: str) -> str:
    """Labels are strings; ints and floats (numeric answers) become str(value)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(
        f"row {row} of dataset {source}: label '{key}' is {type(value).__name__} ({str(value)[:80]!r}); "
        "expected a string (or a number, converted with str)"
    )


def _columns(records: Dataset | Sequence[Mapping[str, Any]]) -> list[str]:
    if isinstance(records, Dataset):
        return list(records.column_names)
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    return keys


def _column(records: Dataset | Sequence[Mapping[str, Any]], key: str, source: str) -> list[Any]:
    if isinstance(records, Dataset):
        return list(records[key])
    values = []
    for i, r in enumerate(records):
        if key not in r:
            raise KeyError(f"key '{key}' not in row {i} of dataset {source}; that row has keys {sorted(r)}")
        values.append(r[key])
    return values


def implicit_text_field(records: Dataset | Sequence[Mapping[str, Any]], field: str,
                        text_keys: Sequence[str]) -> str | None:
    """``field`` when every record has it and ``field`` and every ``text_keys`` value of every record is a string,
    else None: the plain prompt/response rows the generation recipes write (data/postprocess.py), read by the
    trainers with their default (None) keys. Conversations (lists of messages) never match, so a dataset whose
    responses are whole conversations keeps OpenRLHF's meaning of the None key."""
    if field not in _columns(records) or isinstance(records, Dataset) and len(records) == 0:
        return None
    rows = records if not isinstance(records, Dataset) else records.select_columns(
        [k for k in (field, *text_keys) if k in records.column_names])
    for r in rows:
        if field not in r or not all(isinstance(r.get(k), str) for k in (field, *text_keys)):
            return None
    return field


class PromptDataset:
    """Prompts built once from records; `ds[i]` is a PromptItem, `ds.batch(indices)` gives lists for a rollout."""

    def __init__(
        self,
        records: Dataset | Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        input_key: str = "input",
        label_key: str | None = None,
        apply_chat_template: bool = False,
        input_template: str | None = None,
        prompt_max_len: int = 1024,
        on_too_long: Literal["truncate", "error"] = "truncate",
        source: str = "<records>",
    ) -> None:
        """`source` is the dataset spec, used in error messages only."""
        if prompt_max_len < 1:
            raise ValueError(f"prompt_max_len must be >= 1, got {prompt_max_len}")
        if on_too_long not in ("truncate", "error"):
            raise ValueError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}")
        if input_template is not None and "{}" not in input_template:
            raise ValueError(f"input_template {input_template!r} has no '{{}}' placeholder for the input text")
        if apply_chat_template and input_template is not None:
            raise ValueError(
                "pass either apply_chat_template or input_template, not both (OpenRLHF ignores input_template when "
                "the chat template is applied)"
            )
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "apply_chat_template is set but the tokenizer has no chat_template; drop --apply_chat_template "
                "(optionally use --input_template) or use a tokenizer that ships one"
            )
        if len(records) == 0:
            raise ValueError(f"dataset {source} is empty: it has 0 records")
        columns = _columns(records)
        for key in [input_key] + ([label_key] if label_key is not None else []):
            if key not in columns:
                raise KeyError(f"key '{key}' not in dataset {source}; available keys: {columns}")

        inputs = _column(records, input_key, source)
        labels: list[str | None]
        if label_key is None:
            labels = [None] * len(inputs)
        else:
            raw_labels = _column(records, label_key, source)
            labels = [_as_label(v, row=i, key=label_key, source=source) for i, v in enumerate(raw_labels)]
        if "datasource" in columns:
            sources = [str(v) if v is not None else "default" for v in _column(records, "datasource", source)]
        else:
            sources = ["default"] * len(inputs)
        prompts = [
            format_prompt(
                v,
                tokenizer,
                apply_chat_template=apply_chat_template,
                input_template=input_template,
                row=i,
                key=input_key,
                source=source,
            )
            for i, v in enumerate(inputs)
        ]

        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        self.items: list[PromptItem] = []
        self.num_truncated = 0
        self.max_prompt_tokens = 0  # longest prompt before truncation
        for i, (prompt, ids, label, ds) in enumerate(zip(prompts, encoded, labels, sources)):
            self.max_prompt_tokens = max(self.max_prompt_tokens, len(ids))
            if len(ids) > prompt_max_len and on_too_long == "error":
                raise ValueError(
                    f"row {i} of dataset {source}: the prompt has {len(ids)} tokens, more than prompt_max_len="
                    f"{prompt_max_len}; raise --prompt_max_len or use on_too_long='truncate' (keeps the last tokens)"
                )
            kept, cut = truncate_left(ids, prompt_max_len)
            self.num_truncated += int(cut)
            self.items.append(PromptItem(prompt=prompt, prompt_ids=kept, label=label, datasource=ds))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> PromptItem:
        return self.items[idx]

    def batch(self, indices: Sequence[int]) -> tuple[list[str], list[list[int]], list[str | None]]:
        """(prompts, prompt_ids, labels) for the given item indices, in that order."""
        chosen = [self.items[int(i)] for i in indices]
        return [c.prompt for c in chosen], [c.prompt_ids for c in chosen], [c.label for c in chosen]
