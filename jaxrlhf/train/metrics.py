"""Training metrics: JSONL (always), TensorBoard, Weights & Biases, a tqdm bar, phase timers, and a plot.

``MetricsLogger.log(step, {"reward": r, "kl": k, ...})`` writes one JSON object per call to ``out_dir/metrics.jsonl``
(``{"step": 12, "time": 1700000000.0, "reward": 0.41, ...}``, flushed line by line so a crash loses nothing and
``tail -f`` works), and mirrors the same scalars to TensorBoard and W&B when asked. Only process 0 logs by default
(``enabled``); on the others every method is a no-op, so trainers call them unconditionally.

Values may be Python numbers, NumPy scalars or 0-d / size-1 jax arrays (converted with ``float``; a jax array is
fetched to the host, which waits for its computation). NaN/inf are written as JSON ``NaN``/``Infinity`` (Python's
``json`` reads them back) because a NaN loss is exactly the thing one wants to see in the log.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from converters.atomic import make_dirs, remove_if_empty

METRICS_FILE = "metrics.jsonl"
# Keys shown in the progress-bar postfix, when present: matched exactly or as the last "/"-separated part.
DEFAULT_PROGRESS_KEYS = ("reward", "kl", "loss", "step_time")


def to_float(name: str, value: Any) -> float:
    """A scalar metric (Python / NumPy / jax, 0-d or size 1) -> float; anything else is a TypeError naming it."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    bad = f"metric {name!r} must be a scalar number, got {type(value).__name__}"
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{bad} {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - report what the value was
        raise TypeError(f"{bad} ({e})") from None
    if arr.size != 1 or arr.dtype.kind in "OSUM":
        raise TypeError(f"{bad} of shape {arr.shape} and dtype {arr.dtype}; reduce it (e.g. .mean()) before logging")
    try:
        return float(arr.reshape(()))  # also bfloat16/float8 (ml_dtypes), which NumPy does not call np.number
    except (TypeError, ValueError) as e:
        raise TypeError(f"{bad} of dtype {arr.dtype} ({e})") from None


class MetricsLogger:
    """Write metrics to JSONL (+ TensorBoard, W&B, tqdm). Use as a context manager or call ``close()``.

    ``use_tensorboard``: a log directory (OpenRLHF's ``--use_tensorboard``), or None.
    ``use_wandb``: False, True (use the existing ``wandb login``), or an API key string (OpenRLHF passes the key).
    ``total_steps``: length of the progress bar; ``progress_keys`` choose the postfix entries.
    ``fresh``: start an empty ``metrics.jsonl`` (an existing one becomes ``metrics.jsonl.prev``); else append to it
    (a resumed run continues its file).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        use_tensorboard: str | None = None,
        use_wandb: bool | str = False,
        wandb_project: str = "jaxrlhf",
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        enabled: bool | None = None,
        progress_keys: tuple[str, ...] = DEFAULT_PROGRESS_KEYS,
        show_progress: bool = True,
        fresh: bool = False,
    ) -> None:
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.progress_keys = progress_keys
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self._created = make_dirs(self.out_dir)
        self.jsonl_path = self.out_dir / METRICS_FILE
        self._fresh = fresh  # the file is opened at the first record: a run that fails first leaves no empty log
        if use_tensorboard:
            self._tb = _tensorboard_writer(use_tensorboard)
        if use_wandb:
            self._wandb = _start_wandb(use_wandb, wandb_project, wandb_run_name, dict(config or {}), self.out_dir)
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` at ``step``: one JSONL line (flushed), TensorBoard scalars, W&B, progress bar."""
        if not self.enabled:
            return
        values = {str(k): to_float(str(k), v) for k, v in metrics.items()}
        if "step" in values or "time" in values:
            raise ValueError("metric names 'step' and 'time' are reserved for the JSONL record; rename the metric")
        record = {"step": int(step), "time": time.time(), **values}
        if self._jsonl is None:
            if self._fresh and self.jsonl_path.exists():  # a new run: keep the last run's log beside it
                os.replace(self.jsonl_path, self.jsonl_path.with_name(METRICS_FILE + ".prev"))
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # append: a resumed run continues its file
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        if self._bar is not None:
            postfix = {}
            for want in self.progress_keys:
                for k, v in values.items():
                    if k == want or k.rsplit("/", 1)[-1] == want:
                        postfix[want] = f"{v:.4g}"
                        break
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, int(step) - self._bar.n))  # the bar shows the step, also after a resume

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.enabled:
            remove_if_empty(self._created)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tensorboard_writer(log_dir: str) -> Any:
    """tensorboardX's SummaryWriter, else torch.utils.tensorboard's (both write the same event files)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
        except ImportError:
            raise RuntimeError(
                "--use_tensorboard needs tensorboardX or torch + tensorboard: pip install tensorboardX"
            ) from None
    return SummaryWriter(log_dir=str(log_dir))


def _start_wandb(use_wandb: bool | str, project: str, run_name: str | None, config: dict, out_dir: Path) -> Any:
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "--use_wandb was given but the wandb package is not installed: pip install wandb "
            "(or drop --use_wandb; metrics are always written to metrics.jsonl)"
        ) from None
    if isinstance(use_wandb, str) and use_wandb.strip().lower() not in ("true", "1", "yes"):
        wandb.login(key=use_wandb)  # OpenRLHF passes the API key as --use_wandb KEY
    return wandb.init(project=project, name=run_name, config=config, dir=str(out_dir))


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over repeats until ``reset()``.

    ``with timer("generate"): ...``; ``timer.seconds`` -> ``{"generate": 1.3, "train": 0.8}``;
    ``timer.metrics()`` -> ``{"time/generate": 1.3, ...}`` for the logger. jax dispatches asynchronously: end a phase
    with ``jax.block_until_ready(result)`` inside the ``with`` block, or the time lands in a later phase.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.seconds.items()}

    def reset(self) -> None:
        self.seconds = {}


def read_metrics(jsonl_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a truncated last line, from a crash mid-write, is skipped)."""
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(jsonl_path: str | os.PathLike[str], keys: list[str], out_png: str | os.PathLike[str]) -> Path:
    """One subplot per key (value against step) from a metrics.jsonl file, saved as PNG atomically (temp + rename)."""
    # The Agg canvas directly: no pyplot, no global backend switch, works without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not keys:
        raise ValueError("plot_metrics needs at least one metric key")
    records = read_metrics(jsonl_path)
    if not records:
        raise ValueError(f"{jsonl_path} holds no metric records to plot")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 2.4 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        finite = [y for _, y in pts if isinstance(y, (int, float)) and math.isfinite(y)]
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(finite) != len(pts):
            ax.set_title(f"{key}: {len(pts) - len(finite)} non-finite values", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_png)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_png
