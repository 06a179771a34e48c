"""Supervised fine-tuning: ``python -m jaxrlhf.sft --mesh 4x2 --pretrain DIR --dataset DATA [flags]``.

Flags follow OpenRLHF's ``train_sft.py``; ``--config run.yaml`` takes the same keys. With no ``--pretrain`` a tiny
offline demo runs: a random tiny Llama learns single-digit addition from 90 examples (10 held out for eval).

Data -> samples (``data/sft.py``: prompt/response through ``--input_template`` or the chat template, ``--multiturn``
loss on every assistant turn, ``--pretrain_mode`` loss on every token; EOS kept; over-long samples dropped or
truncated with counts in the log) -> rows (padded, or packed with ``--packing_samples``) -> the shared offline loop
(``train/supervised.py``: schedule, jitted accumulation step, eval, checkpoints, logs, HF export to --save_path).

The loss is the next-token negative log-likelihood of the learned tokens, averaged over all of them in the step:

    L = - sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t]) / sum_{b,t} m[b,t]        (m = loss_mask)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from jaxrlhf.cli import arg, at_defaults, field_default
from jaxrlhf.train.supervised import SupervisedConfig, check_batch_arithmetic, fit, load_model, \
    load_tokenizer_for, load_train_eval, run_cli, setup_mesh, tokenize_splits


@dataclass
class SFTConfig(SupervisedConfig):
    input_key: str = arg("input", "prompt field (the text itself with --pretrain_mode, the conversation with "
                                  "--multiturn)")
    output_key: Optional[str] = arg(None, "response field (None: 'output' when every record has string input/output "
                                          "fields, as batch_inference's rs/csft rows; else with "
                                          "--apply_chat_template the conversation in --input_key ends with it)")
    multiturn: bool = arg(False, "the --input_key field is a conversation: learn every assistant turn")
    pretrain_mode: bool = arg(False, "continued pre-training: loss on every token of --input_key, no template")
    max_epochs: int = arg(2, "passes over the training set")
    ckpt_path: str = arg("./ckpt/checkpoints_sft", "training checkpoints (Orbax)")
    demo_dir: str = arg(".cache/jaxrlhf-sft-demo", "where the built-in demo (no --pretrain) keeps its model and data")


def sft_loss(model, b):
    """Next-token NLL over the learned tokens of the step (module docstring); ``b`` from SFTDataset/PackedDataset.

    logits[:, t] predict token t+1, so the targets are ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]`` and
    divided by ``num_tokens`` (learned tokens in the whole step batch: micro-batch losses sum to the step mean).
    Packed rows pass ``segment_ids``/``positions``: attention stays inside each sample.
    """
    from jaxrlhf import losses

    logits_btv = model(b["input_ids"], attention_mask=b["attention_mask"], positions=b.get("positions"),
                       segment_ids=b.get("segment_ids"))
    return losses.next_token_nll(logits_btv, b["input_ids"], b["loss_mask"], b["num_tokens"]), {}


def main(cfg: SFTConfig) -> dict:
    """Run SFT; returns ``fit``'s summary (metrics, paths, final parameters)."""
    mesh = setup_mesh(cfg)
    if cfg.pretrain is None:
        cfg = prepare_demo(cfg)

    from jaxrlhf.data.packing import PackedDataset
    from jaxrlhf.data.sft import SFTDataset
    from jaxrlhf.models import ModelConfig
    from sharding import batch_ways

    # ---------------------------------------------------------------- data (every check before any compute)
    tokenizer = load_tokenizer_for(cfg)
    vocab = ModelConfig.from_dir(cfg.pretrain).vocab_size
    train_records, eval_records = load_train_eval(cfg)

    def tokenized(records, source: str) -> SFTDataset:
        return SFTDataset(records, tokenizer, input_key=cfg.input_key, output_key=cfg.output_key,
                          input_template=cfg.input_template, apply_chat_template=cfg.apply_chat_template,
                          multiturn=cfg.multiturn, pretrain_mode=cfg.pretrain_mode, max_len=cfg.max_len, source=source)

    def packed(ds: SFTDataset | None, what: str):
        if ds is None or not cfg.packing_samples:
            return ds
        rows = PackedDataset([s.input_ids for s in ds.samples], [s.loss_mask for s in ds.samples],
                             row_len=cfg.max_len, pad_id=ds.pad_id)
        print(f"[data] {what}: {rows.summary()}", file=sys.stderr)
        return rows

    train, evaluation = tokenize_splits(cfg, train_records, eval_records, tokenized, vocab_size=vocab)
    train, evaluation = packed(train, "train"), packed(evaluation, "eval")
    check_batch_arithmetic(cfg, batch_ways(mesh), len(train), None if evaluation is None else len(evaluation))

    # ---------------------------------------------------------------- model and the shared loop
    model = load_model(cfg, mesh, head="lm")
    return fit(cfg, mesh=mesh, model=model, loss_fn=sft_loss, train_data=train, eval_data=evaluation, name="sft")


# ---------------------------------------------------------------------------------------------------------------------
# The built-in demo (no --pretrain): offline, about a minute on 2 cores
# ---------------------------------------------------------------------------------------------------------------------
DEMO_FLAGS = dict(max_len=16, train_batch_size=16, micro_train_batch_size=2, max_epochs=30, learning_rate=1e-3,
                  lr_warmup_ratio=0.05, eval_holdout=0.1, logging_steps=5, input_key="input")


def prepare_demo(cfg: SFTConfig) -> SFTConfig:
    """Build (once) a character tokenizer, a random tiny Llama and 100 addition examples; point ``cfg`` at them."""
    if cfg.dataset is not None:
        raise ValueError("--dataset given without --pretrain: pass the model to fine-tune with --pretrain")
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS, run_paths, save_tiny_llama

    root = os.path.abspath(cfg.demo_dir)
    model_dir, data = os.path.join(root, f"base-seed{cfg.seed}"), os.path.join(root, "addition.jsonl")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"[demo] building a tiny random Llama and the addition data in {root} (once; cached)", file=sys.stderr)
        save_tiny_llama(model_dir + ".tmp", build_tiny_tokenizer(model_dir + ".tmp", CHARS), seed=cfg.seed)
        os.replace(model_dir + ".tmp", model_dir)
    if not os.path.isfile(data):
        with open(data + ".tmp", "w") as f:
            for a in range(10):
                for b in range(10):
                    f.write(json.dumps({"input": f"{a}+{b}=", "output": str(a + b)}) + "\n")
        os.replace(data + ".tmp", data)
    changes = {**DEMO_FLAGS, "output_key": "output"}
    if cfg.save_path == field_default(cfg, "save_path"):
        changes.update(run_paths(root, load_checkpoint=cfg.load_checkpoint))
    cfg = at_defaults(cfg, changes)
    cfg = dataclasses.replace(cfg, pretrain=model_dir, dataset=data)
    print(f"[demo] SFT on single-digit addition: {data} -> {cfg.save_path}", file=sys.stderr)
    return cfg


def cli(argv: list[str] | None = None) -> int:
    return run_cli(SFTConfig, main, argv, prog="python -m jaxrlhf.sft")


if __name__ == "__main__":
    sys.exit(cli())
