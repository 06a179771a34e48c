"""Where records come from: one dataset spec -> `datasets.Dataset`; several specs -> one blended Dataset.

A spec is what users pass to `--prompt_data` / `--dataset` (OpenRLHF's spelling), resolved in this order:

1. an existing local file: `.json`/`.jsonl` (JSON lines or a JSON array), `.csv`, `.parquet`, `.arrow`, `.txt`
   (one record per line, column "text");
2. an existing local directory:
   - written by `Dataset.save_to_disk` (has `state.json`) or `DatasetDict.save_to_disk` (has
     `dataset_dict.json`): read with `datasets.load_from_disk`;
   - otherwise a plain directory of data files: `datasets.load_dataset(dir)` infers the format;
3. `type@dir` with type in json, jsonl, csv, parquet, arrow, text, txt: every file of that type under `dir`
   (`load_dataset(type, data_dir=dir)`);
4. `name@subdir`: `load_dataset(name, data_dir=subdir)` (a local directory or a hub dataset), as OpenRLHF does;
5. anything else is a hub dataset name, `load_dataset(name)`. That works where the hub or its cache is
   reachable; otherwise the error says the path does not exist locally and the hub could not be reached.

Loading one split: a DatasetDict must contain `split` (files loaded by type always land in "train"); a Dataset
saved with `Dataset.save_to_disk` has no splits and is returned whole.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets, interleave_datasets, load_dataset, load_from_disk

from jaxrlhf.cli import check_utf8

# file suffix -> `datasets` packaged builder name
FILE_TYPES: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
TEXT_BUILDERS = ("json", "csv", "text")
# `type@dir` type -> builder name
DIR_TYPES: dict[str, str] = {
    "json": "json",
    "jsonl": "json",
    "csv": "csv",
    "parquet": "parquet",
    "arrow": "arrow",
    "text": "text",
    "txt": "text",
}


def split_specs(value: str) -> list[str]:
    """'a.jsonl, org/name@dir' -> ['a.jsonl', 'org/name@dir'] (the comma-separated form of --prompt_data)."""
    return [s.strip() for s in value.split(",") if s.strip()]


def parse_probs(value: str | None, *, flag: str = "--prompt_data_probs") -> list[float] | None:
    """'0.7,0.3' -> [0.7, 0.3]; None or '' -> None (datasets are then concatenated)."""
    if value is None or not value.strip():
        return None
    try:
        return [float(p) for p in value.split(",")]
    except ValueError as e:
        raise ValueError(f"{flag}={value!r} must be comma-separated numbers, e.g. '0.7,0.3'") from e


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).suffix.lower() in FILE_TYPES or spec.endswith(".py")


def _guard(spec: str, what: str, fn, *args, **kwargs):
    """Run a `datasets` loader; re-raise its failure as a ValueError that names the spec."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # datasets raises many types (EmptyDatasetError, ArrowInvalid, StopIteration, ...)
        if "corresponds to no data" in str(e):  # how `datasets` reports a file with zero records
            raise ValueError(f"dataset '{spec}' is empty: it has 0 records ({what})") from e
        raise ValueError(f"could not load dataset '{spec}' ({what}): {type(e).__name__}: {e}") from e


