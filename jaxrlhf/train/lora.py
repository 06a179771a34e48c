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
    lora_dropout: float = arg(0.0, "dropout on the adapter's input (only 0 is supported for now)")
    target_modules: list[str] = arg(["all-linear"], "modules to adapt, as PEFT names them: q_proj,k_proj,v_proj,"
                                                    "o_proj,gate_proj,up_proj,down_proj, or all-linear")
    lora_path: Optional[str] = arg(None, "start from this PEFT LoRA adapter directory (its r, alpha and target "
                                         "modules are used) on top of --pretrain")
    lora_save_adapter: bool = arg(False, "also write the adapter as a PEFT directory, --save_path/lora_adapter")
    load_in_4bit: bool = arg(False, "QLoRA: keep the frozen base linears in NF4 (4-bit, block-64 absmax scales), "
                                    "dequantized in the matmul; needs --lora_rank or --lora_path")

    def check_lora(self) -> None:
        """Refuse bad LoRA flags (called by the config's ``__post_init__``)."""
        from jaxrlhf.models.lora import parse_targets

        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0 (0: off), got {self.lora_rank}")
        if self.lora_dropout != 0.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout}: adapter dropout is not implemented yet; use 0")
        if self.lora_rank > 0 and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        parse_targets(self.target_modules)
        if self.lora_save_adapter and not self.lora_rank and not self.lora_path:
            raise ValueError("--lora_save_adapter needs LoRA: set --lora_rank (or --lora_path)")
        if self.load_in_4bit and not self.lora_rank and not self.lora_path:
            raise ValueError("--load_in_4bit (QLoRA) needs --lora_rank (or --lora_path): a 4-bit base is frozen, "
                             "only LoRA adapters on it can be trained")


def add_lora(model, *, lora_rank: int, lora_alpha: float, target_modules, lora_path: str | None, seed: int,
             mesh=None, load_in_4bit: bool = False):
    """Attach adapters to ``model`` in place: fresh ones (``lora_rank`` > 0), or the PEFT adapter at ``lora_path``
    (its own r/alpha/targets; a different ``lora_rank`` given as well is an error); ``load_in_4bit`` first turns the
    base linears into NF4 (QLoRA, models/nf4.py). Returns ``model``."""
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
    if load_in_4bit:
        from jaxrlhf.models.nf4 import quantize_base

        quantize_base(model, mesh=mesh)
    apply_lora(model, spec, seed=seed, mesh=mesh)
    if lora_path:
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, load_adapter(state.to_pure_dict(), model.cfg, lora_path))
        nnx.update(model, state)
    return model
