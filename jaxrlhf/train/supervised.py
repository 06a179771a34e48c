"""The shared loop of the offline trainers (SFT, RM, DPO, KTO): common flags + ``fit``.

A trainer is a config that inherits the common flags and a ``main`` that wires data, model and loss into ``fit``
(jaxrlhf/sft.py is the complete example)::

    @dataclass
    class DPOConfig(SupervisedConfig):          # plain field inheritance, no logic in a base class
        beta: float = arg(0.1, "DPO temperature")
        learning_rate: float = arg(5e-7, "peak learning rate")   # redeclaring a field changes its default

    def main(cfg: DPOConfig) -> dict:
        mesh = setup_mesh(cfg)                  # first: fakes --mesh CPU devices before jax touches one
        tokenizer = load_tokenizer_for(cfg)     # --pretrain's tokenizer, --tokenizer_chat_template applied
        train_records, eval_records = load_train_eval(cfg)   # --dataset/--dataset_probs/--max_samples/eval split
        train = MyData(train_records, ...)      # anything with __len__ and batch(indices) (see below)
        model = load_model(cfg, mesh, head="lm")
        return fit(cfg, mesh=mesh, model=model, loss_fn=dpo_loss, train_data=train, eval_data=..., name="dpo")

    def cli(argv=None) -> int:
        return run_cli(DPOConfig, main, argv, prog="python -m jaxrlhf.dpo")

Data (``BatchSource``): ``len(data)`` rows, and ``data.batch(indices)`` -> dict of host NumPy values:
- arrays ``[n, ...]`` with n = len(indices); every other dimension must be the same on every call (one compile);
- 0-d scalars are NORMALISERS: counts over the rows passed, additive over rows (e.g. ``num_tokens =
  loss_mask[:, 1:].sum()``, ``num_pairs = n``). ``loss_fn`` divides by them (``losses.token_mean_over_batch``), so
  the micro-batch losses SUM to the mean over the whole step batch (``train/steps.py``: gradient accumulation sums).
  For evaluation ``fit`` replaces every scalar with its total over the evaluated eval rows, so summing the chunk
  results gives exact eval-set means;
- keys ending in ``attention_mask`` count the real tokens reported as ``tokens_per_s``.

``loss_fn(model, micro_batch) -> (loss, metrics)``: ``model`` is the nnx module merged from the (cast) parameters;
``metrics`` are jax scalars normalised like the loss (they are summed over micro-batches and eval chunks).

Optional hooks:
- ``prepare(batch) -> batch``: runs on every global batch (train and eval, host NumPy in and out) before it is
  split into micro-batches; e.g. DPO's reference log-probs from a frozen model (use ``steps.make_forward``).
- ``extra_config(params) -> dict``: keys merged into the exported ``config.json`` (the RM's reward mean/std). It
  runs on every process (it may call jitted forwards on the mesh), before the export; only process 0 writes.

Batch arithmetic (OpenRLHF's): ``--train_batch_size`` rows per optimizer step; ``--micro_train_batch_size`` rows
per data-parallel rank per micro-batch (dp = data x fsdp mesh axes), so a micro-batch holds ``micro x dp`` rows and
gradient accumulation covers the rest. With ``--packing_samples`` a row is a packed row of ``--max_len`` tokens.
An epoch is ``len(train) // train_batch_size`` steps (the tail is dropped); the order is reshuffled per epoch.

Outputs: the HF model in ``--save_path`` (files written beside anything already there: OpenRLHF's default
``--ckpt_path`` lives inside it), ``--save_path/logs/metrics.jsonl`` (+ TensorBoard/W&B), a PNG plot
``--save_path/<name>_metrics.png``, and Orbax checkpoints in ``--ckpt_path`` (parameters, optimizer state and the
data position: ``--load_checkpoint`` resumes exactly where the run stopped).
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Protocol

import numpy as np

from jaxrlhf.cli import arg, config_to_dict, parse_config
from jaxrlhf.plan import PlanFlags
from sharding.distributed import DistributedConfig


@dataclass
class SupervisedConfig(DistributedConfig, PlanFlags):  # + multi-host flags, --dry_run / --device_memory_gb
    """Flags shared by the offline trainers (OpenRLHF's spelling)."""

    # ---- mesh and randomness
    mesh: str = arg("4x2", "device mesh: FSDPxTENSOR (4x2), DATAxFSDPxTENSOR (2x2x2) or data=2,fsdp=2,tensor=2")
    seed: int = arg(42, "seed of the data order, the held-out split, mixing and head initialisation")
    # ---- model
    pretrain: Optional[str] = arg(None, "HF model directory or converted checkpoint to start from")
    # ---- data
    dataset: Optional[str] = arg(None, "training dataset(s), comma-separated: files, type@dir, save_to_disk dirs, "
                                       "hub names")
    dataset_probs: Optional[str] = arg(None, "mixing probabilities of --dataset, comma-separated (default: concat)")
    dataset_split: str = arg("train", "split of --dataset")
    eval_dataset: Optional[str] = arg(None, "evaluation dataset(s), comma-separated (default: --eval_holdout)")
    eval_split: str = arg("train", "split of --eval_dataset")
    eval_holdout: float = arg(0.0, "without --eval_dataset: fraction of --dataset held out for evaluation "
                                   "(0: no evaluation)")
    max_samples: Optional[int] = arg(None, "use at most this many samples (per dataset, then in total)")
    max_len: int = arg(2048, "tokens per sample (longer samples are truncated or dropped, with a count logged)")
    packing_samples: bool = arg(False, "pack several samples per row of --max_len tokens (segment-masked attention)")
    input_template: Optional[str] = arg(None, "template with {} for the input, e.g. 'User: {}\\nAssistant: '")
    apply_chat_template: bool = arg(False, "format inputs with the tokenizer's chat template")
    tokenizer_chat_template: Optional[str] = arg(None, "Jinja chat template replacing the tokenizer's own")
    # ---- batches and schedule
    max_epochs: int = arg(1, "passes over the training set")
    max_steps: Optional[int] = arg(None, "stop after this many optimizer steps (default: max_epochs x epoch)")
    train_batch_size: int = arg(128, "rows per optimizer step (global)")
    micro_train_batch_size: int = arg(8, "rows per data-parallel rank per micro-batch (gradient accumulation)")
    learning_rate: float = arg(5e-6, "peak learning rate")
    lr_warmup_ratio: float = arg(0.03, "fraction of the steps spent in linear warm-up")
    lr_scheduler: Literal["cosine_with_min_lr", "constant_with_warmup"] = arg(
        "cosine_with_min_lr", "after warm-up: cosine decay to --min_lr_ratio x peak, or constant")
    min_lr_ratio: float = arg(0.1, "cosine decay floor as a fraction of the peak learning rate")
    adam_betas: tuple[float, ...] = arg((0.9, 0.95), "AdamW betas")
    l2: float = arg(0.0, "AdamW weight decay (matrices only)")
    max_norm: float = arg(1.0, "gradient clipping by global norm (0: off)")
    bf16: bool = arg(False, "bf16 compute (fp32 master weights and optimizer state)")
    gradient_checkpointing: bool = arg(False, "recompute layer activations in the backward pass")
    # ---- evaluation, checkpoints, logs, outputs
    eval_steps: int = arg(-1, "evaluate every N steps (-1: at the end of every epoch)")
    save_steps: int = arg(-1, "checkpoint every N steps (-1: only at the end)")
    logging_steps: int = arg(1, "log every N steps")
    save_path: str = arg("./ckpt", "where the final HF model, logs and plot are written")
    ckpt_path: str = arg("./ckpt/checkpoints", "training checkpoints (Orbax)")
    max_ckpt_num: int = arg(3, "checkpoints kept")
    load_checkpoint: bool = arg(False, "resume from the latest checkpoint in --ckpt_path")
    use_tensorboard: Optional[str] = arg(None, "TensorBoard log directory")
    use_wandb: Optional[str] = arg(None, "W&B: 'true' or an API key")
    wandb_project: str = arg("jaxrlhf", "W&B project")
    wandb_run_name: Optional[str] = arg(None, "W&B run name")

    # What --dry_run plans for (overridden by the trainers that differ).
    def rows_per_sample(self) -> int:
        """Sequences per training sample (a preference pair, or a KTO sample plus its mismatched KL row: 2)."""
        return 1

    def trained_head(self) -> str:
        return "lm"

    def reference(self) -> Optional[str]:
        """The frozen reference model's path (DPO / KTO), else None."""
        return None

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eval_holdout < 1.0:
            raise ValueError(f"--eval_holdout must be in [0, 1), got {self.eval_holdout}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"--adam_betas takes two numbers (beta1,beta2), got {self.adam_betas}")
        if self.max_len < 2:
            raise ValueError(f"--max_len must be >= 2, got {self.max_len}")
        for flag in ("train_batch_size", "micro_train_batch_size", "max_epochs", "logging_steps", "max_ckpt_num"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")
        for flag in ("eval_steps", "save_steps"):
            if getattr(self, flag) == 0 or getattr(self, flag) < -1:
                raise ValueError(f"--{flag} must be a positive number of steps or -1, got {getattr(self, flag)}")
        if self.input_template is not None and "{}" not in self.input_template:
            raise ValueError(f"--input_template {self.input_template!r} has no '{{}}' placeholder for the input")


class BatchSource(Protocol):
    """Tokenized rows: ``len(data)`` and ``data.batch(indices) -> {name: array [n, ...] or 0-d normaliser}``."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


LossFn = Callable[[Any, dict], tuple[Any, dict]]


# ---------------------------------------------------------------------------------------------------------------------
# Set-up helpers (each entry point calls them in this order)
# ---------------------------------------------------------------------------------------------------------------------


def setup_mesh(cfg: SupervisedConfig):
    """The (data, fsdp, tensor) mesh of ``--mesh``; on a CPU-only machine the CPU poses as that many devices.

    Call before anything touches a jax device.
    """
    from sharding import distributed, make_mesh, parse_mesh

    distributed.start(cfg, lambda n: parse_mesh(cfg.mesh).size // n)  # single process unless flags/env say otherwise
    mesh = make_mesh(cfg.mesh)
    distributed.check_mesh_hosts(mesh)
    return mesh


def dry_run(cfg: SupervisedConfig) -> dict:
    """``--dry_run``: print the mesh, batch arithmetic and per-device memory plan; refuse what cannot fit."""
    from jaxrlhf.plan import dry_run_supervised

    rows = cfg.rows_per_sample()
    return dry_run_supervised(model_path=cfg.pretrain, mesh=cfg.mesh, max_len=cfg.max_len, bf16=cfg.bf16,
                              micro_train_batch_size=cfg.micro_train_batch_size * rows,
                              train_batch_size=cfg.train_batch_size * rows,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              device_memory_gb=cfg.device_memory_gb, head=cfg.trained_head(),
                              ref_path=cfg.reference(), processes=cfg.num_processes or 1)


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def load_tokenizer_for(cfg: SupervisedConfig):
    """``--pretrain``'s tokenizer (pad := eos when it has none) with ``--tokenizer_chat_template`` applied."""
    from jaxrlhf.data.tokenizer import load_tokenizer

    if cfg.pretrain is None:
        raise ValueError("--pretrain is required: an HF model directory or a converted checkpoint")
    tokenizer = load_tokenizer(cfg.pretrain)
    if cfg.tokenizer_chat_template:
        tokenizer.chat_template = cfg.tokenizer_chat_template
    return tokenizer


def load_train_eval(cfg: SupervisedConfig):
    """(train, eval or None) ``datasets.Dataset`` records from the data flags.

    Train: ``--dataset`` blended with ``--dataset_probs`` (``data.sources.blend``), ``--max_samples`` per dataset
    and then in total. Eval: ``--eval_dataset`` (split ``--eval_split``), else a seeded ``--eval_holdout`` fraction
    carved out of the training records (disjoint from them), else None.
    """
    from jaxrlhf.data.sources import blend, holdout_split, parse_probs, split_specs

    if not cfg.dataset:
        raise ValueError("--dataset is required: a json/jsonl/parquet/arrow file, type@dir, a save_to_disk "
                         "directory or a hub name (comma-separate several)")
    train = blend(split_specs(cfg.dataset), parse_probs(cfg.dataset_probs, flag="--dataset_probs"), seed=cfg.seed,
                  max_samples=cfg.max_samples, split=cfg.dataset_split, flags=("--dataset", "--dataset_probs"))
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.select(range(cfg.max_samples))
    if cfg.eval_dataset:
        evaluation = blend(split_specs(cfg.eval_dataset), None, seed=cfg.seed, max_samples=cfg.max_samples,
                           split=cfg.eval_split, flags=("--eval_dataset", "--eval_dataset_probs"))
        return train, evaluation
    if cfg.eval_holdout > 0:
        return holdout_split(train, cfg.eval_holdout, seed=cfg.seed)
    return train, None


def tokenize_splits(cfg: SupervisedConfig, train_records, eval_records, build: Callable[[Any, str], Any], *,
                    vocab_size: int):
    """(train, eval or None): ``build(records, source)`` on each split (``source`` names the data in messages), its
    ``summary()`` logged and its ``max_token_id`` checked against the model's ``vocab_size`` (before any compute)."""
    from jaxrlhf.data.preference import check_vocab

    holdout = f"--eval_holdout {cfg.eval_holdout}"

    def one(records, source: str, what: str):
        ds = build(records, source)
        print(f"[data] {what}: {ds.summary()}", file=sys.stderr)
        check_vocab(ds, vocab_size, f"--pretrain {cfg.pretrain}")
        return ds

    if eval_records is None:
        return one(train_records, cfg.dataset, "train"), None
    if cfg.eval_dataset:
        return one(train_records, cfg.dataset, "train"), one(eval_records, cfg.eval_dataset, "eval")
    return (one(train_records, f"{cfg.dataset} (train part, {holdout})", "train"),
            one(eval_records, f"{cfg.dataset} (eval part, {holdout})", "eval"))


def reference_path(ref_pretrain: str | None, pretrain: str) -> str:
    """``--ref_pretrain`` (default: ``--pretrain``, the initial policy), checked to share the policy's vocabulary."""
    from jaxrlhf.models import ModelConfig

    path = ref_pretrain or pretrain
    ref_vocab, vocab = ModelConfig.from_dir(path).vocab_size, ModelConfig.from_dir(pretrain).vocab_size
    if ref_vocab != vocab:
        raise ValueError(f"--ref_pretrain {path} has vocab_size {ref_vocab}, --pretrain {pretrain} has {vocab}: the "
                         "reference must share the policy's tokenizer")
    return path


def chunked_prepare(forward, params, *, keys: tuple[str, ...], names: tuple[str, ...], rows_per_call: int):
    """``prepare(batch) -> batch`` adding ``names[i]`` [n] = output i of the jitted ``forward(params, rows)``, run on
    the ``keys`` of the batch in chunks of ``rows_per_call`` rows (a frozen reference's log-probs for DPO / KTO)."""
    def prepare(b: dict) -> dict:
        n = len(b[keys[0]])
        outs = [forward(params, {k: b[k][a:a + rows_per_call] for k in keys}) for a in range(0, n, rows_per_call)]
        return {**b, **{name: np.concatenate([np.asarray(o[i]) for o in outs]) for i, name in enumerate(names)}}

    return prepare


def frozen_reference(cfg: SupervisedConfig, mesh, path: str, fn: Callable[[Any, dict], tuple], *,
                     keys: tuple[str, ...], names: tuple[str, ...]):
    """The ``prepare`` hook of a frozen reference model: ``path`` loaded on ``mesh`` (a separate copy: the policy's
    buffers are donated by the train step; with ``--bf16`` stored in bf16, exactly the values the policy's fp32
    masters are cast to for compute at step 0) and ``fn(model, rows)`` jitted without gradient, in chunks of
    ``--micro_train_batch_size`` x dp rows (``chunked_prepare``)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.train.steps import make_forward

    ref = from_pretrained(path, mesh=mesh, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32, head="lm")
    graphdef, state = nnx.split(ref)
    params = state.to_pure_dict()
    del ref, state
    return chunked_prepare(make_forward(graphdef, fn, params=params, mesh=mesh), params, keys=keys, names=names,
                           rows_per_call=cfg.micro_train_batch_size * data_parallel_size(mesh))


def load_model(cfg: SupervisedConfig, mesh, *, head: str = "lm", path: str | None = None):
    """``--pretrain`` (or ``path``) as an fp32 ``Decoder`` sharded on ``mesh``; ``head="score"`` on a causal LM adds
    a fresh value head seeded by ``--seed``; ``--gradient_checkpointing`` turns on layer remat."""
    import jax.numpy as jnp

    from jaxrlhf.models import from_pretrained

    return from_pretrained(path or cfg.pretrain, mesh=mesh, dtype=jnp.float32, head=head,
                           remat=cfg.gradient_checkpointing, seed=cfg.seed)


def check_batch_arithmetic(cfg: SupervisedConfig, dp: int, num_train: int, num_eval: int | None) -> None:
    """Batch flags must fit the mesh and the data; messages name the flags and the numbers."""
    micro = cfg.micro_train_batch_size * dp
    if cfg.train_batch_size % micro:
        raise ValueError(
            f"--train_batch_size {cfg.train_batch_size} must be a multiple of --micro_train_batch_size x "
            f"data-parallel size = {cfg.micro_train_batch_size} x {dp} = {micro} (dp = data x fsdp of --mesh "
            f"{cfg.mesh})")
    rows = "packed rows" if cfg.packing_samples else "samples"
    if num_train < cfg.train_batch_size:
        raise ValueError(f"the training set has {num_train} {rows}, fewer than one --train_batch_size "
                         f"{cfg.train_batch_size}: lower --train_batch_size or add data")
    if num_eval is not None and num_eval < dp:
        raise ValueError(f"the eval set has {num_eval} {rows}, fewer than the data-parallel size {dp}: "
                         "raise --eval_holdout, use a larger --eval_dataset, or drop evaluation")


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: logger, HF export (helpers another trainer may share)
# ---------------------------------------------------------------------------------------------------------------------


def make_logger(cfg, log_dir: str, *, total_steps: int, progress_keys: tuple[str, ...]):
    """``MetricsLogger`` from the common logging flags (``--use_wandb`` 'false'/None means off)."""
    from jaxrlhf.train.metrics import MetricsLogger

    use_wandb = False if cfg.use_wandb in (None, "false", "False") else cfg.use_wandb
    return MetricsLogger(log_dir, use_tensorboard=cfg.use_tensorboard, use_wandb=use_wandb,
                         wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                         config=config_to_dict(cfg), total_steps=total_steps, progress_keys=progress_keys)


WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json")


def export_into(params, model_cfg, save_path: str, *, head: str, aux_from: str | None,
                extra_config: dict | None = None) -> str | None:
    """Write ``params`` as an HF directory INTO ``save_path``, keeping whatever else lives there (logs, checkpoints).

    Call it on EVERY process: a parameter sharded across hosts is all-gathered tensor by tensor (a collective); only
    process 0 writes (and returns ``save_path``; the others return None).

    The model is first written completely to a temporary directory inside ``save_path`` (``converters.hf.export_hf``),
    then each file is renamed into place (weights first, ``config.json`` last); weight files of an earlier export
    that the new one does not have are removed, so the directory never mixes two exports' shards.
    """
    import jax

    from converters.hf import export_hf, hf_tensors

    if jax.process_index() != 0:  # multi-host: join process 0's per-tensor gathers (a collective), write nothing
        for _ in hf_tensors(params, model_cfg):  # export_hf gathers in this same (tree) order
            pass
        return None
    os.makedirs(save_path, exist_ok=True)
    tmp = os.path.join(save_path, f".export-{os.getpid()}")
    export_hf(params, model_cfg, tmp, head=head, aux_from=aux_from, extra_config=extra_config, overwrite=True)
    new = set(os.listdir(tmp))
    for pattern in WEIGHT_FILES:
        for old in glob.glob(os.path.join(save_path, pattern)):
            if os.path.basename(old) not in new:
                os.remove(old)
    for name in sorted(new, key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(save_path, name))
    shutil.rmtree(tmp, ignore_errors=True)
    return save_path


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def fit(cfg: SupervisedConfig, *, mesh, model, loss_fn: LossFn, train_data: BatchSource,
        eval_data: BatchSource | None = None, name: str = "sft", head: str = "lm",
        prepare: Callable[[dict], dict] | None = None,
        extra_config: Callable[[Any], dict] | None = None,
        plot_keys: tuple[str, ...] = ("loss", "eval/loss", "lr"),
        progress_keys: tuple[str, ...] = ("loss", "step_time")) -> dict:
    """Train ``model`` (an nnx ``Decoder`` on ``mesh``; consumed: its buffers are donated) on ``train_data``.

    Warm-up + cosine (or constant) schedule over ``max_epochs x epoch`` steps (or ``--max_steps``), one jitted step
    per optimizer update (``steps.make_train_step``: micro-batch scan, gradient sum, AdamW), evaluation every
    ``--eval_steps`` and at the end, Orbax checkpoints every ``--save_steps`` and at the end, metrics every
    ``--logging_steps``, then the HF export and the plot. A non-finite training loss stops the run with a
    FloatingPointError; the last good checkpoint is kept.

    Returns ``{"metrics": last train metrics, "eval": last eval metrics, "log": metrics.jsonl, "steps": total steps,
    "params": final parameters, "save_path": HF directory, "plot": PNG}`` ("save_path"/"plot" only on process 0 when
    at least one step ran in this call).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.data.loader import BatchIterator
    from jaxrlhf.train.checkpoint import Checkpointer, abstract_like
    from jaxrlhf.train.metrics import plot_metrics
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.steps import init_optimizer, make_forward, make_train_step, stack_micro_batches

    dp = data_parallel_size(mesh)
    check_batch_arithmetic(cfg, dp, len(train_data), None if eval_data is None else len(eval_data))
    micro = cfg.micro_train_batch_size * dp
    compute_dtype = jnp.bfloat16 if cfg.bf16 else None

    batches = BatchIterator(len(train_data), cfg.train_batch_size, seed=cfg.seed)
    total_steps = cfg.max_epochs * batches.batches_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    eval_every = batches.batches_per_epoch if cfg.eval_steps == -1 else cfg.eval_steps

    # ---------------------------------------------------------------- model, optimizer, jitted step
    model_cfg = model.cfg
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    tx, schedule = make_optimizer(
        learning_rate=cfg.learning_rate, total_steps=total_steps, warmup_ratio=cfg.lr_warmup_ratio,
        min_lr_ratio=1.0 if cfg.lr_scheduler == "constant_with_warmup" else cfg.min_lr_ratio,
        weight_decay=cfg.l2, betas=tuple(cfg.adam_betas), max_norm=cfg.max_norm)
    opt_state = init_optimizer(tx, params, mesh)
    train_step = make_train_step(graphdef, loss_fn, tx, params=params, opt_state=opt_state, mesh=mesh,
                                 compute_dtype=compute_dtype)
    eval_step = make_forward(graphdef, loss_fn, params=params, mesh=mesh, compute_dtype=compute_dtype)

    # ---------------------------------------------------------------- resume
    ckpt = Checkpointer(cfg.ckpt_path, max_to_keep=cfg.max_ckpt_num)
    start_step = 0
    if not cfg.load_checkpoint and ckpt.latest_step() is not None:
        raise ValueError(f"--ckpt_path {cfg.ckpt_path} already holds checkpoints (steps {ckpt.all_steps()}): pass "
                         "--load_checkpoint to resume that run, or choose a new --ckpt_path")
    if cfg.load_checkpoint and ckpt.latest_step() is None:
        print(f"[ckpt] --load_checkpoint: no checkpoint in {cfg.ckpt_path} yet; starting from step 0", file=sys.stderr)
    if cfg.load_checkpoint and ckpt.latest_step() is not None:
        last = ckpt.latest_step()
        state, meta = ckpt.restore(last, abstract_like({"params": params, "opt": opt_state}))
        if meta.get("name") != name:
            raise ValueError(f"checkpoint {cfg.ckpt_path}/{last} was written by the {meta.get('name')!r} trainer, not "
                             f"{name!r}: point --ckpt_path at this trainer's own checkpoints")
        if meta.get("num_train") != len(train_data) or meta.get("train_batch_size") != cfg.train_batch_size:
            raise ValueError(
                f"checkpoint {cfg.ckpt_path}/{last} was written for {meta.get('num_train')} training rows and "
                f"--train_batch_size {meta.get('train_batch_size')}, this run has {len(train_data)} and "
                f"{cfg.train_batch_size}: resume with the same data and batch flags, or use a new --ckpt_path")
        params, opt_state = state["params"], state["opt"]
        start_step = int(meta["step"])
        batches.load_state(meta["data"])
        print(f"[ckpt] resumed from step {start_step} of {cfg.ckpt_path}", file=sys.stderr)

    os.makedirs(cfg.save_path, exist_ok=True)
    log_dir = os.path.join(cfg.save_path, "logs")
    logger = make_logger(cfg, log_dir, total_steps=total_steps, progress_keys=progress_keys)

    # ---------------------------------------------------------------- evaluation
    eval_rows = eval_totals = None
    if eval_data is not None:
        eval_rows = len(eval_data) // dp * dp  # every forward chunk must split over the dp ranks
        if eval_rows < len(eval_data):
            print(f"[eval] evaluating {eval_rows} of {len(eval_data)} eval rows (a multiple of the data-parallel "
                  f"size {dp})", file=sys.stderr)
        eval_chunks = [np.arange(a, min(a + micro, eval_rows)) for a in range(0, eval_rows, micro)]
        eval_totals = {}
        for idx in eval_chunks:  # normalisers are additive counts: their eval-set totals
            for k, v in eval_data.batch(idx).items():
                if np.ndim(v) == 0:
                    eval_totals[k] = eval_totals.get(k, 0) + v

    def evaluate(params) -> dict:
        sums: dict[str, float] = {}
        for idx in eval_chunks:
            b = {**eval_data.batch(idx), **eval_totals}
            if prepare is not None:
                b = prepare(b)
            loss, m = eval_step(params, b)
            for k, v in {"loss": loss, **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"eval/{k}": v for k, v in sums.items()}

    # ---------------------------------------------------------------- the loop
    def next_batch():
        """(data position before this batch, the prepared global batch); built while the device works."""
        position = batches.state()
        b = train_data.batch(batches.next_batch())
        return position, (prepare(b) if prepare is not None else b)

    def save(step: int, data_position: dict) -> None:
        ckpt.save(step, {"params": params, "opt": opt_state},
                  {"step": step, "data": data_position, "num_train": len(train_data),
                   "train_batch_size": cfg.train_batch_size, "seed": cfg.seed, "name": name})

    metrics: dict = {}
    eval_metrics: dict = {}
    pending = next_batch() if start_step < total_steps else None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        _, batch = pending
        params, opt_state, m = train_step(params, opt_state, stack_micro_batches(batch, micro))
        pending = next_batch() if step + 1 < total_steps else None  # host work overlaps the device step
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            ckpt.wait()
            logger.close()
            raise FloatingPointError(
                f"training loss is {m['loss']} at step {step + 1}: stopping. The last good checkpoint in "
                f"{cfg.ckpt_path} (step {ckpt.latest_step()}) is untouched; lower --learning_rate or check the "
                "data, then resume with --load_checkpoint")
        dt = time.perf_counter() - t0
        tokens = sum(float(np.sum(v)) for k, v in batch.items() if k.endswith("attention_mask"))
        rows = next(len(v) for v in batch.values() if np.ndim(v) > 0)
        metrics = {**m, "lr": float(schedule(step)), "epoch": (step + 1) / batches.batches_per_epoch,
                   "step_time": dt, "samples_per_s": rows / dt, **({"tokens_per_s": tokens / dt} if tokens else {})}
        done = step + 1
        evaluated = eval_data is not None and (done % eval_every == 0 or done == total_steps)
        if evaluated:
            eval_metrics = evaluate(params)
            metrics.update(eval_metrics)
        if done % cfg.logging_steps == 0 or done == total_steps or evaluated:
            logger.log(done, metrics)
        if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == total_steps:
            save(done, pending[0] if pending is not None else batches.state())
    ckpt.wait()
    ckpt.close()
    logger.close()

    # ---------------------------------------------------------------- outputs
    out = {"metrics": metrics, "eval": eval_metrics, "log": os.path.join(log_dir, "metrics.jsonl"),
           "steps": total_steps, "params": params}
    if start_step < total_steps:
        # Every process: extra_config may run jitted forwards on the mesh and the export gathers each sharded
        # tensor (collectives); only process 0 writes files.
        extra = extra_config(params) if extra_config is not None else None
        saved = export_into(params, model_cfg, cfg.save_path, head=head, aux_from=cfg.pretrain, extra_config=extra)
        if jax.process_index() == 0:
            out["save_path"] = saved
            out["plot"] = os.path.join(cfg.save_path, f"{name}_metrics.png")
            plot_metrics(out["log"], list(plot_keys), out["plot"])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def run_cli(config_cls: type, main: Callable[[Any], dict], argv: list[str] | None = None, *, prog: str) -> int:
    """Parse flags (+ ``--config`` YAML) into ``config_cls``, run ``main``; bad input -> ``error: ...`` and exit 2."""
    cfg = parse_config(config_cls, argv, prog=prog)
    try:
        if cfg.dry_run:
            if cfg.pretrain is None:
                raise ValueError("--dry_run needs --pretrain (a model directory; config.json alone is enough)")
            dry_run(cfg)
            return 0
        out = main(cfg)
    except (ValueError, KeyError, OSError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:  # the metrics log and outputs are process 0's (maybe on its own disk)
        return 0
    from jaxrlhf.train.metrics import read_metrics

    logged = [r for r in read_metrics(out["log"]) if "loss" in r]
    if logged:
        first, last = logged[0], logged[-1]
        print(f"\ndone: {out['steps']} steps; training loss {first['loss']:.4f} (step {first['step']}) -> "
              f"{last['loss']:.4f} (step {last['step']})")
    for k, v in out.get("eval", {}).items():
        print(f"  {k}: {v:.4f}")
    print(f"  metrics: {out['log']}")
    for k in ("plot", "save_path"):
        if k in out:
            print(f"  {k}: {out[k]}")
    return 0
