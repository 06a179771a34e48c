"""HF safetensors <-> Flax parameters, streaming one tensor at a time through the mapping table.

Import reads each tensor with one pread and places it straight into its (sharded) device array; export gathers
one parameter at a time, converts it to HF name/layout/dtype and streams it into sharded safetensors files. Neither
direction ever holds a second full copy of the model in host memory.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from converters.atomic import replace_dir
from converters.safetensors_io import INDEX_NAME, SafetensorsDir, parse_size, plan_shards, write_file
from converters.tables import ARCH_NAMES, IGNORED_HF, expert_names, hf_name, table_for
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.decoder import Decoder
from sharding import named_shardings, path_str
from sharding.tables import RULES_BY_MODEL_TYPE

# Files besides the weights that make a directory loadable as-is by transformers and vLLM.
AUX_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                "chat_template.*", "generation_config.json", "*.tiktoken")
FLAX_PARAMS_DIR = "params"
OCDBT_FILE_BYTES = 64 * 2**20  # converted checkpoints: Orbax params under DST/params, HF config.json beside it


def flat_params(params: dict) -> list[tuple[str, Any]]:
    """Nested param dict -> [(path, leaf)] in tree order."""
    return [(path_str(k), v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]]


def abstract_model(cfg: ModelConfig, *, head: str, dtype, mesh=None, remat: bool = False):
    """(graphdef, abstract params as nested dict of ShapeDtypeStruct with shardings) without allocating."""
    model = nnx.eval_shape(lambda: Decoder(cfg, head=head, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, remat=remat))
    graphdef, state = nnx.split(model)
    abstract = state.to_pure_dict()
    if mesh is None:
        dev = jax.devices()[0]
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(dev), abstract)
    else:
        shardings = named_shardings(abstract, RULES_BY_MODEL_TYPE[cfg.model_type], mesh)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    return graphdef, abstract


def _unflatten(flat: dict[str, Any], like: dict) -> dict:
    leaves = [flat[p] for p, _ in flat_params(like)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def detect_head(path: str, hf_cfg: dict, tensor_names=()) -> tuple[str, str]:
    """(head, value_head_prefix) of a checkpoint: ``score`` for *ForSequenceClassification or a value head."""
    meta = hf_cfg.get("jaxrlhf", {})
    if "head" in meta:
        return meta["head"], "score"
    archs = hf_cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs) or "score.weight" in tensor_names:
        return "score", "score"
    if "value_head.weight" in tensor_names:
        return "score", "value_head"
    return "lm", "score"


def load_hf_params(src: SafetensorsDir, cfg: ModelConfig, abstract: dict, *, value_head_prefix: str = "score",
                   init_missing_score: jax.Array | None = None, progress: bool = False) -> dict:
    """Read every tensor the model needs from ``src`` into arrays with ``abstract``'s shapes, dtypes, shardings.

    Errors name the tensor: missing, unexpected (present but unused) or mis-shaped. ``init_missing_score`` (a PRNG
    key) allows a missing score head (a critic initialised from a causal LM), drawn with std 1/(D+1).
    """
    table = table_for(cfg.model_type)
    rename = {f"{value_head_prefix}.weight": "score.weight"} if value_head_prefix != "score" else {}
    by_table_name = {rename.get(n, n): n for n in src.tensors}
    wanted = flat_params(abstract)
    used: set[str] = set()
    out: dict[str, jax.Array] = {}
    bar = tqdm(total=sum(a.size * a.dtype.itemsize for _, a in wanted), unit="B", unit_scale=True,
               desc="load", disable=not progress, file=sys.stderr)
    for path, a in wanted:
        name, transpose, stacked = hf_name(table, path)
        if name not in by_table_name and not stacked:
            if path == "score/kernel" and init_missing_score is not None:
                std = 1.0 / (cfg.hidden_size + 1)
                out[path] = jax.device_put(
                    (std * jax.random.normal(init_missing_score, a.shape, jnp.float32)).astype(a.dtype), a.sharding)
                continue
        host = _read_stack(src, by_table_name, expert_names(name, stacked, a.shape[0] if stacked else 1), path,
                           transpose, tuple(a.shape[1:]) if stacked else tuple(a.shape), used)
        if not stacked:
            host = host[0]
        out[path] = jax.make_array_from_callback(a.shape, a.sharding,
                                                 lambda idx, h=host, dt=a.dtype: np.asarray(h[idx], dtype=dt))
        bar.update(a.size * a.dtype.itemsize)
        del host
    bar.close()
    ignorable = set()
    for n in src.tensors:
        if any(p.search(n) for p in IGNORED_HF):
            ignorable.add(n)
        elif n == "lm_head.weight" and (cfg.tie_word_embeddings or "score/kernel" in out):
            ignorable.add(n)  # tied copy, or a critic/RM initialised from a causal LM
    unexpected = sorted(set(src.tensors) - used - ignorable)
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{src.path}: unexpected tensor(s) {unexpected[:5]}{more} that the {cfg.model_type} "
                         "model does not use: wrong model_type in config.json, or a head this loader does not know")
    return _unflatten(out, abstract)


def _read_stack(src: SafetensorsDir, by_table_name: dict, names: list[str], path: str, transpose: bool,
                shape: tuple, used: set) -> np.ndarray:
    """The tensors ``names`` read (each transposed when ``transpose``), checked against ``shape`` and stacked
    ``[len(names), *shape]`` (a stacked MoE parameter: one tensor per expert)."""
    parts = []
    for name in names:
        if name not in by_table_name:
            raise ValueError(f"{src.path}: tensor {name!r} (for {path}) is missing from the checkpoint")
        file_name = by_table_name[name]
        used.add(file_name)
        host = src.read(file_name)
        host = host.T if transpose else host
        if tuple(host.shape) != shape:
            hf_shape = tuple(reversed(shape)) if transpose else shape
            raise ValueError(f"{src.path}: tensor {file_name!r} has shape {src.tensors[file_name].shape}, "
                             f"the config implies {hf_shape}")
        parts.append(host)
    return np.stack(parts) if len(parts) > 1 else parts[0][None]


def _hf_entries(params: dict, cfg: ModelConfig) -> list[tuple[str, bool, Any, int | None]]:
    """``[(hf_name, transpose, array, expert)]`` for every HF tensor, in tree order: a stacked MoE parameter
    ``[E, ...]`` gives one entry per expert ``e`` whose tensor is ``array[e]`` (``_take``: sliced only when used, so
    the experts are never all copied at once); ``expert`` is None otherwise."""
    from jaxrlhf.models.lora import is_adapter

    table = table_for(cfg.model_type)
    flat = flat_params(params)
    if any(is_adapter(path) for path, _ in flat):
        raise ValueError("the parameters hold LoRA adapters: merge them first (jaxrlhf.models.lora.merge) for a plain "
                         "HF model, or write them as a PEFT adapter (converters.peft.save_adapter)")
    out = []
    for path, arr in flat:
        name, transpose, stacked = hf_name(table, path)
        if stacked:
            out += [(n, transpose, arr, e) for e, n in enumerate(expert_names(name, True, arr.shape[0]))]
        else:
            out.append((name, transpose, arr, None))
    return out


def _take(arr, expert: int | None):
    """The tensor of an ``_hf_entries`` entry: ``arr``, or expert ``expert``'s slice of a stacked parameter."""
    return arr if expert is None else arr[expert]