def _load_file(spec: str, path: Path) -> Dataset | DatasetDict:
    suffix = path.suffix.lower()
    if suffix == ".py":
        raise ValueError(
            f"dataset '{spec}' is a Python loading script; the installed `datasets` ({datasets.__version__}) no "
            "longer runs them. Convert the data to json/jsonl/parquet and pass that file instead."
        )
    if suffix not in FILE_TYPES:
        raise ValueError(f"dataset file '{spec}' has suffix '{suffix}'; supported suffixes: {sorted(FILE_TYPES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"dataset '{spec}' is empty: the file {path} has 0 bytes")
    builder = FILE_TYPES[suffix]
    if builder in TEXT_BUILDERS:  # `datasets` reads bytes that are not UTF-8 and fails only when a row is used
        check_utf8(path, f"dataset '{spec}'")
    if builder != "json":
        return _guard(spec, f"{builder} file", load_dataset, builder, data_files=str(path))
    try:
        json_log = logging.getLogger("datasets.packaged_modules.json.json")
        json_log.disabled = True  # its "Failed to load JSON" ERROR line would precede the one error we print
        try:
            loaded = _guard(spec, "json file", load_dataset, "json", data_files=str(path))
        finally:
            json_log.disabled = False
    except ValueError as e:
        bad = _first_non_object_row(path)
        if bad is not None:
            raise ValueError(f"dataset '{spec}': {bad}; every record must be a JSON object like "
                             '{"input": "...", "output": "..."}') from e
        raise
    # `datasets` reads a JSON array of bare strings as one "text" column: refuse it like any non-object row.
    if list(loaded["train"].column_names) == ["text"]:
        first = _first_record(path)
        if first is not None and not isinstance(first, dict):
            raise ValueError(f"dataset '{spec}': record 0 is a {type(first).__name__} ({str(first)[:60]!r}), not a "
                             'JSON object; every record must be a JSON object like {"input": "...", "output": "..."}')
    return loaded


def _first_non_object_row(path: Path) -> str | None:
    """Where a json/jsonl file stops being a list of JSON objects ('line 3 is a str ...'), or None if it does not."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    else:
        rows = whole if isinstance(whole, list) else None
        if rows is None:
            return None if isinstance(whole, dict) else f"the file holds a single {type(whole).__name__}"
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                return f"record {i} is a {type(r).__name__} ({str(r)[:60]!r}), not a JSON object"
        return None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {i} is not valid JSON ({e.msg}): {line[:60]!r}"
        if not isinstance(r, dict):
            return f"line {i} is a {type(r).__name__} ({str(r)[:60]!r}), not a JSON object"
    return None


def _first_record(path: Path, peek: int = 1 << 20):
    """The first record of a JSON-lines file or JSON array (from the first MiB), or None if it cannot be read."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(peek)
    stripped = head.lstrip()
    try:
        if stripped.startswith("["):
            return json.JSONDecoder().raw_decode(stripped[1:].lstrip())[0]
        return json.loads(stripped.splitlines()[0])
    except (json.JSONDecodeError, IndexError):
        return None


def _load_dir(spec: str, path: Path) -> Dataset | DatasetDict:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return _guard(spec, "directory written by save_to_disk", load_from_disk, str(path))
    data_files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES]
    if not data_files:
        found = sorted(p.name for p in path.iterdir())[:20]
        raise ValueError(
            f"dataset directory '{spec}' holds no data files (looked for {sorted(FILE_TYPES)} and for a "
            f"save_to_disk layout with state.json or dataset_dict.json); found {found}"
        )
    for file in data_files:
        if FILE_TYPES[file.suffix.lower()] in TEXT_BUILDERS:
            check_utf8(file, f"dataset '{spec}', file {file}")
    return _guard(spec, "directory of data files", load_dataset, str(path))


def _load_hub(spec: str, name: str, data_dir: str | None) -> Dataset | DatasetDict:
    try:
        return load_dataset(name, data_dir=data_dir)
    except Exception as e:
        raise FileNotFoundError(
            f"dataset '{spec}' does not exist locally (no file or directory at {Path(name).resolve()}) and loading "
            f"'{name}' from the Hugging Face Hub failed ({type(e).__name__}: {e}). The hub is unreachable or has no "
            "such dataset: check the path, or download the dataset on a machine with internet access "
            "(Dataset.save_to_disk or a json/parquet export) and pass that local path."
        ) from e


def _load_any(spec: str) -> Dataset | DatasetDict:
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(spec, path)
    if path.is_dir():
        return _load_dir(spec, path)
    if "@" in spec:
        head, data_dir = (s.strip() for s in spec.split("@", 1))
        if head.lower() in DIR_TYPES:
            directory = Path(data_dir).expanduser()
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"dataset '{spec}': directory '{data_dir}' does not exist (resolved to {directory.resolve()})"
                )
            builder = DIR_TYPES[head.lower()]
            return _guard(spec, f"{builder} files under {directory}", load_dataset, builder, data_dir=str(directory))
        if Path(head).expanduser().is_dir():
            return _guard(spec, f"data_dir={data_dir}", load_dataset, str(Path(head).expanduser()), data_dir=data_dir)
        return _load_hub(spec, head, data_dir)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"dataset path '{spec}' does not exist (resolved to {path.resolve()})")
    return _load_hub(spec, spec, None)


