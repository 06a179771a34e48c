"""What every trainer's run shares (PPO and the offline trainers alike): the common flags, mesh start-up,
resume-or-refuse, the metrics log, the non-finite stop and where outputs go.

A run, whatever it trains::

    launch, meshes = start_meshes(cfg, roles)            # before jax touches a device (fakes CPU devices, multi-host)
    prepare_outputs(cfg.save_path)                       # finish / clean up an export a crash interrupted
    ckpt = Checkpointer(cfg.ckpt_path, ...)
    step = resume_step(ckpt, cfg, fingerprint)           # None: fresh run; refuses foreign or mismatched checkpoints
    logger = open_logger(cfg, log_dir, ..., resumed=step is not None)
    for ...:  train; stop_if_not_finite(losses, ...); log; ckpt.save(..., {**state_meta, "fingerprint": ...})
    export_hf(params, ..., overwrite=True)               # every process; atomic directory swap (converters/atomic.py)

Resume safety: a non-empty ``--ckpt_path`` is only used with ``--load_checkpoint``; the checkpoint's ``meta``
records a *fingerprint* of the run (the trainer, the seed, the batch arithmetic, the data's row count and a hash of
its first rows' tokens, keyed by the flag a user would change) and a resumed run must match it flag for flag, unless
``--allow_config_change`` says the change is deliberate. The mesh and the process count are not in it: a checkpoint
restores onto any mesh (train/checkpoint.py).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from jaxrlhf.cli import arg, config_to_dict
from jaxrlhf.plan import PlanFlags
from sharding.distributed import DistributedConfig

FINGERPRINT = "fingerprint"  # the key of the fingerprint in a checkpoint's meta


@dataclass
class RunFlags(DistributedConfig, PlanFlags):  # + multi-host flags (sharding/distributed.py), --dry_run (plan.py)
    """Flags every trainer takes (OpenRLHF's spelling). A trainer's config inherits them and redeclares a field only
    to change its default."""

    # ---- mesh and randomness
    mesh: str = arg("4x2", "device mesh: FSDPxTENSOR (4x2), DATAxFSDPxTENSOR (2x2x2), DATAxFSDPxEXPERTxTENSOR "
                              "(1x2x2x2; MoE experts split over expert) or data=1,fsdp=2,expert=2,tensor=2")
    seed: int = arg(42, "seed of every PRNG key and of the data order (shuffling, mixing, sampling, head init)")
    # ---- model and data
    pretrain: Optional[str] = arg(None, "HF model directory or converted checkpoint to start from")
    max_samples: Optional[int] = arg(None, "use at most this many samples (per dataset, then in total)")
    input_template: Optional[str] = arg(None, "template with {} for the input, e.g. 'User: {}\\nAssistant: '")
    apply_chat_template: bool = arg(False, "format inputs with the tokenizer's chat template")
    # ---- batches and optimisation
    max_epochs: int = arg(1, "passes over each batch of data")
    max_steps: Optional[int] = arg(None, "stop after this many steps")
    train_batch_size: int = arg(128, "samples per optimizer update (global)")
    micro_train_batch_size: int = arg(8, "samples per data-parallel rank per micro-batch (gradient accumulation)")
    lr_warmup_ratio: float = arg(0.03, "fraction of the updates spent in linear warm-up")
    min_lr_ratio: float = arg(0.1, "cosine decay floor as a fraction of the peak learning rate")
    adam_betas: tuple[float, ...] = arg((0.9, 0.95), "AdamW betas")
    l2: float = arg(0.0, "AdamW weight decay (matrices only)")
    max_norm: float = arg(1.0, "gradient clipping by global norm (0: off)")
    bf16: bool = arg(False, "bf16 compute (fp32 master weights and optimizer state)")
    gradient_checkpointing: bool = arg(False, "recompute layer activations in the backward pass")
    aux_loss_coef: float = arg(0.0, "mixture-of-experts models: weight of the load-balancing loss added to every "
                                    "trained model's loss (transformers' load_balancing_loss_func; e.g. 0.001)")
    router_z_loss_coef: float = arg(0.0, "mixture-of-experts models: weight of the router z-loss (ST-MoE)")
    # ---- checkpoints, logs, outputs
    save_path: str = arg("./ckpt", "where the final HF model(s), logs and plot are written")
    ckpt_path: str = arg("./ckpt/checkpoints", "training checkpoints (Orbax)")
    save_steps: int = arg(-1, "checkpoint every N steps (-1: only at the end)")
    max_ckpt_num: int = arg(3, "checkpoints kept")
    load_checkpoint: bool = arg(False, "resume from the latest checkpoint in --ckpt_path")
    allow_config_change: bool = arg(False, "with --load_checkpoint: resume even where the checkpoint was written "
                                           "with another seed, batch flags or data (a deliberate change)")
    logging_steps: int = arg(1, "log every N steps")
    use_tensorboard: Optional[str] = arg(None, "TensorBoard log directory")
    use_wandb: Optional[str] = arg(None, "W&B: 'true' or an API key ('false' or none: off)")
    wandb_project: str = arg("jaxrlhf", "W&B project")
    wandb_run_name: Optional[str] = arg(None, "W&B run name")

    def __post_init__(self):
        super().__post_init__()
        if len(self.adam_betas) != 2:
            raise ValueError(f"--adam_betas takes two numbers (beta1,beta2), got {self.adam_betas}")
        at_least_one(self, "train_batch_size", "micro_train_batch_size", "max_epochs", "logging_steps", "max_ckpt_num")
        for flag in ("aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")
        if self.save_steps == 0 or self.save_steps < -1:
            raise ValueError(f"--save_steps must be a positive number of steps or -1, got {self.save_steps}")
        if self.input_template is not None and "{}" not in self.input_template:
            raise ValueError(f"--input_template {self.input_template!r} has no '{{}}' placeholder for the input")


def at_least_one(cfg, *flags: str) -> None:
    """Refuse a size flag below 1, naming it."""
    for flag in flags:
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(cfg, flag)}")


# ---------------------------------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------------------------------


def start_meshes(cfg: RunFlags, roles: Mapping[str, Optional[str]] | None = None):
    """``(launch, {"main": Mesh, role: Mesh})``: join the multi-host job (or fake ``--mesh`` CPU devices), then build
    ``--mesh`` and each role's own mesh (``--ref_mesh``...), each checked against the hosts. Call before anything
    touches a jax device."""
    from sharding import distributed, make_mesh, placement

    roles = {k: v for k, v in (roles or {}).items() if v}
    launch = distributed.start(cfg, lambda n: placement.plan_devices(cfg.mesh, roles, n)["per_host"])
    meshes = placement.make_meshes(cfg.mesh, roles) if roles else {"main": make_mesh(cfg.mesh)}
    for name, m in meshes.items():
        distributed.check_mesh_hosts(m, "--mesh" if name == "main" else f"--{name}_mesh")
    return launch, meshes


def prepare_outputs(save_path: str, *exports: str, ckpt_path: str | None = None) -> None:
    """Before a run writes anything: refuse a ``save_path`` (or ``ckpt_path``) that cannot be a writable directory,
    then finish or clean up what an export killed mid-way left behind in ``save_path`` and its model
    sub-directories ``exports`` (converters/atomic.py; process 0 only, errors reach every process)."""
    from converters.atomic import check_writable, recover
    from sharding.distributed import from_process0

    def run() -> np.int32:
        check_writable(os.path.abspath(save_path), "--save_path")
        if ckpt_path is not None:
            check_writable(os.path.abspath(ckpt_path), "--ckpt_path")
        for path in (save_path, *(os.path.join(save_path, e) for e in exports)):
            recover(path)
        return np.int32(0)

    from_process0(run, ((), np.int32))


# ---------------------------------------------------------------------------------------------------------------------
# Resume or refuse
# ---------------------------------------------------------------------------------------------------------------------


def data_fingerprint(rows: Iterable[Any], count: int) -> str:
    """``"N rows, sha256 H"``: the row count and a hash of the given first rows (token lists or arrays)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(np.ascontiguousarray(np.asarray(row)).tobytes())
        h.update(b"|")
    return f"{count} rows, sha256 {h.hexdigest()[:16]}"


def differences(saved: Mapping[str, Any] | None, want: Mapping[str, Any], *, then: str = "then",
                now: str = "now") -> list[str]:
    """``"KEY: <then> OLD, <now> NEW"`` for every key of ``want`` whose value differs in ``saved`` (a resumed run's
    recorded settings against this run's)."""
    saved = saved or {}
    return [f"{k}: {then} {saved.get(k)!r}, {now} {v!r}" for k, v in want.items() if saved.get(k) != v]


def resume_step(ckpt, *, ckpt_path: str, load_checkpoint: bool, fingerprint: Mapping[str, Any],
                allow_config_change: bool = False) -> int | None:
    """The checkpoint step to resume from, or None for a fresh run.

    ``fingerprint``: ``{"trainer": name, "--flag": value, ...}`` of this run (JSON-able values). Refused, with a
    message naming the fix: checkpoints present without ``load_checkpoint``; a checkpoint of another trainer; one
    whose fingerprint differs in a flag (unless ``allow_config_change``: then each difference is printed).
    """
    from jaxrlhf.train.checkpoint import to_jsonable

    last = ckpt.latest_step()
    if last is None:
        if load_checkpoint:
            print(f"[ckpt] --load_checkpoint: no checkpoint in {ckpt_path} yet; starting from step 0", file=sys.stderr)
        return None
    if not load_checkpoint:
        raise ValueError(f"--ckpt_path {ckpt_path} already holds checkpoints (steps {ckpt.all_steps()}): pass "
                         "--load_checkpoint to resume that run, or choose another --ckpt_path for a new one")
    where = f"checkpoint {ckpt_path}/{last}"
    saved = ckpt.read_meta(last).get(FINGERPRINT)
    want = to_jsonable(dict(fingerprint))
    if saved is None:
        if not allow_config_change:
            raise ValueError(f"{where} records no run fingerprint (written by an older jaxrlhf): pass "
                             "--allow_config_change to resume it anyway, or choose another --ckpt_path")
        return last
    if saved.get("trainer") != want.get("trainer"):
        raise ValueError(f"{where} was written by the {saved.get('trainer')!r} trainer, not {want.get('trainer')!r}: "
                         "point --ckpt_path at this trainer's own checkpoints")
    diffs = differences(saved, want, then="checkpoint", now="this run")
    if diffs and not allow_config_change:
        raise ValueError(f"{where} was written by a different run; " + "; ".join(diffs) + ". Resume with the same "
                         "flags, pass --allow_config_change if the change is deliberate, or choose another "
                         "--ckpt_path")
    for d in diffs:
        print(f"[ckpt] --allow_config_change: resuming despite {d}", file=sys.stderr)
    return last


# ---------------------------------------------------------------------------------------------------------------------
# Logs and the non-finite stop
# ---------------------------------------------------------------------------------------------------------------------


def wandb_setting(flag: str | None):
    """``--use_wandb``: None / 'false' (any case) -> off, 'true' -> the existing login, else an API key."""
    if flag is None or flag.strip().lower() in ("false", "0", "no", "off", "none", ""):
        return False
    return True if flag.strip().lower() == "true" else flag


def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with secrets (a set ``*_token`` field, a W&B API key in ``use_wandb``) replaced by ``"<hidden>"``:
    what goes to W&B."""
    def secret(k: str, v: Any) -> bool:
        return bool(v) and (k.endswith("_token") or (k == "use_wandb" and wandb_setting(v) not in (True, False)))

    return {k: "<hidden>" if secret(k, v) else v for k, v in config.items()}


def open_logger(cfg: RunFlags, log_dir: str, *, total_steps: int, progress_keys: tuple[str, ...], resumed: bool):
    """``MetricsLogger`` in ``log_dir`` from the logging flags. ``metrics.jsonl`` continues when the run resumes and
    starts fresh otherwise (an earlier run's file is kept as ``metrics.jsonl.prev``)."""
    from jaxrlhf.train.metrics import MetricsLogger

    return MetricsLogger(log_dir, use_tensorboard=cfg.use_tensorboard, use_wandb=wandb_setting(cfg.use_wandb),
                         wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                         config=without_secrets(config_to_dict(cfg)), total_steps=total_steps,
                         progress_keys=progress_keys, fresh=not resumed)


def stop_if_not_finite(values: Mapping[str, float], *, step: int, ckpt, ckpt_path: str, hint: str) -> None:
    """Raise FloatingPointError naming the first non-finite value and the last good checkpoint (left untouched).

    The caller's exit path closes the logger and the checkpointer (both are context managers of the run)."""
    for name, v in values.items():
        if not math.isfinite(v):
            ckpt.wait()
            raise FloatingPointError(
                f"{name} is {v} at step {step}: stopping. The last good checkpoint in {ckpt_path} (step "
                f"{ckpt.latest_step()}) is untouched; {hint}, then resume with --load_checkpoint")


def total_steps_of(batches_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Steps of a run: ``epochs`` passes of ``batches_per_epoch``, capped by ``--max_steps``."""
    total = epochs * batches_per_epoch
    return total if max_steps is None else min(total, max_steps)
