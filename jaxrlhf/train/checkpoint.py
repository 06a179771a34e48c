"""Training-state checkpoints with Orbax: sharded arrays + a JSON ``meta`` record per step.

Layout (one Orbax ``CheckpointManager`` directory)::

    ckpt_dir/
      100/                    one finished step
        state/                the array pytree (OCDBT/tensorstore; each process writes its own shards)
        meta/metadata         JSON: data position, KL coefficient, rng keys as lists, reward stats, config, ...
        _CHECKPOINT_METADATA  Orbax's step record (commit timestamp)
        commit_success.txt    written last, inside the temporary directory, just before the rename
      200/
      300.orbax-checkpoint-tmp/   a save in progress (or killed): never listed as a step

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp...`` and renames it to ``<step>`` once every
process has finished (the rename is atomic on POSIX filesystems; tests/test_train_utils.py watches it happen). A step
directory is counted as finished only if it also holds a commit marker (``commit_success.txt``, or a commit timestamp
in ``_CHECKPOINT_METADATA``). A step directory without one (a copy cut short, a filesystem without atomic rename) is
moved aside to ``<step>.incomplete-<unix time>`` with a warning when the ``Checkpointer`` starts, so neither
``latest_step`` nor Orbax's ``max_to_keep`` bookkeeping ever sees it and a later save of that step does not collide.
A killed save's ``*.orbax-checkpoint-tmp*`` directory is deleted when the next ``Checkpointer`` starts, and a run
that saved nothing removes the empty directory it created (tests/test_fault_injection.py kills real runs).

Saving is asynchronous: ``save`` returns once the arrays are copied to host memory (so the caller may donate or
overwrite them), and the files are written in the background. ``wait()`` blocks until they are on disk;
``latest_step``, ``restore`` and ``close`` wait first.

Restore: pass the target as a pytree of ``jax.ShapeDtypeStruct`` with shardings (``abstract_like``). Orbax reads each
device's slice straight into that sharding, so a checkpoint written on a 4x2 mesh restores onto 8x1, 1x8 or another
process count. The tree structure and shapes are checked against the checkpoint first; a mismatch is a ValueError
naming the key. A dtype difference is allowed (Orbax casts).

Multi-process: every process constructs the ``Checkpointer`` and calls ``save``/``restore`` with its part of the
global arrays; Orbax coordinates the writes and the final rename. ``meta`` is written by process 0 (pass the same
meta on every process).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from converters.atomic import check_writable, make_dirs, remove_if_empty
from sharding import path_str

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class Checkpointer:
    """``save(step, state, meta)``, ``latest_step()``, ``restore(step, abstract_state) -> (state, meta)``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = Path(directory).expanduser().absolute()  # Orbax needs an absolute path
        self.max_to_keep = max_to_keep
        self._created: list[str] = []
        _on_process0(self._make_directory)  # an error there (a file in the way, no permission) reaches every process
        _on_process0(self._set_aside_incomplete_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a killed run's half-written temporaries go at the next start
        )
        # Handlers registered up front: a fresh process (a resumed run) must be able to read item metadata
        # before it has saved anything itself.
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving ---------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
        """Start saving ``state`` (a pytree of jax arrays, possibly sharded) and ``meta`` (JSON-able) as ``step``.

        Returns when the arrays have been copied to host memory; the write continues in the background (``wait()``).
        NumPy / jax scalars and arrays inside ``meta`` are converted to Python numbers / lists.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        meta_json = to_jsonable(dict(meta or {}), "meta")
        self.wait()
        step_dir = self.directory / str(step)
        if step_dir.exists():
            if _is_finished(step_dir):
                raise ValueError(
                    f"checkpoint step {step} already exists in {self.directory}; save under a new step number or "
                    "delete that directory first"
                )
            # Only process 0 moves it, without a barrier: the other processes may not even see it any more, and
            # Orbax's own barriers order this before the final rename of the new step.
            self._set_aside_incomplete_steps()
        self._manager.reload()
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta_json)}
            ),
            force=True,
        )
        if not saved:
            raise RuntimeError(f"Orbax declined to save step {step} in {self.directory} (steps: {self.all_steps()})")

    def wait(self) -> None:
        """Block until every started save is written, renamed into place, and old steps are pruned."""
        self._manager.wait_until_finished()

    # -- listing ------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Finished steps on disk, ascending (waits for saves in flight)."""
        self.wait()
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if _is_finished(self.directory / str(s)))

    def latest_step(self) -> int | None:
        """The newest finished step, or None when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- restoring ------------------------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Read ``step`` into the structure, shapes and shardings of ``abstract_state``; return ``(state, meta)``.

        ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (see ``abstract_like``).
        """
        step = int(step)
        steps = self.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"no finished checkpoint step {step} in {self.directory}; finished steps: {steps or 'none'}"
            )
        _require_shardings(abstract_state)
        saved = self._manager.item_metadata(step)[STATE_ITEM]
        saved = getattr(saved, "tree", saved)  # TreeMetadata in newer Orbax, the bare tree in older ones
        check_tree_matches(saved, abstract_state, where=f"checkpoint {self.directory / str(step)}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}
            ),
        )
        return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

    def close(self) -> None:
        """Wait for saves in flight and release Orbax's threads."""
        self.wait()
        self._manager.close()
        remove_if_empty(self._created)  # a run that saved nothing leaves no empty --ckpt_path behind

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON ``meta`` of a finished step, without reading its arrays."""
        path = self.directory / str(int(step)) / META_ITEM / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {self.directory / str(step)}: cannot read its meta ({e})") from None

    # -- internals ------------------------------------------------------------------------------------------------
    def _make_directory(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint directory {self.directory} is a file: pass a directory as --ckpt_path")
        check_writable(str(self.directory), "--ckpt_path")  # a file above it, a read-only directory
        self._created = make_dirs(self.directory)

    def _set_aside_incomplete_steps(self) -> None:
        """Rename step directories that lack a commit marker to ``<step>.incomplete-<time>`` (process 0)."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if path.is_dir() and path.name.isdigit() and not _is_finished(path):
                    aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
                    path.rename(aside)
                    log.warning(
                        "checkpoint step directory %s has no commit marker (a save that never finished): moved it "
                        "to %s and ignoring it; delete it once you have looked at it", path, aside,
                    )


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """A restore target: ``jax.ShapeDtypeStruct`` per leaf with ``shardings`` (a matching pytree of Shardings), or
    each leaf's own ``.sharding`` when ``shardings`` is None (leaves may be jax arrays or ShapeDtypeStructs)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_tree_matches(saved_tree: Any, target_tree: Any, *, where: str = "checkpoint") -> None:
    """Raise ValueError naming the first keys whose presence or shape differ between checkpoint and target."""
    saved = _leaf_table(saved_tree)
    target = _leaf_table(target_tree)
    missing = [k for k in target if k not in saved]
    extra = [k for k in saved if k not in target]
    problems = []
    if missing:
        problems.append(f"keys in the target but not in the checkpoint: {_few(missing)}")
    if extra:
        problems.append(f"keys in the checkpoint but not in the target: {_few(extra)}")
    for k in target:
        if k in saved and saved[k] != target[k]:
            problems.append(f"key {k}: checkpoint shape {saved[k]} != target shape {target[k]}")
    if problems:
        raise ValueError(
            f"{where} does not match the state to restore into: " + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            + ". Restore with the same model config and optimizer settings that wrote it."
        )


def _leaf_table(tree: Any) -> dict[str, tuple[int, ...]]:
    """Flatten to {'a/b/0/c': shape}; Orbax metadata (str dict keys) and live pytrees (GetAttrKey, int keys) agree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(path)
        shape = getattr(leaf, "shape", None)
        out[key] = tuple(shape) if shape is not None else tuple(np.shape(leaf))
    return out


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _require_shardings(abstract_state: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} has no sharding: build the target with "
                "abstract_like(...) or jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))"
            )


def _is_finished(step_dir: Path) -> bool:
    """True when an Orbax step directory carries a commit marker (see the module docstring)."""
    if (step_dir / _COMMIT_FILE).exists():
        return True
    meta_file = step_dir / _STEP_METADATA_FILE
    if meta_file.is_file():
        try:
            return json.loads(meta_file.read_text()).get("commit_timestamp_nsecs") is not None
        except (OSError, ValueError):
            return False
    return False


def _on_process0(fn) -> None:
    """``fn()`` on process 0; every process returns once it is done, and raises if it failed there."""
    from sharding.distributed import from_process0

    def run() -> np.int32:
        fn()
        return np.int32(0)

    from_process0(run, ((), np.int32))


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Dicts/lists/tuples of Python, NumPy or jax scalars and arrays -> plain JSON types (arrays become lists).

    Raises TypeError naming the path of anything else (objects, non-string dict keys).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a string (JSON needs string keys)")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        return np.asarray(value).tolist()
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON-able; store numbers, strings, lists or dicts "
        "(rng keys as jax.random.key_data(key).tolist())"
    )
