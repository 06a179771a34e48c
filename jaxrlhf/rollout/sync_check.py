"""Is every rollout engine running the trainer's weights? Compare greedy probes, token by token.

After a weight sync each engine continues a few probe prompts greedily (temperature 0). The trainer then scores the
same ``[prompt | continuation]`` rows teacher-forced. With identical weights, at every generated position t:

    engine_logp[t]  == trainer_logp[t]          (|difference| <= tol)
    trainer_logp[t] >= trainer_best[t] - tol     (the engine's greedy token is the trainer's argmax, up to ties)

where ``trainer_logp[t] = log softmax(z_t)[token_t]`` and ``trainer_best[t] = max_v log softmax(z_t)[v]``. A wrong
name, a missed transpose, a stale engine or a dtype bug breaks one of these by far more than numerical noise
(measured here on tiny fp32 models: differences of ~1e-5 for matching weights).
"""
from __future__ import annotations

import numpy as np


def default_tolerance(engine_dtype: str) -> float:
    """fp32 engines agree with an fp32 trainer to ~1e-5; 16-bit engines round every matmul (~1e-2 per token)."""
    return 1e-3 if engine_dtype == "float32" else 0.25


def check_engines(engine_logp_et: np.ndarray, trainer_logp_et: np.ndarray, trainer_best_et: np.ndarray,
                  mask_et: np.ndarray, engine_of_row: np.ndarray, *, tol: float) -> dict[str, float]:
    """All arrays ``[rows, T]`` (mask 1 on generated tokens); ``engine_of_row[r]`` names the engine of row ``r``.

    Returns ``sync_check/logprob_diff_max`` and ``sync_check/argmax_gap_max`` over all engines; raises
    ``RuntimeError`` naming the first engine, probe row and position that exceeds ``tol``.
    """
    m = mask_et > 0
    diff = np.where(m, np.abs(engine_logp_et - trainer_logp_et), 0.0)
    gap = np.where(m, trainer_best_et - trainer_logp_et, 0.0)
    for name, err in (("log-prob difference", diff), ("gap to the trainer's greedy token", gap)):
        bad = np.argwhere(err > tol)
        if len(bad):
            r, t = bad[0]
            raise RuntimeError(
                f"vLLM engine {int(engine_of_row[r])} disagrees with the trainer after a weight sync: at generated "
                f"position {t} of probe row {r}, {name} {err[r, t]:.4g} > tol {tol:g} (engine log-prob "
                f"{engine_logp_et[r, t]:.4f}, trainer {trainer_logp_et[r, t]:.4f}, trainer best "
                f"{trainer_best_et[r, t]:.4f}). The engine is not running the trainer's weights: check the model "
                f"family's converter table and --vllm_dtype, or turn the check off with --vllm_sync_check off")
    return {"sync_check/logprob_diff_max": float(diff.max(initial=0.0)),
            "sync_check/argmax_gap_max": float(gap.max(initial=0.0))}
