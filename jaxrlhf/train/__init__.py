"""Training utilities shared by the entry points.

- ``optim``: ``make_optimizer`` (clipping + AdamW, warmup/cosine-to-min-lr schedule), ``cast_floating``.
- ``metrics``: ``MetricsLogger`` (JSONL, TensorBoard, W&B, tqdm), ``PhaseTimer``, ``plot_metrics``.
- ``checkpoint``: ``Checkpointer`` (Orbax; sharded save, restore onto any mesh, JSON meta).

Import the submodules directly (``from jaxrlhf.train.optim import make_optimizer``); this package imports nothing
itself, so importing one piece does not pull in Orbax or matplotlib.
"""
