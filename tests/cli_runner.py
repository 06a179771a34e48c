"""Run entry points' CLIs: with exactly a given config object (through the ``--config`` YAML path a user takes), or
many bad-input calls at once through forked children of one process (``run_clis_forked``)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import yaml

from jaxrlhf.cli import config_to_dict


def run_cli_with(cli: Callable[[list[str]], int], cfg: Any) -> int:
    """``cli(["--config", file])`` where the file holds every field of ``cfg``; returns the exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config_to_dict(cfg), f)
    try:
        return cli(["--config", f.name])
    finally:
        os.unlink(f.name)


# Runs many CLI calls in ONE Python process that imports the entry points once, then forks a child per call: the
# child runs the CLI function exactly as `python -m MODULE ARGV` would (its exit code, its stdout/stderr on the real
# file descriptors, an uncaught exception printed as a traceback by the same code path as the interpreter's), while
# the 3-5 s import of jax/transformers is paid once instead of per call.
FORK_DRIVER = r"""
import importlib, json, os, signal, sys, time, traceback
cases = json.load(open(sys.argv[1]))
for module in json.loads(sys.argv[3]):  # what the entry points import lazily: once here, not in every child
    importlib.import_module(module)
funcs = {}
for c in cases:
    module, _, name = c["entry"].partition(":")
    funcs[c["entry"]] = getattr(importlib.import_module(module), name)
codes = []
for c in cases:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(c["log"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(c["cwd"])
        os.environ.update(c["env"])
        signal.alarm(c["timeout"])
        try:
            code = funcs[c["entry"]](c["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    t0 = time.perf_counter()
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    with open(c["log"] + ".time", "w") as t:
        t.write(f"{time.perf_counter() - t0:.2f}")
json.dump(codes, open(sys.argv[2], "w"))
"""


def run_clis_forked(calls: list[dict], workdir: str, *, preload: tuple[str, ...] = (),
                    timeout_s: int = 120) -> list[tuple[int, str, str]]:
    """Run each ``{"entry": "module:function", "argv": [...], "cwd"?: dir, "env"?: {...}}`` as described above;
    returns ``(exit code, stdout, stderr)`` per call (a negative code: killed by that signal, e.g. -14 on timeout).
    ``preload``: modules the parent imports before forking (none may touch a jax device)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = [{"entry": c["entry"], "argv": list(c["argv"]), "cwd": c.get("cwd", workdir), "env": c.get("env", {}),
              "timeout": timeout_s, "log": os.path.join(workdir, f"call{i}")} for i, c in enumerate(calls)]
    spec, codes_file = os.path.join(workdir, "calls.json"), os.path.join(workdir, "codes.json")
    with open(spec, "w") as f:
        json.dump(cases, f)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", FORK_DRIVER, spec, codes_file, json.dumps(list(preload))], cwd=root,
                   env=env, check=True, timeout=timeout_s * len(cases) + 120)
    with open(codes_file) as f:
        codes = json.load(f)
    out = []
    for case, code in zip(cases, codes):
        with open(case["log"] + ".out") as o, open(case["log"] + ".err") as e:
            out.append((code, o.read(), e.read()))
    return out
