"""Replace a model directory as a whole: a reader, or a run killed at any instant, finds the old model or the new one.

``replace_dir(dst)`` yields a hidden sibling ``.NAME.partial-PID-TOKEN`` to write the new model into. When the block
finishes, every file is flushed to disk, a manifest ``.jaxrlhf_export.json`` (the token and the model's entries) is
written last, and the sibling is swapped with ``dst``:

- Linux: one ``renameat2(RENAME_EXCHANGE)``; the old model is then at the sibling's name.
- elsewhere, or where the filesystem refuses an exchange: ``dst -> .NAME.old-PID-TOKEN``, then ``sibling -> dst``.
  A crash between the two renames leaves no ``dst``; ``recover`` renames the old model back.

What the old directory holds besides its model (a trainer's ``logs/``, checkpoints, plots, other model
directories) is carried into the new one after the swap, then the rest is renamed to ``.NAME.trash-PID-TOKEN`` and
deleted. An old directory's model entries are those its manifest lists; without a manifest (written by something
else), the entries the new model also writes plus any ``*.safetensors`` / ``*.safetensors.index.json``.

``recover(dst)`` finishes or undoes what a killed ``replace_dir`` left (siblings of processes no longer running):
carries the remaining extras, restores an old model the fallback had moved aside, deletes unfinished models and
trash. The trainers call it before they write anything (``jaxrlhf.train.run.prepare_outputs``).
tests/test_atomic_export.py kills exports with SIGKILL at each step and at random instants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

MANIFEST = ".jaxrlhf_export.json"
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|trash)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")


def _at(point: str) -> None:
    """A named step of ``replace_dir`` (tests replace this to kill the process there)."""


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for fn in files:
            _fsync(os.path.join(dirpath, fn))
        _fsync(dirpath)


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (macOS, musl without it)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _libc_renameat2()


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (``renameat2(RENAME_EXCHANGE)``); False where the OS or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _sibling(dst: str, kind: str, token: str, pid: int | None = None) -> str:
    parent, name = os.path.split(dst)
    return os.path.join(parent, f".{name}.{kind}-{os.getpid() if pid is None else pid}-{token}")


def _manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def _model_entries(old: str, new_entries: set[str]) -> set[str]:
    listed = (_manifest(old) or {}).get("entries")
    if isinstance(listed, list):
        return set(listed) | {MANIFEST}
    return {e for e in os.listdir(old)
            if e in new_entries or e == MANIFEST or any(fnmatch.fnmatch(e, p) for p in MODEL_PATTERNS)}


def _carry_extras(old: str, new: str) -> None:
    """Move what ``old`` holds besides its model into ``new`` (entries ``new`` already has are left)."""
    new_entries = set(os.listdir(new))
    model = _model_entries(old, set((_manifest(new) or {}).get("entries", ())))
    for entry in sorted(set(os.listdir(old)) - model - new_entries):
        os.rename(os.path.join(old, entry), os.path.join(new, entry))
        _at("carrying")


def _discard(path: str, dst: str, token: str) -> None:
    trash = _sibling(dst, "trash", token)
    os.rename(path, trash)
    _at("trashed")
    shutil.rmtree(trash)


def check_writable(path: str, flag: str = "") -> None:
    """A clear error (naming ``flag`` and ``path``) where no directory ``path`` can be created or written: a file
    in the way, a read-only or foreign directory. Creates nothing that stays."""
    what = f"{flag} {path}" if flag else path
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file: pass a directory as {flag}" if flag else
                                 f"{path} is a file, not a directory: pass a directory path for the output")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):  # the nearest ancestor that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what}: {existing} is a file, so no directory can be made under it: pass an "
                                 "output path outside it")
    try:  # a real probe: access() says yes to root on a read-only or pseudo filesystem
        os.rmdir(tempfile.mkdtemp(prefix=".jaxrlhf-probe-", dir=existing))
    except OSError as e:
        raise PermissionError(f"{what}: cannot write in {existing} ({e.strerror}): pass an output path in a "
                              "writable directory") from None


def check_destination(dst: str) -> str:
    """``dst`` as an absolute path, or a clear error where it cannot be replaced as a directory."""
    dst = os.path.abspath(dst.rstrip("/") or "/")
    check_writable(dst)
    if os.path.ismount(dst):
        raise ValueError(f"{dst} is a mount point, which cannot be replaced: write into a sub-directory of it")
    cwd = os.path.abspath(os.getcwd())
    if cwd == dst or cwd.startswith(dst + os.sep):
        raise ValueError(f"{dst} holds the working directory, which replacing it would move away: "
                         "pass a sub-directory (e.g. ./out) or run from elsewhere")
    return dst


@contextmanager
def replace_dir(dst: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty hidden sibling directory; when the block finishes it replaces ``dst`` (module docstring).

    An exception in the block deletes the sibling and leaves ``dst`` as it was. ``overwrite=False`` refuses an
    existing ``dst``.
    """
    dst = check_destination(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists: choose a new path or pass --overwrite")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    token = secrets.token_hex(6)
    tmp = _sibling(dst, "partial", token)
    os.makedirs(tmp)
    try:
        yield tmp
        _at("written")
        entries = sorted(os.listdir(tmp))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"token": token, "entries": entries}, f)
        _fsync_tree(tmp)
        _at("before_swap")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parent = os.path.dirname(dst)
    if not os.path.exists(dst):
        os.rename(tmp, dst)
    elif exchange(tmp, dst):
        _at("swapped")
        _carry_extras(tmp, dst)
        _discard(tmp, dst, token)
    else:
        old = _sibling(dst, "old", token)
        os.rename(dst, old)
        _at("between_renames")
        os.rename(tmp, dst)
        _at("swapped")
        _carry_extras(old, dst)
        _discard(old, dst, token)
    _fsync(parent)


