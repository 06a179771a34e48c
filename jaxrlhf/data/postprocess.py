"""Scored samples -> training data: the post-processors of ``batch_inference --eval_task rm`` and of the iterative
DPO loop. Pure functions on lists of rows (dicts), no model, no files.

A scored row (written by ``batch_inference``) is ``{"prompt_index": i, "sample_index": j, "input": prompt text,
"output": response text, "reward": r, ...}``. Rows are grouped per prompt: by ``prompt_index`` when every row has
one (what ``batch_inference --eval_task generate`` writes), else by the ``input`` text (OpenRLHF's rule, for files
written elsewhere). Groups keep the order in which their prompts first appear; inside a group, ties go to the
earliest row.

- ``rejection_sampling`` (``rs``): per prompt the best response, ``argmax_j r_ij`` -> an SFT row
  ``{"prompt_index", "input", "output", "reward"}``.
- ``conditional_sft`` (``csft``, arXiv 2308.12050): every row, its reward normalised over the whole file,
  ``z = (r - mean(r)) / (std(r) + 1e-8)`` (population std), written into the prompt through ``reward_template``:
  ``{input}`` -> the prompt, ``{reward}`` -> ``z`` with one decimal (OpenRLHF's format).
- ``iterative_dpo_pairs`` (``iter_dpo``): per prompt chosen = ``argmax_j r_ij``, rejected = ``argmin_j r_ij``;
  a prompt whose best and worst rewards are equal teaches nothing and is dropped (and counted). Rows
  ``{"prompt_index", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]
DEFAULT_REWARD_TEMPLATE = "{input} <rm_score>: {reward} "


def group_by_prompt(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The rows split into one list per prompt (module docstring: by ``prompt_index``, else by ``input``)."""
    key = "prompt_index" if rows and all("prompt_index" in r for r in rows) else "input"
    groups: dict[Any, list] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return list(groups.values())


def _traced(best: Mapping[str, Any]) -> Row:
    """The fields that trace a derived row back to its prompt (and the label, when the rows carry one)."""
    return {k: best[k] for k in ("prompt_index", "label") if k in best}


def rejection_sampling(rows: Sequence[Mapping[str, Any]]) -> list[Row]:
    """One SFT row per prompt: its best-scored response (ties: the first)."""
    out = []
    for group in group_by_prompt(rows):
        best = max(group, key=lambda r: float(r["reward"]))  # max keeps the first of equal maxima
        out.append({**_traced(best), "input": best["input"], "output": best["output"],
                    "reward": float(best["reward"])})
    return out


def format_reward_template(template: str, text: str, reward: float) -> str:
    """``template`` with ``{input}`` -> ``text`` and ``{reward}`` -> ``reward`` to one decimal (OpenRLHF's)."""
    return template.replace("{reward}", f"{reward:.1f}").replace("{input}", text)


def conditional_sft(rows: Sequence[Mapping[str, Any]], template: str = DEFAULT_REWARD_TEMPLATE) -> list[Row]:
    """Every row with its normalised reward ``z`` written into ``input`` (module docstring); ``reward`` becomes z,
    the raw score is kept as ``raw_reward``."""
    check_reward_template(template)
    rewards = [float(r["reward"]) for r in rows]
    mean = sum(rewards) / max(len(rewards), 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / max(len(rewards), 1))
    out = []
    for r, x in zip(rows, rewards):
        z = (x - mean) / (std + 1e-8)
        out.append({**_traced(r), "input": format_reward_template(template, r["input"], z), "output": r["output"],
                    "reward": z, "raw_reward": x})
    return out


def check_reward_template(template: str) -> None:
    for field in ("{input}", "{reward}"):
        if field not in template:
            raise ValueError(f"--reward_template {template!r} has no {field} placeholder (e.g. "
                             f"{DEFAULT_REWARD_TEMPLATE!r})")


def iterative_dpo_pairs(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Row], int]:
    """``(pairs, dropped)``: chosen = best, rejected = worst response per prompt; ``dropped`` counts the prompts
    whose best and worst rewards are equal (no pair). ValueError when a prompt has a single response."""
    pairs, dropped = [], 0
    for group in group_by_prompt(rows):
        if len(group) < 2:
            where = group[0].get("prompt_index", repr(str(group[0]["input"])[:60]))
            raise ValueError(f"iter_dpo needs at least 2 responses per prompt to pair the best with the worst; "
                             f"prompt {where} has 1: generate with --best_of_n >= 2")
        best = max(group, key=lambda r: float(r["reward"]))
        worst = min(group, key=lambda r: float(r["reward"]))
        if float(best["reward"]) == float(worst["reward"]):
            dropped += 1
            continue
        pairs.append({**_traced(best), "prompt": best["input"], "chosen": best["output"],
                      "rejected": worst["output"], "chosen_reward": float(best["reward"]),
                      "rejected_reward": float(worst["reward"])})
    return pairs, dropped


def reward_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean / min / max reward over the rows, the mean of each prompt's best (best-of-n) and of its first sample
    (what one sample would score)."""
    if not rows:
        return {}
    rewards = [float(r["reward"]) for r in rows]
    groups = group_by_prompt(rows)
    return {"reward_mean": sum(rewards) / len(rewards), "reward_min": min(rewards), "reward_max": max(rewards),
            "reward_best_of_n": sum(max(float(r["reward"]) for r in g) for g in groups) / len(groups),
            "num_prompts": len(groups), "num_samples": len(rows)}


# ---------------------------------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Write ``rows`` as JSON lines, atomically (converters/atomic.py ``replace_file``); returns ``path``."""
    from converters.atomic import replace_file

    with replace_file(path) as tmp, open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl_lines(path: str) -> list[Row]:
    """The rows of a JSON-lines file that may end in a torn line (a process killed mid-write): that last line is
    ignored; a bad line elsewhere is a ValueError."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last (unterminated) line
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows
