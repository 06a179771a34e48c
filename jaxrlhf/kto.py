"""KTO on unpaired data: ``python -m jaxrlhf.kto --mesh 4x2 --pretrain DIR --dataset SAMPLES [flags]``.

Flags follow OpenRLHF's ``train_kto.py``; ``--config run.yaml`` takes the same keys. A sample is a prompt
(``--input_key``), a response (``--output_key``) and a label (``--label_key``: true/1 desirable, false/0 undesirable);
data -> samples (``data/preference.py``) -> the shared offline loop (``train/supervised.py``) -> an HF causal LM in
``--save_path``.

KL reference point (KTO paper, Ethayarajh et al. 2024, section 4; OpenRLHF's collate_fn): every batch also holds
the mismatched pairs (prompt_i, response_{i+1}), the completions shifted by one within the batch. Their policy and
reference log-probs give z0 = max(0, mean_i [log pi - log ref](y_{i+1} | x_i)), detached, per micro-batch (a
micro-batch spans every data-parallel rank, so this is OpenRLHF's all-reduced mean). With
rho = log pi(y|x) - log ref(y|x) summed over the response tokens (``losses.sequence_logprobs``), the loss per sample
is (``losses.kto_loss``)

    desirable:    --desirable_loss_weight   * (1 - sigmoid(beta (rho - z0)))
    undesirable:  --undesirable_loss_weight * (1 - sigmoid(beta (z0 - rho)))

averaged over the samples of the step. The reference (``--ref_pretrain``, default the initial policy) is frozen;
its log-probs of both halves are computed once per batch on the mesh (jitted forward, no gradient). Logged, train
and eval: loss, chosen_reward / reject_reward = mean beta rho over the desirable / undesirable samples, kl = z0.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from jaxrlhf.cli import arg
from jaxrlhf.train.supervised import SupervisedConfig, chunked_prepare, fit, frozen_reference, load_model, \
    load_tokenizer_for, load_train_eval, reference_path, run_cli, setup_mesh, tokenize_splits

FORWARD_KEYS = ("input_ids", "attention_mask", "loss_mask", "kl_input_ids", "kl_attention_mask", "kl_loss_mask")
REF_NAMES = ("ref_logp", "ref_kl_logp")  # the reference's log-probs, added to every batch


@dataclass
class KTOConfig(SupervisedConfig):
    ref_pretrain: Optional[str] = arg(None, "reference model (default: --pretrain, the initial policy)")
    beta: float = arg(0.01, "KTO beta: scale of the implied reward beta (log pi - log ref)")
    desirable_loss_weight: float = arg(1.0, "weight of the desirable samples' loss")
    undesirable_loss_weight: float = arg(1.0, "weight of the undesirable samples' loss")
    input_key: str = arg("input", "prompt field (a string, or chat messages with --apply_chat_template)")
    output_key: Optional[str] = arg(None, "response field (None with --apply_chat_template: the last message of "
                                          "--input_key)")
    label_key: str = arg("label", "desirable field: true/1 (desirable) or false/0 (undesirable)")
    max_len: int = arg(512, "tokens per sequence (prompt + response; longer samples are truncated or dropped)")
    learning_rate: float = arg(5e-7, "peak learning rate")
    ckpt_path: str = arg("./ckpt/checkpoints_kto", "training checkpoints (Orbax)")

    def rows_per_sample(self) -> int:
        return 2

    def reference(self) -> Optional[str]:
        return self.ref_pretrain or self.pretrain

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.desirable_loss_weight < 0 or self.undesirable_loss_weight < 0:
            raise ValueError("--desirable_loss_weight and --undesirable_loss_weight must be >= 0, got "
                             f"{self.desirable_loss_weight} and {self.undesirable_loss_weight}")
        if self.train_batch_size < 2:
            raise ValueError("--train_batch_size must be >= 2: KTO pairs each prompt with another sample's response")
        if self.packing_samples:
            raise ValueError("--packing_samples is not supported by the KTO trainer yet: drop the flag")


# ---------------------------------------------------------------------------------------------------------------------
# Model -> log-probs -> loss
# ---------------------------------------------------------------------------------------------------------------------


def sample_logprobs(model, b):
    """(log pi summed over the response of the real pairs [n], of the mismatched pairs [n]): one forward, 2n rows."""
    import jax.numpy as jnp

    from jaxrlhf import losses

    n = b["input_ids"].shape[0]
    ids = jnp.concatenate([b["input_ids"], b["kl_input_ids"]])
    mask = jnp.concatenate([b["attention_mask"], b["kl_attention_mask"]])
    loss_mask = jnp.concatenate([b["loss_mask"], b["kl_loss_mask"]])
    total, _ = losses.sequence_logprobs(model(ids, mask), ids, loss_mask)
    return total[:n], total[n:]


def make_kto_loss(*, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """``loss_fn(model, batch) -> (loss, metrics)`` of the module docstring; ``batch`` carries the reference
    log-probs (``ref_logp`` / ``ref_kl_logp``) and the step's normalisers (``num_samples``, ``num_desirable``,
    ``num_undesirable``)."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf import losses

    def kto_loss(model, b):
        logp, kl_logp = sample_logprobs(model, b)
        kl_b = kl_logp - b["ref_kl_logp"]
        loss_b, rewards = losses.kto_loss(logp, b["ref_logp"], b["desirable"], kl_b, beta=beta,
                                          desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        d = b["desirable"]
        z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_b), 0.0))
        share = logp.shape[0] / b["num_samples"]  # this micro-batch's part of the step (z0 is per micro-batch)
        return jnp.sum(loss_b) / b["num_samples"], {
            "chosen_reward": jnp.sum(rewards * d) / jnp.maximum(b["num_desirable"], 1.0),
            "reject_reward": jnp.sum(rewards * (1.0 - d)) / jnp.maximum(b["num_undesirable"], 1.0),
            "kl": z0 * share}

    return kto_loss