def _to_host_hf(arr, transpose: bool, dtype=None) -> np.ndarray:
    """One parameter gathered to this host, in HF layout, optionally cast.

    A parameter sharded across hosts is all-gathered (a collective: every process must make the same call), so a
    multi-host sync or export holds one whole tensor per host at a time, never the whole model.
    """
    if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
        from jax.experimental import multihost_utils

        arr = multihost_utils.process_allgather(arr, tiled=True)
    h = np.asarray(jax.device_get(arr))
    if transpose:
        h = np.ascontiguousarray(h.T)
    return h if dtype is None else h.astype(dtype, copy=False)


def hf_entries(params: dict, cfg: ModelConfig, *, dtype=None, gather: bool = True) -> Iterator[tuple[str, Any, bool]]:
    """Yield ``(hf_name, array, transposed)`` per parameter, in tree order: the weight sync's raw form.

    ``array`` stays in Flax layout (its HF layout is ``array.T`` when ``transposed``), cast to ``dtype`` on its own
    devices. A receiver that copies the tensor anyway (a vLLM engine loading it into its parameters) transposes in
    that copy for free, so nothing is transposed or re-laid out here. With ``gather``, a parameter sharded across
    hosts is all-gathered (a collective: every process iterates in the same order), so what is yielded is
    addressable on this process: a ``jax.Array`` whose shards this process holds, or a NumPy array. Without it,
    arrays keep their global sharding (for engines on the trainer's own devices, the JAX sampler).
    """
    for name, transpose, whole, expert in _hf_entries(params, cfg):
        arr = _take(whole, expert)
        if dtype is not None and arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)  # on the devices (XLA's cast is ~3x NumPy's for bfloat16), dispatched async
        if gather and isinstance(arr, jax.Array) and not arr.is_fully_addressable:
            from jax.experimental import multihost_utils

            arr = multihost_utils.process_allgather(arr, tiled=True)
        yield name, arr, transpose