def load_records(spec: str, *, split: str = "train") -> Dataset:
    """Load one dataset spec (see the module docstring) and return its `split` as a non-empty `datasets.Dataset`."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty dataset spec: pass a file, a directory, 'type@dir' or a hub dataset name")
    loaded = _load_any(spec)
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"dataset '{spec}' has no split '{split}'; available splits: {sorted(loaded)}. "
                "Pick one of those (local files always load as 'train')."
            )
        loaded = loaded[split]
    if not isinstance(loaded, Dataset):
        raise TypeError(f"dataset '{spec}' loaded as {type(loaded).__name__}, expected datasets.Dataset")
    if len(loaded) == 0:
        raise ValueError(f"dataset '{spec}' (split '{split}') is empty: it has 0 records")
    return loaded


def blend(
    specs: Sequence[str],
    probs: Sequence[float] | None = None,
    *,
    seed: int = 42,
    max_samples: int | None = None,
    split: str = "train",
    stopping_strategy: str = "all_exhausted",
    flags: tuple[str, str] = ("--prompt_data", "--prompt_data_probs"),
) -> Dataset:
    """Mix several datasets into one, like OpenRLHF's `blending_datasets`.

    Each spec is loaded with `load_records` and cut to its first `max_samples` records (per dataset). Then:
    - probs None: the datasets are concatenated in order;
    - probs given: `datasets.interleave_datasets` draws the next record from dataset i with probability
      p_i / sum(p) (probabilities are normalised; each must be > 0), seeded by `seed`. With the default
      `stopping_strategy="all_exhausted"` (OpenRLHF's default) it stops once every dataset has been used up at
      least once, oversampling the smaller ones; "first_exhausted" stops at the first one used up.
    All datasets must have the same columns. `flags` names the two CLI flags in error messages.
    """
    data_flag, probs_flag = flags
    specs = [s.strip() for s in specs]
    if not specs or any(not s for s in specs):
        raise ValueError(f"{data_flag} must name at least one dataset and no empty entries, got {list(specs)}")
    if probs is not None:
        probs = [float(p) for p in probs]
        if len(probs) != len(specs):
            raise ValueError(
                f"{data_flag} names {len(specs)} dataset(s) ({','.join(specs)}) but {probs_flag} has "
                f"{len(probs)} value(s) ({','.join(str(p) for p in probs)}): give one probability per dataset"
            )
        bad = [p for p in probs if not (p > 0 and math.isfinite(p))]
        if bad:
            raise ValueError(f"{probs_flag} values must be positive finite numbers, got {probs}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")

    parts = []
    for spec in specs:
        ds = load_records(spec, split=split)
        if max_samples is not None and len(ds) > max_samples:
            ds = ds.select(range(max_samples))
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]

    columns = [sorted(ds.column_names) for ds in parts]
    if any(c != columns[0] for c in columns):
        listing = "; ".join(f"{s}: {c}" for s, c in zip(specs, columns))
        raise ValueError(f"datasets in {data_flag} must share the same columns to be blended, got {listing}")
    try:
        if probs is None:
            return concatenate_datasets(parts)
        total = sum(probs)
        return interleave_datasets(
            parts,
            probabilities=[p / total for p in probs],
            seed=seed,
            stopping_strategy=stopping_strategy,
        )
    except ValueError as e:
        raise ValueError(f"could not blend {data_flag}={','.join(specs)}: {e}") from e



def holdout_split(ds: Dataset, fraction: float, *, seed: int = 42) -> tuple[Dataset, Dataset]:
    """Split `ds` into (train, eval) with a seeded `fraction` of the records held out for evaluation.

    n_eval = max(1, round(len(ds) * fraction)) records drawn by `np.random.default_rng([seed, 1]).permutation`;
    both parts keep the original record order. Train and eval are disjoint; at least one record stays in train.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    n = len(ds)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise ValueError(f"holding out {fraction} of {n} records leaves none to train on: lower --eval_holdout or "
                         "pass --eval_dataset")
    order = np.random.default_rng([seed, 1]).permutation(n)
    return ds.select(np.sort(order[n_eval:])), ds.select(np.sort(order[:n_eval]))
