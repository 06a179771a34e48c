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

Outputs: the HF model in ``--save_path``, written as a whole and swapped in atomically (converters/atomic.py: logs,
checkpoints and anything else already there are carried over; OpenRLHF's default ``--ckpt_path`` lives inside it),
``--save_path/logs/metrics.jsonl`` (+ TensorBoard/W&B; fresh for a new run, continued by a resumed one), a PNG plot
``--save_path/<name>_metrics.png``, and Orbax checkpoints in ``--ckpt_path`` (parameters, optimizer state, the data
position and the run's fingerprint: ``--load_checkpoint`` resumes exactly where the run stopped, train/run.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Protocol

import numpy as np

from jaxrlhf.cli import arg, error_text, parse_config
from jaxrlhf.train.lora import LoraFlags
from jaxrlhf.train.run import RunFlags


@dataclass
class SupervisedConfig(RunFlags, LoraFlags):  # + the flags every trainer shares (train/run.py), LoRA (train/lora.py)
    """Flags of the offline trainers (OpenRLHF's spelling) beyond the shared ones."""

    # ---- data
    dataset: Optional[str] = arg(None, "training dataset(s), comma-separated: files, type@dir, save_to_disk dirs, "
                                       "hub names")
    dataset_probs: Optional[str] = arg(None, "mixing probabilities of --dataset, comma-separated (default: concat)")
    dataset_split: str = arg("train", "split of --dataset")
    eval_dataset: Optional[str] = arg(None, "evaluation dataset(s), comma-separated (default: --eval_holdout)")
    eval_split: str = arg("train", "split of --eval_dataset")
    eval_holdout: float = arg(0.0, "without --eval_dataset: fraction of --dataset held out for evaluation "
                                   "(0: no evaluation)")
    max_len: int = arg(2048, "tokens per sample (longer samples are truncated or dropped, with a count logged)")
    packing_samples: bool = arg(False, "pack several samples per row of --max_len tokens (segment-masked attention)")
    tokenizer_chat_template: Optional[str] = arg(None, "Jinja chat template replacing the tokenizer's own")
    # ---- schedule and evaluation
    learning_rate: float = arg(5e-6, "peak learning rate")
    lr_scheduler: Literal["cosine_with_min_lr", "constant_with_warmup"] = arg(
        "cosine_with_min_lr", "after warm-up: cosine decay to --min_lr_ratio x peak, or constant")
    eval_steps: int = arg(-1, "evaluate every N steps (-1: at the end of every epoch)")

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
        self.check_lora()
        if not 0.0 <= self.eval_holdout < 1.0:
            raise ValueError(f"--eval_holdout must be in [0, 1), got {self.eval_holdout}")
        if self.max_len < 2:
            raise ValueError(f"--max_len must be >= 2, got {self.max_len}")
        if self.eval_steps == 0 or self.eval_steps < -1:
            raise ValueError(f"--eval_steps must be a positive number of steps or -1, got {self.eval_steps}")


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
    from jaxrlhf.train.run import start_meshes

    return start_meshes(cfg)[1]["main"]


def dry_run(cfg: SupervisedConfig) -> dict:
    """``--dry_run``: print the mesh, batch arithmetic and per-device memory plan; refuse what cannot fit."""
    from jaxrlhf.plan import dry_run_supervised

    from jaxrlhf.models.lora import parse_targets

    rows = cfg.rows_per_sample()
    rank, targets = cfg.lora_rank, parse_targets(cfg.target_modules)
    if cfg.lora_path:
        from converters.peft import read_spec

        spec = read_spec(cfg.lora_path)
        rank, targets = spec.rank, spec.targets
    return dry_run_supervised(model_path=cfg.pretrain, mesh=cfg.mesh, max_len=cfg.max_len, bf16=cfg.bf16,
                              micro_train_batch_size=cfg.micro_train_batch_size * rows,
                              train_batch_size=cfg.train_batch_size * rows,
                              gradient_checkpointing=cfg.gradient_checkpointing,
                              device_memory_gb=cfg.device_memory_gb, head=cfg.trained_head(),
                              ref_path=cfg.reference(), processes=cfg.num_processes or 1, lora_rank=rank,
                              lora_targets=targets, load_in_4bit=cfg.load_in_4bit,
                              double_quant=cfg.bnb_4bit_use_double_quant)


def load_tokenizer_for(cfg: SupervisedConfig):
    """``--pretrain``'s tokenizer (pad := eos when it has none) with ``--tokenizer_chat_template`` applied."""
    from jaxrlhf.data.tokenizer import load_tokenizer

    from jaxrlhf.models import ModelConfig

    if cfg.pretrain is None:
        raise ValueError("--pretrain is required: an HF model directory or a converted checkpoint")
    if os.path.isdir(cfg.pretrain):
        ModelConfig.from_dir(cfg.pretrain)  # a broken config.json is named as such, not as a tokenizer failure
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
    from sharding import batch_ways

    ref = from_pretrained(path, mesh=mesh, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32, head="lm")
    graphdef, state = nnx.split(ref)
    params = state.to_pure_dict()
    del ref, state
    return chunked_prepare(make_forward(graphdef, fn, params=params, mesh=mesh), params, keys=keys, names=names,
                           rows_per_call=cfg.micro_train_batch_size * batch_ways(mesh))


def load_model(cfg: SupervisedConfig, mesh, *, head: str = "lm", path: str | None = None):
    """``--pretrain`` (or ``path``) as an fp32 ``Decoder`` sharded on ``mesh``; ``head="score"`` on a causal LM adds
    a fresh value head seeded by ``--seed``; ``--gradient_checkpointing`` turns on layer remat; ``--lora_rank`` /
    ``--lora_path`` attach LoRA adapters (then only they, and a score head, are trained)."""
    import jax.numpy as jnp

    from jaxrlhf.models import from_pretrained

    model = from_pretrained(path or cfg.pretrain, mesh=mesh, dtype=jnp.float32, head=head,
                            remat=cfg.gradient_checkpointing, seed=cfg.seed)
    return cfg.attach_lora(model, mesh=mesh)


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
    ``--logging_steps``, then the HF export (also when resumed at the last step) and the plot. Resuming follows
    ``train/run.py`` (refused for another trainer's or another run's checkpoints). A non-finite training loss stops
    the run with a FloatingPointError; the last good checkpoint is kept.

    Returns ``{"metrics": last train metrics, "eval": last eval metrics, "log": metrics.jsonl, "steps": total steps,
    "params": final parameters, "save_path": HF directory, "plot": PNG}`` ("save_path"/"plot" only on process 0).
    """
    import contextlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.data.loader import BatchIterator
    from jaxrlhf.train.checkpoint import Checkpointer
    from jaxrlhf.train.lora import trainable_with_lora
    from jaxrlhf.train.optim import make_optimizer
    from jaxrlhf.train.run import open_logger, prepare_outputs, stop_if_not_finite, total_steps_of
    from jaxrlhf.train.steps import init_optimizer, make_forward, make_train_step, stack_micro_batches
    from sharding import batch_ways

    dp = batch_ways(mesh)
    check_batch_arithmetic(cfg, dp, len(train_data), None if eval_data is None else len(eval_data))
    micro = cfg.micro_train_batch_size * dp
    compute_dtype = jnp.bfloat16 if cfg.bf16 else None
    batches = BatchIterator(len(train_data), cfg.train_batch_size, seed=cfg.seed)
    total_steps = total_steps_of(batches.batches_per_epoch, cfg.max_epochs, cfg.max_steps)
    eval_every = batches.batches_per_epoch if cfg.eval_steps == -1 else cfg.eval_steps

    model_cfg, lora = model.cfg, model.lora
    trainable = None if lora is None else trainable_with_lora(head)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    tx, schedule = make_optimizer(
        learning_rate=cfg.learning_rate, total_steps=total_steps, warmup_ratio=cfg.lr_warmup_ratio,
        min_lr_ratio=1.0 if cfg.lr_scheduler == "constant_with_warmup" else cfg.min_lr_ratio,
        weight_decay=cfg.l2, betas=tuple(cfg.adam_betas), max_norm=cfg.max_norm)
    opt_state = init_optimizer(tx, params, mesh, trainable)
    train_step = make_train_step(graphdef, loss_fn, tx, params=params, opt_state=opt_state, mesh=mesh,
                                 compute_dtype=compute_dtype, trainable=trainable, aux_loss_coef=cfg.aux_loss_coef,
                                 router_z_loss_coef=cfg.router_z_loss_coef)
    evaluate = _evaluator(eval_data, make_forward(graphdef, loss_fn, params=params, mesh=mesh,
                                                  compute_dtype=compute_dtype), prepare, dp=dp, micro=micro)

    with contextlib.ExitStack() as run:
        prepare_outputs(cfg.save_path, ckpt_path=cfg.ckpt_path)
        ckpt = run.enter_context(Checkpointer(cfg.ckpt_path, max_to_keep=cfg.max_ckpt_num))
        fingerprint = run_fingerprint(cfg, name, train_data)
        resumed, (params, opt_state) = _resume(cfg, ckpt, fingerprint, batches, (params, opt_state))
        start_step = resumed or 0
        log_dir = os.path.join(cfg.save_path, "logs")
        logger = run.enter_context(open_logger(cfg, log_dir, total_steps=total_steps, progress_keys=progress_keys,
                                               resumed=resumed is not None))

        def next_batch():
            """(data position before this batch, the prepared global batch); built while the device works."""
            position = batches.state()
            b = train_data.batch(batches.next_batch())
            return position, (prepare(b) if prepare is not None else b)

        metrics, eval_metrics = {}, {}
        pending = next_batch() if start_step < total_steps else None
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            _, batch = pending
            params, opt_state, m = train_step(params, opt_state, stack_micro_batches(batch, micro),
                                              cfg.dropout_rng(step))
            pending = next_batch() if step + 1 < total_steps else None  # host work overlaps the device step
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            stop_if_not_finite({"training loss": m["loss"]}, step=step + 1, ckpt=ckpt, ckpt_path=cfg.ckpt_path,
                               hint="lower --learning_rate or check the data")
            done = step + 1
            metrics = {**m, "lr": float(schedule(step)), "epoch": done / batches.batches_per_epoch,
                       **_throughput(batch, time.perf_counter() - t0)}
            evaluated = evaluate is not None and (done % eval_every == 0 or done == total_steps)
            if evaluated:
                eval_metrics = evaluate(params)
                metrics.update(eval_metrics)
            if done % cfg.logging_steps == 0 or done == total_steps or evaluated:
                logger.log(done, metrics)
            if (cfg.save_steps > 0 and done % cfg.save_steps == 0) or done == total_steps:
                ckpt.save(done, {"params": params, "opt": opt_state},
                          {"step": done, "data": pending[0] if pending is not None else batches.state(),
                           "fingerprint": fingerprint})

    out = {"metrics": metrics, "eval": eval_metrics, "log": os.path.join(log_dir, "metrics.jsonl"),
           "steps": total_steps, "params": params}
    return {**out, **_export(cfg, params, model_cfg, head=head, extra_config=extra_config, lora=lora,
                             plot=(out["log"], f"{name}_metrics.png", plot_keys))}


def _export(cfg: SupervisedConfig, params, model_cfg, *, head: str, extra_config, plot: tuple, lora=None) -> dict:
    """The final HF model in ``--save_path`` (also when resumed at the last step) and the plot. With LoRA (``lora``
    a ``LoraSpec``) the adapters are merged into the exported weights, and ``--lora_save_adapter`` writes them as a
    PEFT directory ``--save_path/lora_adapter`` as well.

    Every process: ``extra_config`` may run jitted forwards on the mesh and the export gathers each sharded tensor
    (collectives); only process 0 writes files (and gets ``{"save_path", "plot"}`` back)."""
    import jax

    from converters.hf import export_hf
    from converters.peft import save_adapter
    from jaxrlhf.train.lora import plain_params
    from jaxrlhf.train.metrics import plot_metrics

    extra = extra_config(params) if extra_config is not None else None
    saved = export_hf(plain_params(params, lora), model_cfg, cfg.save_path, head=head,
                      aux_from=cfg.pretrain, extra_config=extra, overwrite=True)
    adapter = {}
    if lora is not None and cfg.lora_save_adapter:
        adapter_dir = save_adapter(params, model_cfg, lora, os.path.join(cfg.save_path, "lora_adapter"),
                                   base_model=cfg.pretrain, dropout=cfg.lora_dropout)
        adapter = {"lora_adapter": adapter_dir}
    if jax.process_index() != 0:
        return {}
    log, png, keys = plot
    plot_metrics(log, list(keys), os.path.join(cfg.save_path, png))
    return {"save_path": saved, "plot": os.path.join(cfg.save_path, png), **adapter}


def _resume(cfg: SupervisedConfig, ckpt, fingerprint: dict, batches, state: tuple):
    """``(resumed step or None, (params, opt_state))``: restored from ``--ckpt_path`` when resuming (train/run.py
    refuses another trainer's or another run's checkpoints); ``batches`` moved to the saved data position."""
    from jaxrlhf.train.checkpoint import abstract_like
    from jaxrlhf.train.run import resume_step

    step = resume_step(ckpt, ckpt_path=cfg.ckpt_path, load_checkpoint=cfg.load_checkpoint, fingerprint=fingerprint,
                       allow_config_change=cfg.allow_config_change)
    if step is None:
        return None, state
    restored, meta = ckpt.restore(step, abstract_like({"params": state[0], "opt": state[1]}))
    batches.load_state(meta["data"])
    print(f"[ckpt] resumed from step {step} of {cfg.ckpt_path}", file=sys.stderr)
    return step, (restored["params"], restored["opt"])


def run_fingerprint(cfg: SupervisedConfig, name: str, train_data: BatchSource) -> dict:
    """What a resumed run must share with the checkpoint it resumes (train/run.py ``resume_step``)."""
    from jaxrlhf.train.run import data_fingerprint

    first = train_data.batch(np.arange(min(16, len(train_data))))
    rows = [first[k] for k in sorted(first) if np.ndim(first[k]) > 0]
    lora = cfg.lora_fingerprint()  # the trained parameters' layout: LoRA or not, which adapters, a 4-bit base
    return {"trainer": name, "--seed": cfg.seed, "--train_batch_size": cfg.train_batch_size,
            "--dataset": data_fingerprint(rows, len(train_data)), "LoRA": lora}


def _throughput(batch: dict, seconds: float) -> dict:
    """step_time, samples/s and (real) tokens/s of one step's batch."""
    tokens = sum(float(np.sum(v)) for k, v in batch.items() if k.endswith("attention_mask"))
    rows = next(len(v) for v in batch.values() if np.ndim(v) > 0)
    return {"step_time": seconds, "samples_per_s": rows / seconds, **({"tokens_per_s": tokens / seconds} if tokens
                                                                       else {})}


def _evaluator(eval_data: BatchSource | None, eval_step, prepare, *, dp: int, micro: int):
    """``evaluate(params) -> {"eval/<metric>": value}`` over the eval rows (a multiple of dp), exact set means: each
    chunk's normalisers are replaced by their eval-set totals (module docstring). None without eval data."""
    if eval_data is None:
        return None
    eval_rows = len(eval_data) // dp * dp  # every forward chunk must split over the dp ranks
    if eval_rows < len(eval_data):
        print(f"[eval] evaluating {eval_rows} of {len(eval_data)} eval rows (a multiple of the data-parallel "
              f"size {dp})", file=sys.stderr)
    chunks = [np.arange(a, min(a + micro, eval_rows)) for a in range(0, eval_rows, micro)]
    totals: dict = {}
    for idx in chunks:  # normalisers are additive counts: their eval-set totals
        for k, v in eval_data.batch(idx).items():
            if np.ndim(v) == 0:
                totals[k] = totals.get(k, 0) + v

    def evaluate(params) -> dict:
        sums: dict[str, float] = {}
        for idx in chunks:
            b = {**eval_data.batch(idx), **totals}
            if prepare is not None:
                b = prepare(b)
            loss, m = eval_step(params, b)
            for k, v in {"loss": loss, **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"eval/{k}": v for k, v in sums.items()}

    return evaluate


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
        print(f"error: {error_text(e)}", file=sys.stderr)
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
