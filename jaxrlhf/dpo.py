"""DPO, cDPO and IPO: ``python -m jaxrlhf.dpo --mesh 4x2 --pretrain DIR --dataset PAIRS [flags]``.

Flags follow OpenRLHF's ``train_dpo.py``; ``--config run.yaml`` takes the same keys. Data -> pairs
(``data/preference.py``, as for the reward model) -> the shared offline loop (``train/supervised.py``) -> an HF causal
LM in ``--save_path``.

The reference model is ``--ref_pretrain`` (default: the initial policy, loaded again from ``--pretrain``), frozen.
Its log-probabilities are computed once per batch on the mesh (a jitted forward, no gradient, chunks of
``--micro_train_batch_size`` x dp pairs) before the step, for train and eval batches alike. With log pi(y|x) summed
over the response tokens (EOS included; ``losses.sequence_logprobs``) and

    h = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))

the loss per pair (``losses.dpo_loss``) is

    DPO / cDPO: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)        (ls = --label_smoothing)
    IPO (--ipo): (h - 1 / (2 beta))^2

averaged over the pairs of the step, plus ``--nll_loss_coef`` x the chosen responses' mean per-token negative
log-likelihood (OpenRLHF's NLL term: -mean over pairs of mean_t log pi(y_c,t)). Logged, train and eval:
loss, preference_loss, nll_loss, acc = mean [r_c > r_r], chosen_reward = beta (log pi - log ref)(y_c),
reject_reward (the same for y_r) and margin = chosen_reward - reject_reward.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from jaxrlhf.cli import arg
from jaxrlhf.train.supervised import SupervisedConfig, chunked_prepare, fit, frozen_reference, load_model, \
    load_tokenizer_for, load_train_eval, reference_path, run_cli, setup_mesh, tokenize_splits

FORWARD_KEYS = ("chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask",
                "rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask")
REF_NAMES = ("ref_chosen_logp", "ref_rejected_logp")  # the reference's log-probs, added to every batch


@dataclass
class DPOConfig(SupervisedConfig):
    ref_pretrain: Optional[str] = arg(None, "reference model (default: --pretrain, the initial policy)")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL penalty (IPO: the target margin is 1/(2 beta))")
    label_smoothing: float = arg(0.0, "cDPO: probability that a preference label is flipped, in [0, 0.5)")
    ipo: bool = arg(False, "IPO loss (h - 1/(2 beta))^2 instead of the sigmoid loss")
    nll_loss_coef: float = arg(0.0, "weight of the NLL loss on the chosen responses (0: off)")
    prompt_key: Optional[str] = arg(None, "prompt field (None: 'prompt' when every record has string prompt/chosen/"
                                          "rejected fields, as batch_inference's iter_dpo rows; else with "
                                          "--apply_chat_template every message of --chosen_key but the last)")
    chosen_key: str = arg("chosen", "preferred response field (a string or a list of chat messages)")
    rejected_key: str = arg("rejected", "dispreferred response field")
    max_len: int = arg(512, "tokens per sequence (prompt + response; longer pairs are truncated or dropped)")
    learning_rate: float = arg(5e-7, "peak learning rate")
    ckpt_path: str = arg("./ckpt/checkpoints_dpo", "training checkpoints (Orbax)")

    def rows_per_sample(self) -> int:
        return 2

    def reference(self) -> Optional[str]:
        return self.ref_pretrain or self.pretrain

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5) (cDPO's label-flip probability), got "
                             f"{self.label_smoothing}")
        if self.ipo and self.label_smoothing:
            raise ValueError("--label_smoothing (cDPO) does not apply to --ipo: use one of them")
        if self.nll_loss_coef < 0:
            raise ValueError(f"--nll_loss_coef must be >= 0, got {self.nll_loss_coef}")
        if self.packing_samples:
            raise ValueError("--packing_samples is not supported by the DPO trainer yet: drop the flag")


# ---------------------------------------------------------------------------------------------------------------------
# Model -> log-probs -> loss
# ---------------------------------------------------------------------------------------------------------------------


def pair_logprobs(model, b):
    """(sum over the response of log pi, for the chosen [n] and the rejected [n]; the chosen per-token mean [n]):
    one forward over the 2n rows."""
    import jax.numpy as jnp

    from jaxrlhf import losses

    n = b["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([b["chosen_input_ids"], b["rejected_input_ids"]])
    mask = jnp.concatenate([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([b["chosen_loss_mask"], b["rejected_loss_mask"]])
    total, mean = losses.sequence_logprobs(model(ids, mask), ids, loss_mask)
    return total[:n], total[n:], mean[:n]


def ref_logprobs(model, b):
    """The reference's (chosen [n], rejected [n]) sequence log-probs."""
    chosen, rejected, _ = pair_logprobs(model, b)
    return chosen, rejected


