"""Pairwise reward model: ``python -m jaxrlhf.rm --mesh 4x2 --pretrain DIR --dataset PAIRS [flags]``.

Flags follow OpenRLHF's ``train_rm.py``; ``--config run.yaml`` takes the same keys. Data -> pairs
(``data/preference.py``: ``--prompt_key`` / ``--chosen_key`` / ``--rejected_key`` through ``--input_template`` or the
chat template, EOS kept, over-long pairs dropped or truncated with counts in the log) -> the shared offline loop
(``train/supervised.py``) -> an HF ``*ForSequenceClassification`` directory in ``--save_path``.

The model is ``--pretrain`` with a scalar ``score`` head (a fresh one, std 1/(D+1), when ``--pretrain`` is a causal
LM). A sequence's reward is the head's output at its last real token (the EOS), whatever the padding side. With
r_c, r_r the rewards of the chosen and rejected sequence of a pair and m its ``margin`` field (``--margin_loss``):

    sigmoid: loss = -log sigmoid(r_c - r_r - m)          logexp: loss = log(1 + exp(r_r - r_c))

averaged over the pairs of the step. Logged: loss, acc = mean [r_c > r_r], chosen_reward, reject_reward (train and
eval). After training, the mean and (unbiased) std of every chosen and rejected reward on the eval set (the training
set when there is none) go into the exported ``config.json`` as ``mean`` / ``std``, which PPO's
``--normalize_reward`` reads (jaxrlhf/rewards/model.py), as OpenRLHF does.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from jaxrlhf.cli import arg
from jaxrlhf.train.supervised import SupervisedConfig, fit, load_model, load_tokenizer_for, \
    load_train_eval, run_cli, setup_mesh, tokenize_splits

SCORE_KEYS = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")


@dataclass
class RMConfig(SupervisedConfig):
    prompt_key: Optional[str] = arg(None, "prompt field (None: the prompt is part of the chosen/rejected fields)")
    chosen_key: str = arg("chosen", "preferred response field (a string or a list of chat messages)")
    rejected_key: str = arg("rejected", "dispreferred response field")
    margin_loss: bool = arg(False, "subtract each pair's 'margin' field inside the sigmoid loss")
    loss: Literal["sigmoid", "logexp"] = arg("sigmoid", "pairwise loss: -log sigmoid(r_c - r_r [- margin]) or "
                                                        "log(1 + exp(r_r - r_c))")
    max_len: int = arg(512, "tokens per sequence (prompt + response; longer pairs are truncated or dropped)")
    learning_rate: float = arg(9e-6, "peak learning rate")
    ckpt_path: str = arg("./ckpt/checkpoints_rm", "training checkpoints (Orbax)")

    def rows_per_sample(self) -> int:
        return 2

    def trained_head(self) -> str:
        return "score"

    def __post_init__(self):
        super().__post_init__()
        if self.margin_loss and self.loss == "logexp":
            raise ValueError("--margin_loss needs --loss sigmoid (the logexp loss has no margin term)")
        if self.packing_samples:
            raise ValueError("--packing_samples is not supported by the reward model trainer yet: drop the flag")


# ---------------------------------------------------------------------------------------------------------------------
# Model -> rewards -> loss
# ---------------------------------------------------------------------------------------------------------------------


def pair_rewards(model, b):
    """Rewards ``([n], [n])`` of the chosen and rejected sequences: one forward over the 2n rows, each read at its
    last real token (``last_token_values``: left or right padding alike)."""
    import jax.numpy as jnp

    from jaxrlhf.models import last_token_values

    n = b["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([b["chosen_input_ids"], b["rejected_input_ids"]])
    mask = jnp.concatenate([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    rewards = last_token_values(model(ids, mask), mask)
    return rewards[:n], rewards[n:]


def make_rm_loss(kind: str = "sigmoid", margin_loss: bool = False):
    """``loss_fn(model, batch) -> (loss, metrics)`` of the module docstring, normalised by ``num_pairs`` (the pairs
    of the whole step) so micro-batch results sum to step means."""
    import jax.numpy as jnp

    from jaxrlhf import losses

    def rm_loss(model, b):
        chosen, rejected = pair_rewards(model, b)
        loss_b = losses.pairwise_rm_loss(chosen, rejected, b["margin"] if margin_loss else None, kind=kind)
        n = b["num_pairs"]
        return jnp.sum(loss_b) / n, {"acc": jnp.sum(chosen > rejected) / n, "chosen_reward": jnp.sum(chosen) / n,
                                     "reject_reward": jnp.sum(rejected) / n}

    return rm_loss


def reward_stats(score, params, data, *, rows_per_call: int, dp: int) -> dict[str, float]:
    """Mean and unbiased std (clamped at 1e-8, as OpenRLHF) of every chosen and rejected reward of ``data``.

    ``score(params, batch) -> (chosen, rejected)`` is the jitted ``pair_rewards``; chunks of ``rows_per_call`` pairs
    (the last one topped up to a multiple of ``dp`` with repeats, whose rewards are dropped).
    """
    rewards = []
    for a in range(0, len(data), rows_per_call):
        idx = np.arange(a, min(a + rows_per_call, len(data)))
        real = len(idx)
        idx = np.concatenate([idx, idx[:1].repeat(-real % dp)])
        b = data.batch(idx)
        chosen, rejected = score(params, {k: b[k] for k in SCORE_KEYS})
        rewards += [np.asarray(chosen)[:real], np.asarray(rejected)[:real]]
    r = np.concatenate(rewards).astype(np.float64)
    std = float(r.std(ddof=1)) if r.size > 1 else 1.0
    return {"mean": float(r.mean()), "std": max(std, 1e-8)}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: RMConfig) -> dict:
    """Train the reward model; returns ``fit``'s summary plus ``reward_mean`` / ``reward_std``."""
    mesh = setup_mesh(cfg)

    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.data.preference import PairedDataset
    from jaxrlhf.models import ModelConfig
    from jaxrlhf.train.steps import make_forward
    from sharding import batch_ways

    # ---------------------------------------------------------------- data (every check before any compute)
    tokenizer = load_tokenizer_for(cfg)
    model_cfg = ModelConfig.from_dir(cfg.pretrain)
    train_records, eval_records = load_train_eval(cfg)

    def pairs(records, source: str) -> PairedDataset:
        ds = PairedDataset(records, tokenizer, prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key,
                           rejected_key=cfg.rejected_key, input_template=cfg.input_template,
                           apply_chat_template=cfg.apply_chat_template, max_len=cfg.max_len, source=source)
        if cfg.margin_loss and not ds.has_margin:
            raise ValueError(f"--margin_loss is set but dataset {source} has no 'margin' field; available keys: "
                             f"{list(records.column_names)}")
        return ds

    train, evaluation = tokenize_splits(cfg, train_records, eval_records, pairs, vocab_size=model_cfg.vocab_size)

    eos = model_cfg.eos_token_id if isinstance(model_cfg.eos_token_id, list) else [model_cfg.eos_token_id]
    if model_cfg.pad_token_id is None or model_cfg.pad_token_id in eos:
        print(f"[rm] warning: {cfg.pretrain}/config.json has pad_token_id {model_cfg.pad_token_id} (EOS ids {eos}). "
              "transformers' *ForSequenceClassification finds the scored token by pad_token_id, so it will not read "
              "the final EOS as jaxrlhf and OpenRLHF do when scoring batches; give the model a pad token distinct "
              "from EOS to score identically in transformers", file=sys.stderr)

    # ---------------------------------------------------------------- model, loss, reward statistics
    model = load_model(cfg, mesh, head="score")
    graphdef = nnx.split(model)[0]
    dp = batch_ways(mesh)
    stats: dict[str, float] = {}

    def normalisation_config(params) -> dict:
        """After training: the reward mean/std on the eval set (else the training set), for --normalize_reward."""
        data, which = (evaluation, "eval") if evaluation is not None else (train, "train")
        score = make_forward(graphdef, pair_rewards, params=params, mesh=mesh,
                             compute_dtype=jnp.bfloat16 if cfg.bf16 else None)
        stats.update(reward_stats(score, params, data, rows_per_call=cfg.micro_train_batch_size * dp, dp=dp))
        print(f"[rm] reward mean {stats['mean']:.4f}, std {stats['std']:.4f} over the {which} set "
              f"({2 * len(data)} rewards): stored in config.json for --normalize_reward", file=sys.stderr)
        return dict(stats)

    out = fit(cfg, mesh=mesh, model=model, loss_fn=make_rm_loss(cfg.loss, cfg.margin_loss), train_data=train,
              eval_data=evaluation, name="rm", head="score", extra_config=normalisation_config,
              plot_keys=("loss", "acc", "eval/acc"), progress_keys=("loss", "acc", "step_time"))
    if stats:
        out.update(reward_mean=stats["mean"], reward_std=stats["std"])
    return out


def cli(argv: list[str] | None = None) -> int:
    return run_cli(RMConfig, main, argv, prog="python -m jaxrlhf.rm")


if __name__ == "__main__":
    sys.exit(cli())
