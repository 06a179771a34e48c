"""Streaming safetensors reader and writer (one tensor in host memory at a time).

The format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes (offsets relative to the end of the header). We parse it ourselves so that bf16 and
fp8 tensors come back as NumPy arrays (ml_dtypes) without a framework, and so that export can write the header
first and then stream each tensor's bytes as it is gathered from the devices.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """Every tensor's place in ``file``, checked against the file: a header or offsets that point outside it, or a
    byte range that does not match the tensor's shape and dtype, is an error naming the file and tensor (a corrupt
    header must never make a reader allocate what it says)."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{file}: corrupt safetensors header (it claims {n} bytes; the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        dtype, shape = DTYPES[meta["dtype"]], tuple(meta["shape"])
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= start <= end or base + end > size or end - start != want:
            raise ValueError(f"{file}: tensor {name!r} has corrupt data_offsets [{start}, {end}] (shape {shape} "
                             f"{meta['dtype']} needs {want} bytes; the data section has {size - base}): the file "
                             "is damaged or truncated, re-download or re-export it")
        out[name] = TensorInfo(file, dtype, shape, base + start, end - start)
    return out


class SafetensorsDir:
    """All tensors of an HF checkpoint directory: single ``model.safetensors``, or sharded with the index file.

    Refuses pickle checkpoints (``.bin``/``.pt``): loading them runs arbitrary code from the file.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}): it needs a "
                                 '"weight_map" of tensor name -> file name') from None
            root = os.path.realpath(path)
            for v in set(weight_map.values()):  # only files inside the directory: never an absolute path or ..
                if not isinstance(v, str) or os.path.isabs(v) or \
                        os.path.commonpath([root, os.path.realpath(os.path.join(root, v))]) != root:
                    raise ValueError(f"{index} names {v!r}, outside {path}: refused (an index may only name "
                                     "files in its own directory)")
            files = sorted({os.path.join(path, v) for v in weight_map.values()})
            for fn in files:
                if not os.path.isfile(fn):
                    raise FileNotFoundError(f"{INDEX_NAME} in {path} names {os.path.basename(fn)}, which is missing")
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickles = [os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat))]
            if pickles:
                raise ValueError(
                    f"{path} holds only pickle checkpoint files ({', '.join(sorted(pickles)[:3])}); jaxrlhf refuses "
                    "them because unpickling runs arbitrary code. On a machine you trust, convert once with "
                    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
                )
            raise FileNotFoundError(f"{path} has no *.safetensors weights")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for fn in files:
            for name, info in read_header(fn).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {fn}")
                self.tensors[name] = info

    def read(self, name: str) -> np.ndarray:
        """One tensor as a fresh host array (read with a single pread; no memory map left behind)."""
        info = self.tensors[name]
        buf = np.empty(info.nbytes, np.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf))
        if got != info.nbytes:
            raise ValueError(f"{info.file}: tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return buf.view(info.dtype).reshape(info.shape)


def write_file(path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
               produce: Callable[[str], np.ndarray], *, metadata: dict[str, str] | None = None,
               on_tensor: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file whose tensors are given by ``specs`` and produced one at a time by ``produce``.

    The header comes first (it only needs names, dtypes and shapes); ``produce(name)`` must return an array of the
    announced dtype and shape, which is checked.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            arr = produce(name)
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced {arr.dtype}{arr.shape}, announced {dtype}{shape}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            if on_tensor:
                on_tensor(arr.nbytes)


def plan_shards(specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int):
    """Split tensor specs, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for spec in specs:
        n = int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += n
    if cur:
        shards.append(cur)
    return shards


SIZE_UNITS = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1, "": 1}


def parse_size(text: str | int) -> int:
    """``"5GB"``/``"500MB"``/``"2GiB"``/int -> bytes (HF's ``max_shard_size`` spelling); ValueError below 1 byte or
    for a unit that is not one of ``SIZE_UNITS``."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
        if m is None or m[2].upper() not in SIZE_UNITS:
            raise ValueError(f"max_shard_size {text!r} is not a size: write a number and a unit, e.g. 5GB or 500MB "
                             "(units: GB, MB, KB, GiB, MiB, KiB, B; no unit means bytes)")
        n = int(float(m[1]) * SIZE_UNITS[m[2].upper()])
    if n < 1:
        raise ValueError(f"max_shard_size {text!r} is below one byte: give a positive size, e.g. 5GB")
    return n