def hf_tensors(params: dict, cfg: ModelConfig, *, dtype=None, host: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, array)`` in HF layout, one parameter at a time.

    The rollout weight sync and the exporter both consume this. ``dtype`` casts (e.g. to the engine dtype).
    ``host=True`` gathers each tensor to this host as NumPy; ``host=False`` keeps it a (sharded) device array,
    for engines that live on the same devices (the JAX sampler).
    """
    for name, transpose, whole, expert in _hf_entries(params, cfg):
        arr = _take(whole, expert)
        if host:
            yield name, _to_host_hf(arr, transpose, dtype)
        else:
            out = arr.T if transpose else arr
            yield name, (out.astype(dtype) if dtype is not None else out)


def copy_aux_files(src: str | None, dst: str) -> None:
    """Copy tokenizer and generation-config files from ``src`` (an HF or converted directory)."""
    if not src:
        return
    for pat in AUX_PATTERNS:
        for fn in glob.glob(os.path.join(src, pat)):
            if os.path.isfile(fn):
                shutil.copy2(fn, os.path.join(dst, os.path.basename(fn)))


def hf_config_for_export(cfg: ModelConfig, *, head: str, dtype, extra: dict | None = None) -> dict:
    hf = {k: v for k, v in cfg.hf_config.items() if k not in ("jaxrlhf", "torch_dtype")}
    stem = ARCH_NAMES[cfg.model_type]
    if head == "score":
        hf["architectures"] = [f"{stem}ForSequenceClassification"]
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    else:
        hf["architectures"] = [f"{stem}ForCausalLM"]
    hf["dtype"] = np.dtype(dtype).name if np.dtype(dtype) != np.dtype(jnp.bfloat16) else "bfloat16"
    hf.update(extra or {})
    return hf


def export_hf(params: dict, cfg: ModelConfig, dst: str, *, head: str, dtype=None, max_shard_size="5GB",
              aux_from: str | None = None, extra_config: dict | None = None, overwrite: bool = False,
              progress: bool = False) -> str | None:
    """Write ``params`` as an HF directory (sharded safetensors + index, config, generation config, tokenizer) that
    replaces ``dst`` as a whole (converters/atomic.py: what else ``dst`` holds, e.g. a trainer's logs, is kept).

    Call it on every process: a tensor sharded across hosts is gathered one at a time, a collective every process
    joins in the same order. Process 0 writes and returns ``dst``; the others return None. A failure on process 0
    (a refused path, a full disk) is raised there, and as a RuntimeError on the others once every gather has run.
    """
    from sharding.distributed import agree

    entries = _hf_entries(params, cfg)
    shape = lambda arr, e: tuple(arr.shape[1:] if e is not None else arr.shape)  # noqa: E731
    specs = [(name, np.dtype(dtype or arr.dtype), tuple(reversed(shape(arr, e))) if t else shape(arr, e))
             for name, t, arr, e in entries]
    gathered: set[str] = set()

    def produce(name: str) -> np.ndarray:
        gathered.add(name)
        transpose, arr, expert = by_name[name]
        return _to_host_hf(_take(arr, expert), transpose, dtype)

    by_name = {name: (t, arr, e) for name, t, arr, e in entries}
    error = None
    if jax.process_index() == 0:
        try:
            _write_hf_dir(dst, specs, produce, parse_size(max_shard_size), overwrite=overwrite, progress=progress,
                          aux_from=aux_from, config=hf_config_for_export(cfg, head=head, dtype=specs[0][1],
                                                                          extra=extra_config),
                          generation={k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                      if getattr(cfg, k) is not None})
        except Exception as e:  # noqa: BLE001 - raised by agree() below, once the other processes are released
            error = e
    if jax.process_count() > 1:
        for name, *_ in entries:  # the gathers a failed (or, off process 0, absent) write did not run
            if name not in gathered:
                produce(name)
    agree(error)
    return dst if jax.process_index() == 0 else None


def _write_hf_dir(dst: str, specs: list, produce, max_shard_bytes: int, *, overwrite: bool, progress: bool,
                  aux_from: str | None, config: dict, generation: dict) -> None:
    shards = plan_shards(specs, max_shard_bytes)
    total = sum(int(np.prod(s[2], dtype=np.int64)) * s[1].itemsize for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress, file=sys.stderr) as bar, \
            replace_dir(dst, overwrite=overwrite) as tmp:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file(os.path.join(tmp, fname), shard, produce, on_tensor=bar.update)
            weight_map.update({s[0]: fname for s in shard})
        if len(shards) > 1:
            _write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        copy_aux_files(aux_from, tmp)
        _write_json(os.path.join(tmp, "config.json"), config)
        if not os.path.exists(os.path.join(tmp, "generation_config.json")):
            _write_json(os.path.join(tmp, "generation_config.json"), generation)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------- converted (Flax / Orbax) checkpoints
def save_flax(params: dict, cfg: ModelConfig, dst: str, *, head: str, aux_from: str | None = None,
              overwrite: bool = False) -> str:
    """A converted checkpoint: Orbax params (sharded as they are) + the HF config and tokenizer files."""
    import orbax.checkpoint as ocp

    with replace_dir(dst, overwrite=overwrite) as tmp:
        # Small OCDBT data files: with Orbax's default 2 GiB target the whole compressed checkpoint is buffered in
        # host memory (scripts/bench_convert.py measured +1.3 GiB at 1.1B params, +3 GiB at 2.6B).
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        ckptr.save(os.path.join(tmp, FLAX_PARAMS_DIR),
                   args=ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=OCDBT_FILE_BYTES))  # synchronous
        copy_aux_files(aux_from, tmp)
        hf = dict(cfg.hf_config)
        dt = jax.tree_util.tree_leaves(params)[0].dtype
        hf["jaxrlhf"] = {"head": head, "format": 1, "dtype": str(dt)}
        _write_json(os.path.join(tmp, "config.json"), hf)
    return dst


def load_flax_params(path: str, abstract: dict) -> dict:
    import orbax.checkpoint as ocp

    # Bounded read concurrency: the default (96 GB in flight) holds every compressed chunk at once.
    return ocp.StandardCheckpointer(restore_concurrent_gb=1).restore(
        os.path.abspath(os.path.join(path, FLAX_PARAMS_DIR)), abstract)  # Orbax refuses relative paths


def is_flax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, FLAX_PARAMS_DIR))


# ---------------------------------------------------------------- the one loader
def load(path: str, *, mesh=None, dtype=None, head: str | None = None, value_head_prefix: str | None = None,
         remat: bool = False, seed: int = 0, progress: bool = False):
    """Load an HF directory or a converted checkpoint -> (Decoder, ModelConfig, head).

    ``dtype`` None keeps the checkpoint's dtype. ``head`` None detects it ("score" for *ForSequenceClassification or
    an OpenRLHF value head); ``head="score"`` on a causal-LM checkpoint builds a critic with a fresh value head.
    """
    cfg = ModelConfig.from_dir(path)
    flax_ckpt = is_flax_checkpoint(path)
    src = None if flax_ckpt else SafetensorsDir(path)
    found_head, found_prefix = detect_head(path, cfg.hf_config, () if src is None else src.tensors)
    want_head = head or found_head
    prefix = value_head_prefix or found_prefix
    if flax_ckpt:
        stored = jnp.dtype(cfg.hf_config["jaxrlhf"].get("dtype", "float32"))
    else:
        stored = src.tensors["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in src.tensors \
            else np.dtype(np.float32)
    param_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(stored)
    graphdef, abstract = abstract_model(cfg, head=want_head, dtype=param_dtype, mesh=mesh, remat=remat)
    if flax_ckpt:
        if want_head != found_head:
            raise ValueError(f"{path} is a converted '{found_head}' checkpoint; cannot load it with head={want_head!r}")
        stored_abs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, stored, sharding=a.sharding),
                                            abstract)
        params = load_flax_params(path, stored_abs)
        if stored != param_dtype:
            params = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
    else:
        init_key = jax.random.key(seed) if (want_head == "score" and found_head == "lm") else None
        params = load_hf_params(src, cfg, abstract, value_head_prefix=prefix, init_missing_score=init_key,
                                progress=progress)
    return nnx.merge(graphdef, params), cfg, want_head