def make_dirs(path: str | os.PathLike) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the directories it created, outermost first (for
    ``remove_if_empty``: a failed run then leaves no empty output directories behind)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return missing[::-1]


def remove_if_empty(created: list[str]) -> None:
    """Remove the directories ``make_dirs`` created, innermost first, as long as they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:  # not empty (the run wrote something) or already gone
            return


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # a reused PID: this process has no export under way when it recovers
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(dst: str) -> list[str]:
    """Finish or undo what killed ``replace_dir`` calls left beside ``dst`` (module docstring); what was done."""
    dst = os.path.abspath(dst.rstrip("/") or "/")
    parent, name = os.path.split(dst)
    if not os.path.isdir(parent):
        return []
    done = []
    stale = []
    for entry in os.listdir(parent):
        m = _SIBLING.match(entry)
        if m and m["name"] == name and not _alive(int(m["pid"])):
            stale.append((m["kind"] != "old", os.path.join(parent, entry), m["kind"], m["token"]))
    for _, path, kind, token in sorted(stale):  # "old" first: it may have to become dst again
        current = (_manifest(dst) or {}).get("token") if os.path.isdir(dst) else None
        if kind == "trash":
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"deleted {path}")
        elif current == token:  # swapped in: the sibling is the previous model; its extras belong to dst
            _carry_extras(path, dst)
            _discard(path, dst, token)
            done.append(f"finished replacing {dst}")
        elif kind == "old" and not os.path.exists(dst):  # killed between the fallback's two renames
            os.rename(path, dst)
            done.append(f"restored the previous {dst}")
        else:  # never swapped in: an unfinished new model
            _discard(path, dst, token)
            done.append(f"deleted the unfinished {path}")
    if done:
        _fsync(parent)
    return done


@contextmanager
def replace_file(dst: str) -> Iterator[str]:
    """Yield a hidden sibling path ``.NAME.partial-PID-TOKEN`` to write a file into; when the block finishes it is
    flushed to disk and renamed over ``dst`` in one ``os.replace`` (a reader, or a run killed at any instant, finds
    the old file or the new one, never a torn one). An exception in the block removes the sibling."""
    dst = os.path.abspath(dst)
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst} is a directory: pass a file path for the output")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = _sibling(dst, "partial", secrets.token_hex(6))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(os.path.dirname(dst))