def make_reference(forward, params, *, rows_per_call: int):
    """``prepare(batch) -> batch`` adding the frozen reference's ``ref_logp`` / ``ref_kl_logp`` [n], computed by the
    jitted ``forward(params, rows)`` (of ``sample_logprobs``) in chunks of ``rows_per_call`` samples."""
    return chunked_prepare(forward, params, keys=FORWARD_KEYS, names=REF_NAMES, rows_per_call=rows_per_call)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(cfg: KTOConfig) -> dict:
    """Run KTO; returns ``fit``'s summary (metrics, paths, final parameters)."""
    mesh = setup_mesh(cfg)

    from jaxrlhf.data.preference import UnpairedDataset
    from jaxrlhf.models import ModelConfig

    # ---------------------------------------------------------------- data (every check before any compute)
    tokenizer = load_tokenizer_for(cfg)
    ref_path = reference_path(cfg.ref_pretrain, cfg.pretrain)
    train_records, eval_records = load_train_eval(cfg)

    def samples(records, source: str) -> UnpairedDataset:
        return UnpairedDataset(records, tokenizer, input_key=cfg.input_key, output_key=cfg.output_key,
                               label_key=cfg.label_key, input_template=cfg.input_template,
                               apply_chat_template=cfg.apply_chat_template, max_len=cfg.max_len, source=source)

    train, evaluation = tokenize_splits(cfg, train_records, eval_records, samples,
                                        vocab_size=ModelConfig.from_dir(cfg.pretrain).vocab_size)

    # ---------------------------------------------------------------- policy, frozen reference
    model = load_model(cfg, mesh, head="lm")
    prepare = frozen_reference(cfg, mesh, ref_path, sample_logprobs, keys=FORWARD_KEYS, names=REF_NAMES)

    loss_fn = make_kto_loss(beta=cfg.beta, desirable_weight=cfg.desirable_loss_weight,
                            undesirable_weight=cfg.undesirable_loss_weight)
    return fit(cfg, mesh=mesh, model=model, loss_fn=loss_fn, train_data=train, eval_data=evaluation, name="kto",
               prepare=prepare, plot_keys=("loss", "eval/loss", "chosen_reward", "reject_reward", "kl"),
               progress_keys=("loss", "kl", "step_time"))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(KTOConfig, main, argv, prog="python -m jaxrlhf.kto")


if __name__ == "__main__":
    sys.exit(cli())
