"""The LoRA flags every trainer of a policy (or reward model) shares, and attaching adapters to a loaded model.

The adapter math and names live in ``models/lora.py``; the PEFT directory format in ``converters/peft.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jaxrlhf.cli import arg


@dataclass
class LoraFlags:
    """OpenRLHF's LoRA flags (``--lora_rank`` 0: full fine-tuning)."""

    lora_rank: int = arg(0, "LoRA rank r (0: off, every parameter is trained)")
    lora_alpha: float = arg(16.0, "LoRA alpha: the adapter's output is scaled by alpha / r")
    lora_dropout: float = arg(0.0, "dropout rate on the adapters' input while training (PEFT's lora_dropout; "
                                   "seeded by --seed, off in evaluation, experience and generation)")
    target_modules: list[str] = arg(["all-linear"], "modules to adapt, as PEFT names them: q_proj,k_proj,v_proj,"
                                                    "o_proj,gate_proj,up_proj,down_proj, or all-linear")
    lora_path: Optional[str] = arg(None, "start from this PEFT LoRA adapter directory (its r, alpha and target "
                                         "modules are used) on top of --pretrain")
    lora_save_adapter: bool = arg(False, "also write the adapter as a PEFT directory, --save_path/lora_adapter")
    load_in_4bit: bool = arg(False, "QLoRA: keep the frozen base linears in NF4 (4-bit, block-64 absmax scales), "
                                    "dequantized in the matmul; needs --lora_rank or --lora_path")
    bnb_4bit_use_double_quant: bool = arg(False, "with --load_in_4bit: quantize the NF4 block scales too (8-bit, "
                                                 "blocks of 256, fp32 second-level scales and a mean offset: ~0.516 "
                                                 "instead of 0.5625 byte per base parameter)")

    def check_lora(self) -> None:
        """Refuse bad LoRA flags (called by the config's ``__post_init__``)."""
        from jaxrlhf.models.lora import parse_targets

        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0 (0: off), got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank > 0 and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        parse_targets(self.target_modules)
        if self.lora_save_adapter and not self.lora_rank and not self.lora_path:
            raise ValueError("--lora_save_adapter needs LoRA: set --lora_rank (or --lora_path)")
        if self.load_in_4bit and not self.lora_rank and not self.lora_path:
            raise ValueError("--load_in_4bit (QLoRA) needs --lora_rank (or --lora_path): a 4-bit base is frozen, "
                             "only LoRA adapters on it can be trained")
        if self.bnb_4bit_use_double_quant and not self.load_in_4bit:
            raise ValueError("--bnb_4bit_use_double_quant quantizes the scales of the 4-bit base: add --load_in_4bit")

    @property
    def uses_lora(self) -> bool:
        return bool(self.lora_rank or self.lora_path)

    def lora_fingerprint(self) -> str | None:
        """The trained parameters' layout for a run's fingerprint (train/run.py): LoRA or not, which adapters, a
        4-bit base. None without LoRA."""
        if not self.uses_lora:
            return None
        return (f"--lora_path {self.lora_path}" if self.lora_path else
                f"--lora_rank {self.lora_rank} --lora_alpha {self.lora_alpha} --target_modules "
                f"{','.join(self.target_modules)}") + (" --load_in_4bit" if self.load_in_4bit else "") + (
            " --bnb_4bit_use_double_quant" if self.bnb_4bit_use_double_quant else "")

    def attach_lora(self, model, *, mesh, seed: int | None = None):
        """``add_lora`` with these flags (``seed``: the adapters' init seed; default ``--seed``)."""
        return add_lora(model, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                        target_modules=self.target_modules, lora_path=self.lora_path,
                        seed=self.seed if seed is None else seed, mesh=mesh, load_in_4bit=self.load_in_4bit,
                        lora_dropout=self.lora_dropout, double_quant=self.bnb_4bit_use_double_quant)

    def dropout_rng(self, update: int):
        """The PRNG key of optimizer update ``update`` for adapter dropout (from ``--seed``: a resumed run repeats
        it), or None without dropout (the train step then runs exactly as without LoRA dropout)."""
        if not (self.uses_lora and self.lora_dropout):
            return None
        import jax

        return jax.random.fold_in(jax.random.key(self.seed ^ 0x4C6F5241), update)


def add_lora(model, *, lora_rank: int, lora_alpha: float, target_modules, lora_path: str | None, seed: int,
             mesh=None, load_in_4bit: bool = False, lora_dropout: float = 0.0, double_quant: bool = False):
    """Attach adapters to ``model`` in place: fresh ones (``lora_rank`` > 0), or the PEFT adapter at ``lora_path``
    (its own r/alpha/targets; a different ``lora_rank`` given as well is an error); ``load_in_4bit`` first turns the
    base linears into NF4 (QLoRA, models/nf4.py; ``double_quant``: 8-bit scales). ``lora_dropout``: the adapters'
    input dropout in train steps. Returns ``model``."""
    import dataclasses

    from flax import nnx

    from converters.peft import load_adapter, read_spec
    from jaxrlhf.models.lora import LoraSpec, apply_lora, parse_targets

    if lora_path:
        spec = read_spec(lora_path)
        if lora_rank and lora_rank != spec.rank:
            raise ValueError(f"--lora_rank {lora_rank} but the adapter at --lora_path {lora_path} has r={spec.rank}: "
                             "drop --lora_rank (the adapter's own is used)")
    elif lora_rank > 0:
        spec = LoraSpec(rank=lora_rank, alpha=lora_alpha, targets=parse_targets(target_modules))
    else:
        return model
    spec = dataclasses.replace(spec, dropout=lora_dropout)
    if load_in_4bit:
        from jaxrlhf.models.nf4 import quantize_base

        quantize_base(model, mesh=mesh, double_quant=double_quant)
    apply_lora(model, spec, seed=seed, mesh=mesh)
    if lora_path:
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, load_adapter(state.to_pure_dict(), model.cfg, lora_path))
        nnx.update(model, state)
    return model


def trainable_with_lora(head: str):
    """What a LoRA run trains: the adapters, and a reward model's / critic's fresh score head (PEFT's
    ``modules_to_save``); the base stays frozen, with no gradients and no optimizer state."""
    from jaxrlhf.models.lora import is_adapter

    return lambda path: is_adapter(path) or (head == "score" and path.startswith("score/"))


def plain_params(params: dict, lora) -> dict:
    """What a plain HF model of ``params`` holds: the adapters merged into the kernels (an NF4 base dequantized)
    when ``lora`` (a ``LoraSpec``) is given, else ``params`` themselves."""
    from jaxrlhf.models.lora import merge

    return params if lora is None else merge(params, lora.scale)


def plain_model(model, mesh=None):
    """``model`` itself without LoRA, else a plain ``Decoder`` (no adapter attributes, fp32 kernels) holding its
    merged weights (a second copy of the model): for consumers of HF-named weights such as the JAX sampler."""
    import jax.numpy as jnp
    from flax import nnx

    from converters.hf import abstract_model

    if model.lora is None:
        return model
    graphdef, _ = abstract_model(model.cfg, head=model.head, dtype=jnp.float32, mesh=mesh)
    return nnx.merge(graphdef, plain_params(nnx.split(model)[1].to_pure_dict(), model.lora))