def make_dpo_loss(*, beta: float, label_smoothing: float = 0.0, ipo: bool = False, nll_loss_coef: float = 0.0):
    """``loss_fn(model, batch) -> (loss, metrics)`` of the module docstring; ``batch`` carries the reference
    log-probs (``ref_chosen_logp`` / ``ref_rejected_logp``) and the normaliser ``num_pairs`` of the whole step."""
    import jax.numpy as jnp

    from jaxrlhf import losses

    def dpo_loss(model, b):
        chosen, rejected, chosen_mean = pair_logprobs(model, b)
        loss_b, chosen_reward, reject_reward = losses.dpo_loss(
            chosen, rejected, b["ref_chosen_logp"], b["ref_rejected_logp"], beta=beta,
            label_smoothing=label_smoothing, ipo=ipo)
        n = b["num_pairs"]
        preference = jnp.sum(loss_b) / n
        nll = -jnp.sum(chosen_mean) / n
        loss = preference + nll_loss_coef * nll if nll_loss_coef else preference
        return loss, {"preference_loss": preference, "nll_loss": nll,
                      "acc": jnp.sum(chosen_reward > reject_reward) / n,
                      "chosen_reward": jnp.sum(chosen_reward) / n, "reject_reward": jnp.sum(reject_reward) / n,
                      "margin": jnp.sum(chosen_reward - reject_reward) / n}

    return dpo_loss


def make_reference(forward, params, *, rows_per_call: int):
    """``prepare(batch) -> batch`` adding the frozen reference's ``ref_chosen_logp`` / ``ref_rejected_logp`` [n],
    computed by the jitted ``forward(params, rows)`` (of ``ref_logprobs``) in chunks of ``rows_per_call`` pairs."""
    return chunked_prepare(forward, params, keys=FORWARD_KEYS, names=REF_NAMES, rows_per_call=rows_per_call)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: DPOConfig) -> dict:
    """Run DPO / cDPO / IPO; returns ``fit``'s summary (metrics, paths, final parameters)."""
    mesh = setup_mesh(cfg)

    from jaxrlhf.data.preference import PairedDataset
    from jaxrlhf.models import ModelConfig

    # ---------------------------------------------------------------- data (every check before any compute)
    tokenizer = load_tokenizer_for(cfg)
    ref_path = reference_path(cfg.ref_pretrain, cfg.pretrain)
    train_records, eval_records = load_train_eval(cfg)

    def pairs(records, source: str) -> PairedDataset:
        return PairedDataset(records, tokenizer, prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key,
                             rejected_key=cfg.rejected_key, input_template=cfg.input_template,
                             apply_chat_template=cfg.apply_chat_template, max_len=cfg.max_len, source=source)

    train, evaluation = tokenize_splits(cfg, train_records, eval_records, pairs,
                                        vocab_size=ModelConfig.from_dir(cfg.pretrain).vocab_size)

    # ---------------------------------------------------------------- policy, frozen reference
    model = load_model(cfg, mesh, head="lm")
    prepare = frozen_reference(cfg, mesh, ref_path, ref_logprobs, keys=FORWARD_KEYS, names=REF_NAMES)

    loss_fn = make_dpo_loss(beta=cfg.beta, label_smoothing=cfg.label_smoothing, ipo=cfg.ipo,
                            nll_loss_coef=cfg.nll_loss_coef)
    return fit(cfg, mesh=mesh, model=model, loss_fn=loss_fn, train_data=train, eval_data=evaluation, name="dpo",
               prepare=prepare, plot_keys=("loss", "margin", "eval/margin", "acc"),
               progress_keys=("loss", "acc", "margin", "step_time"))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(DPOConfig, main, argv, prog="python -m jaxrlhf.dpo")


if __name__ == "__main__":
    sys.exit(cli())
