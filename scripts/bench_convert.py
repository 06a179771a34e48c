"""Benchmark the HF <-> Flax converters on a random ~1B-parameter bf16 Llama built locally.

    python scripts/bench_convert.py --out /tmp/bench_convert.json

Steps (each conversion is its own subprocess, ``sys.executable -m converters ...``):
  1. build  a random Llama in bf16 in a child process, ``save_pretrained(max_shard_size="2GB")``, exit (frees it);
  2. floor  ``cat`` every safetensors file to /dev/null (the I/O floor: reading the bytes once);
  3. start  ``python -c "import converters.hf, orbax.checkpoint"`` (interpreter + jax + orbax import cost);
  4. hf-to-flax SRC -> FLAX, then flax-to-hf FLAX -> RT;
  5. check  every tensor of RT equals SRC bit for bit (safetensors' own reader, compared as raw 16-bit words).

For each child: wall seconds, peak RSS of the child's process tree (psutil polled every 50 ms, summed over the child
and its descendants) and the kernel's peak (``ru_maxrss`` from ``os.wait4`` for that child, and the increase of
``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is a running max over all children so far). Target from the issue:

    peak_rss <= 1.3 * model_bytes + 1.5 GiB      (model_bytes = total size of the safetensors files)

Every step starts after ``os.sync()`` so an earlier step's write-back does not land in its time; a converter's own
writes are timed into the page cache (it does not fsync). ``--cold`` evicts the source files from the page cache (posix_fadvise DONTNEED, no root needed) before each timed
read, so the floor and the conversions read from disk; by default all reads are warm (the files were just written).
Benchmarks are not tests: this prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import psutil

GIB = 2**30
POLL_S = 0.05
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUILD_CODE = r"""
import json, sys, time, torch, transformers
out, spec = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # params are created in bf16: one copy, never an fp32 one
cfg = transformers.LlamaConfig(
    hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
    num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
    tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
with torch.no_grad():
    model = transformers.LlamaForCausalLM(cfg)
    for p in model.parameters():  # small random values everywhere (norm scales too, so nothing is all-ones)
        p.normal_(0.0, 0.02)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(out, max_shard_size="2GB")
print(json.dumps({"params": n, "build_s": time.perf_counter() - t0}))
"""


@dataclass
class Run:
    """One measured child process."""

    name: str
    cmd: list[str]
    wall_s: float = 0.0
    rc: int = 0
    peak_rss_poll: int = 0  # bytes, psutil, child + descendants summed, 50 ms polling
    peak_rss_wait4: int = 0  # bytes, kernel high-water mark of the child (ru_maxrss of os.wait4)
    rusage_children_delta: int = 0  # bytes, increase of getrusage(RUSAGE_CHILDREN).ru_maxrss during this run
    samples: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, rss bytes), ~0.25 s apart
    log_tail: str = ""


def measure(name: str, cmd: list[str], log_path: str, *, env: dict | None = None) -> Run:
    """Run ``cmd`` to completion; wall time and peak RSS of its process tree (polled) and of the child (kernel)."""
    run = Run(name, cmd)
    os.sync()  # earlier steps' dirty pages are flushed now, not during this measurement
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        last_kept = -1.0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            try:
                rss = ps.memory_info().rss
                for c in ps.children(recursive=True):
                    try:
                        rss += c.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:  # exited between wait4 and here (zombie still reaped by wait4 next loop)
                rss = 0
            now = time.perf_counter() - t0
            run.samples += 1
            run.peak_rss_poll = max(run.peak_rss_poll, rss)
            if now - last_kept >= 0.25:
                run.timeline.append((round(now, 2), rss))
                last_kept = now
            time.sleep(POLL_S)
        run.wall_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen so it does not wait again
    run.rc = proc.returncode
    run.peak_rss_wait4 = ru.ru_maxrss * 1024  # Linux reports KiB
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    run.rusage_children_delta = max(0, after - before)
    with open(log_path, "rb") as f:
        run.log_tail = f.read()[-2000:].decode(errors="replace")
    if run.rc != 0:
        raise RuntimeError(f"{name} failed (exit {run.rc}): {' '.join(cmd)}\n{run.log_tail}")
    return run


def dir_bytes(path: str, pattern: str = "**/*") -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, pattern), recursive=True) if os.path.isfile(p))


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (so the next read comes from disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def all_files(path: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(path, "**/*"), recursive=True) if os.path.isfile(p))


def check_round_trip(src: str, rt: str, sample: int = 6) -> dict:
    """Every tensor of ``rt`` equals ``src`` bit for bit; read with safetensors' own reader (not ours).

    Tensors are compared as raw 16-bit words (``view(torch.int16)``), so -0.0 vs 0.0 or NaN payloads would count.
    ``sample`` named tensors are additionally loaded with ``safetensors.torch.load_file`` from the round-tripped file.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    def index(d: str) -> dict[str, str]:
        out = {}
        for fn in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            with safe_open(fn, framework="pt") as f:
                out.update({k: fn for k in f.keys()})
        return out

    a, b = index(src), index(rt)
    result = {"names_equal": sorted(a) == sorted(b), "missing": sorted(set(a) - set(b))[:5],
              "extra": sorted(set(b) - set(a))[:5], "checked": 0, "mismatched": [], "dtype_changed": [],
              "sample": []}
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], framework="pt") as fa, safe_open(b[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            result["dtype_changed"].append(f"{name}: {x.dtype}{tuple(x.shape)} -> {y.dtype}{tuple(y.shape)}")
            continue
        if not torch.equal(x.view(torch.int16) if x.element_size() == 2 else x,
                           y.view(torch.int16) if y.element_size() == 2 else y):
            result["mismatched"].append(name)
        result["checked"] += 1
    names = sorted(set(a) & set(b))
    picks = [n for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight") if n in names]
    picks += [n for n in names if ".layers.0." in n][: max(0, sample - len(picks))]
    by_file: dict[str, list[str]] = {}
    for n in picks:
        by_file.setdefault(b[n], []).append(n)
    for fn, ns in by_file.items():  # load_file reads a whole shard; one shard at a time, freed after use
        whole_b = load_file(fn)
        for n in ns:
            with safe_open(a[n], framework="pt") as fa:
                x = fa.get_tensor(n)
            y = whole_b[n]
            same = x.dtype == y.dtype and torch.equal(x.view(torch.int16), y.view(torch.int16))
            result["sample"].append({"name": n, "dtype": str(y.dtype), "shape": list(y.shape), "bit_exact": same})
        del whole_b
    result["bit_exact"] = (result["names_equal"] and not result["mismatched"] and not result["dtype_changed"]
                           and all(s["bit_exact"] for s in result["sample"]))
    return result


def fmt_gib(n: int) -> str:
    return f"{n / GIB:6.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16, help="num_hidden_layers")
    p.add_argument("--hidden", type=int, default=2048, help="hidden_size (heads = hidden/64, kv heads = heads/4)")
    p.add_argument("--intermediate", type=int, default=8192, help="intermediate_size")
    p.add_argument("--vocab", type=int, default=32000, help="vocab_size")
    p.add_argument("--out", default="/tmp/bench_convert.json", help="JSON results path")
    p.add_argument("--workdir", default="/tmp", help="where the temporary checkpoint directories go")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoint directories")
    p.add_argument("--cold", action="store_true", help="evict source files from the page cache before each read")
    args = p.parse_args(argv)

    heads = max(1, args.hidden // 64)
    spec = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
            "heads": heads, "kv_heads": max(1, heads // 4)}
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    src, flax_dir, rt = (os.path.join(work, d) for d in ("hf", "flax", "hf_roundtrip"))
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict[str, Run] = {}
    print(f"workdir {work}  spec {spec}", flush=True)
    try:
        build = measure("build", [py, "-c", BUILD_CODE, src, json.dumps(spec)], os.path.join(logs, "build.log"),
                        env=env)
        info = json.loads(build.log_tail.strip().splitlines()[-1])
        st_files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        model_bytes = sum(os.path.getsize(f) for f in st_files)
        target = int(1.3 * model_bytes + 1.5 * GIB)
        print(f"built {info['params'] / 1e9:.3f}B params, {len(st_files)} files, {model_bytes / GIB:.2f} GiB "
              f"in {build.wall_s:.0f} s (builder peak RSS {build.peak_rss_wait4 / GIB:.2f} GiB)", flush=True)

        if args.cold:
            evict(st_files)
        runs["io_floor(cat)"] = measure("io_floor(cat)", ["cat", *st_files], "/dev/null")
        runs["startup(imports)"] = measure(
            "startup(imports)", [py, "-c", "import converters.hf, orbax.checkpoint"], os.path.join(logs, "start.log"),
            env=env)
        if args.cold:
            evict(st_files)
        runs["hf-to-flax"] = measure("hf-to-flax", [py, "-m", "converters", "--quiet", "hf-to-flax", src, flax_dir],
                                     os.path.join(logs, "hf-to-flax.log"), env=env)
        flax_files = all_files(flax_dir)
        flax_bytes = sum(os.path.getsize(f) for f in flax_files)
        if args.cold:
            evict(flax_files)
        runs["io_floor_flax(cat)"] = measure("io_floor_flax(cat)", ["cat", *flax_files], "/dev/null")
        if args.cold:
            evict(flax_files)
        runs["flax-to-hf"] = measure("flax-to-hf", [py, "-m", "converters", "--quiet", "flax-to-hf", flax_dir, rt,
                                                    "--max_shard_size", "2GB"],
                                     os.path.join(logs, "flax-to-hf.log"), env=env)
        rt_bytes = dir_bytes(rt, "*.safetensors")
        t0 = time.perf_counter()
        check = check_round_trip(src, rt)
        check["seconds"] = round(time.perf_counter() - t0, 1)

        floor = runs["io_floor(cat)"].wall_s
        start = runs["startup(imports)"]
        print()
        print(f"model: {info['params'] / 1e9:.3f}B params bf16, safetensors {model_bytes / GIB:.2f} GiB "
              f"({len(st_files)} files); converted Orbax dir {flax_bytes / GIB:.2f} GiB; round-trip HF "
              f"{rt_bytes / GIB:.2f} GiB; page cache: {'cold (evicted)' if args.cold else 'warm'}")
        print(f"target: peak RSS <= 1.3 x {model_bytes / GIB:.2f} + 1.5 = {target / GIB:.2f} GiB")
        hdr = (f"{'step':<20}{'wall s':>8}{'x floor':>9}{'peak RSS poll':>15}{'ru_maxrss':>11}"
               f"{'RUSAGE_CH d':>13}{'/model':>8}  target")
        print(hdr)
        print("-" * len(hdr))
        rows = {}
        for name, r in runs.items():
            conv = name in ("hf-to-flax", "flax-to-hf")
            peak = max(r.peak_rss_poll, r.peak_rss_wait4)
            verdict = ("PASS" if peak <= target else "FAIL") if conv else ""
            ratio = r.wall_s / floor if floor > 0 else float("nan")
            print(f"{name:<20}{r.wall_s:8.2f}{ratio:9.1f}{fmt_gib(r.peak_rss_poll):>12} GiB{fmt_gib(r.peak_rss_wait4):>8} "
                  f"GiB{fmt_gib(r.rusage_children_delta):>10} GiB{peak / model_bytes:8.2f}  {verdict}")
            rows[name] = {**{k: v for k, v in asdict(r).items() if k != "timeline"}, "peak_rss": peak,
                          "x_floor": ratio, "peak_over_model": peak / model_bytes,
                          "target_pass": (peak <= target) if conv else None, "timeline": r.timeline}
        print(f"(x floor = wall / wall of `cat` over the {model_bytes / GIB:.2f} GiB of safetensors = {floor:.2f} s; "
              f"imports alone: {start.wall_s:.1f} s, {start.peak_rss_wait4 / GIB:.2f} GiB)")
        print(f"(RUSAGE_CH d = increase of getrusage(RUSAGE_CHILDREN).ru_maxrss, a running max over all children: "
              f"0 when an earlier child peaked higher)")
        print(f"round trip HF -> Flax -> HF: {'BIT-EXACT' if check['bit_exact'] else 'NOT bit-exact'} "
              f"({check['checked']} tensors compared as raw bf16 words, names equal: {check['names_equal']}, "
              f"mismatched: {check['mismatched'][:5]}, dtype/shape changed: {check['dtype_changed'][:3]})")
        for s in check["sample"]:
            print(f"  load_file sample {s['name']:<45} {s['dtype']:<15} {str(s['shape']):<14} "
                  f"bit_exact={s['bit_exact']}")
        result = {
            "command": " ".join([os.path.relpath(py, ROOT) if py.startswith(ROOT) else py, *sys.argv]),
            "host": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                     "python": platform.python_version()},
            "spec": spec, "params": info["params"], "build_s": info["build_s"], "cold_cache": args.cold,
            "model_bytes": model_bytes, "flax_bytes": flax_bytes, "roundtrip_bytes": rt_bytes,
            "target_bytes": target, "target_rule": "peak_rss <= 1.3 * model_bytes + 1.5 GiB",
            "io_floor_s": floor, "runs": rows, "round_trip": check, "workdir": work if args.keep else None,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
        ok = check["bit_exact"] and all(rows[n]["target_pass"] for n in ("hf-to-flax", "flax-to-hf"))
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
