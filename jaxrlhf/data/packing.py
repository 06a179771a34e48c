"""``--packing_samples``: several samples per row, told apart by segment ids.

A packed row of ``row_len`` tokens holds whole samples back to back, then padding:

    input_ids    a a a a b b b c c 0 0
    segment_ids  1 1 1 1 2 2 2 3 3 0 0     (0 = padding; k = the k-th sample of the row)
    positions    0 1 2 3 0 1 2 0 1 0 0     (restart at every segment: each sample sees RoPE positions 0..n-1)
    loss_mask    the samples' own masks side by side (a sample's first token is never a target)

The decoder, given ``segment_ids``, lets a token attend only to earlier tokens of its own segment
(``models/decoder.py``), so every sample's logits are those it would get alone in a padded row; with the loss
normalised by the number of learned tokens, the packed loss and its gradients equal the padded ones.

Which samples share a row: best-fit decreasing bin packing (``pack_lengths``), computed once; the trainer then
shuffles ROWS per epoch, and the batch sizes count rows.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows whose total length is ``<= capacity`` (best-fit decreasing).

    Samples are placed longest first (ties: lower index first), each into the open row with the least room that
    still fits it, else into a new row. Deterministic. Every index appears in exactly one row.
    """
    if capacity < 1:
        raise ValueError(f"row capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the row length "
                         f"{capacity}: truncate samples to --max_len before packing")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class PackedDataset:
    """Packed rows over ``sequences`` (token id lists) and their ``loss_masks``; ``batch(rows)`` like SFTDataset's."""

    def __init__(self, sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], *, row_len: int,
                 pad_id: int) -> None:
        if len(sequences) != len(loss_masks):
            raise ValueError(f"{len(sequences)} sequences but {len(loss_masks)} loss masks")
        for i, (s, m) in enumerate(zip(sequences, loss_masks)):
            if len(s) != len(m):
                raise ValueError(f"sample {i}: {len(s)} tokens but a loss mask of {len(m)}")
        self.sequences, self.loss_masks = sequences, loss_masks
        self.row_len, self.pad_id = row_len, pad_id
        self.rows = pack_lengths([len(s) for s in sequences], row_len)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        tokens = sum(len(s) for s in self.sequences)
        return (f"{len(self.sequences)} samples packed into {len(self.rows)} rows of {self.row_len} tokens "
                f"({100.0 * tokens / max(1, len(self.rows) * self.row_len):.1f}% filled)")

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """``input_ids``, ``segment_ids``, ``positions``, ``attention_mask`` (= segment > 0) [n, row_len] int32,
        ``loss_mask`` [n, row_len] float32, ``num_tokens`` (float32 scalar: learned tokens in these rows)."""
        n, L = len(indices), self.row_len
        ids = np.full((n, L), self.pad_id, np.int32)
        seg = np.zeros((n, L), np.int32)
        pos = np.zeros((n, L), np.int32)
        lm = np.zeros((n, L), np.float32)
        for b, r in enumerate(indices):
            t = 0
            for k, i in enumerate(self.rows[int(r)], start=1):
                s = self.sequences[i]
                ids[b, t:t + len(s)] = s
                seg[b, t:t + len(s)] = k
                pos[b, t:t + len(s)] = np.arange(len(s))
                lm[b, t:t + len(s)] = self.loss_masks[i]
                lm[b, t] = 0  # a segment's first token is predicted by nothing (no target across segments)
                t += len(s)
        return {"input_ids": ids, "segment_ids": seg, "positions": pos, "attention_mask": (seg > 0).astype(np.int32),
                "loss_mask": lm, "num_tokens": np.float32(lm.sum())}
