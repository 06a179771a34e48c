"""Batching: padding token lists into [B, T] arrays, and a resumable, seeded, multi-process batch order.

All NumPy, host side; the trainer moves the arrays onto the mesh.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np


def _padded_length(seqs: Sequence[Sequence[int]], length: int | None, multiple_of: int | None) -> int:
    """T = (length or the longest sequence), rounded up to a multiple of `multiple_of`."""
    longest = max((len(s) for s in seqs), default=0)
    if length is not None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if longest > length:
            b = next(i for i, s in enumerate(seqs) if len(s) == longest)
            raise ValueError(f"sequence {b} has {longest} tokens, more than length={length}: truncate it first")
        longest = length
    if multiple_of is not None:
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        longest = -(-longest // multiple_of) * multiple_of
    return longest


def bucket_length(n: int, cap: int, buckets: Sequence[int] | None = None) -> int:
    """The length a batch whose longest row has ``n`` tokens is padded to: the smallest of ``buckets`` that holds
    ``n`` (default: 16, 24, 32, 48, 64, 96, ...: powers of two and 1.5 x powers of two, so at most a third of a
    row is padding), never more than ``cap`` (the flag's maximum). Few distinct lengths means few compiled
    programs; ``buckets=()`` always gives ``cap`` (one fixed shape)."""
    if n > cap:
        raise ValueError(f"a row of {n} tokens does not fit the maximum length {cap}")
    if buckets is None:
        buckets = [m << k for k in range(max(cap, 16).bit_length()) for m in (16, 24)]
    return min([b for b in buckets if b >= n] + [cap])


def left_pad(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    length: int | None = None,
    multiple_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-align each sequence in a [B, T] int32 array filled with pad_id; mask is 1 on real tokens.

    T = `length` if given (an error if a sequence is longer) else the longest sequence, then rounded up to a
    multiple of `multiple_of`. Row b is [pad]*(T - n_b) + seqs[b]. Used for prompts (generation continues at the
    right edge).
    """
    t = _padded_length(seqs, length, multiple_of)
    ids_bt = np.full((len(seqs), t), pad_id, dtype=np.int32)
    mask_bt = np.zeros((len(seqs), t), dtype=np.int32)
    for b, s in enumerate(seqs):
        n = len(s)
        if n:
            ids_bt[b, t - n :] = s
            mask_bt[b, t - n :] = 1
    return ids_bt, mask_bt


def right_pad(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    length: int | None = None,
    multiple_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-align each sequence in a [B, T] int32 array: row b is seqs[b] + [pad]*(T - n_b). T as in left_pad."""
    t = _padded_length(seqs, length, multiple_of)
    ids_bt = np.full((len(seqs), t), pad_id, dtype=np.int32)
    mask_bt = np.zeros((len(seqs), t), dtype=np.int32)
    for b, s in enumerate(seqs):
        n = len(s)
        if n:
            ids_bt[b, :n] = s
            mask_bt[b, :n] = 1
    return ids_bt, mask_bt


class BatchIterator:
    """Seeded batch order over `num_items` items, resumable at any batch, sliced per process.

    Epoch e visits the items in the order `np.random.default_rng([seed, e]).permutation(num_items)` (or 0..N-1
    with shuffle=False); global batch k of epoch e is order[k*B:(k+1)*B] with B = batch_size. Each epoch's order
    depends only on (seed, e), so a run resumed from `state()` yields exactly the batches an uninterrupted run
    would. With drop_last=True an epoch has floor(N/B) batches (the tail is dropped), else ceil(N/B) with a short
    last batch.

    Process p of P gets rows [p*B/P, (p+1)*B/P) of each global batch (B must divide by P); all processes must use
    the same seed. `state()` = {"epoch", "index"}: the next batch to hand out; it is the same on every process.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}: the dataset is empty")
        if drop_last and num_items < batch_size:
            raise ValueError(
                f"the dataset has {num_items} items, fewer than one batch of {batch_size}: with drop_last there "
                "would be no batches; lower the batch size or add data"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {process_count} processes: pick a multiple of "
                f"{process_count}"
            )
        if process_count > 1 and not drop_last and num_items % batch_size:
            raise ValueError(
                f"drop_last=False leaves a last batch of {num_items % batch_size} items that cannot be split evenly "
                f"over {process_count} processes: use drop_last=True"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of `epoch`: a permutation of 0..num_items-1 drawn from (seed, epoch)."""
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                self._order = np.arange(self.num_items)
            self._order_epoch = epoch
        return self._order

    def global_batch(self, epoch: int, index: int) -> np.ndarray:
        """Item indices of global batch `index` of `epoch` (int64, length batch_size or shorter at the tail)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range: an epoch has {self.batches_per_epoch} batches")
        return self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def local_slice(self, batch: np.ndarray) -> np.ndarray:
        """This process's rows of a global batch: batch[p*n/P:(p+1)*n/P]."""
        n = len(batch) // self.process_count
        return batch[self.process_index * n : (self.process_index + 1) * n]

    def next_batch(self) -> np.ndarray:
        """This process's item indices for the next batch; moves on to the next epoch after the last one."""
        batch = self.local_slice(self.global_batch(self.epoch, self.index))
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        """The remaining batches of the current epoch (all of them when starting at index 0)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state(self) -> dict[str, int]:
        """{"epoch", "index"} of the next batch; JSON-serialisable."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state(self, state: Mapping[str, int]) -> None:
        """Continue from a `state()`; built with the same num_items, batch_size, seed, shuffle and drop_last."""
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise KeyError(f"batch iterator state lacks {sorted(missing)}; got keys {sorted(state)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(
                f"batch iterator state {dict(state)} does not fit this iterator: an epoch has "
                f"{self.batches_per_epoch} batches ({self.num_items} items, batch_size {self.batch_size}); was the "
                "dataset or batch size changed since the checkpoint?"
            )
        self.epoch, self.index = epoch, index

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, int],
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> "BatchIterator":
        """A new iterator positioned at `state`."""
        it = cls(
            num_items,
            batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            process_index=process_index,
            process_count=process_count,
        )
        it.load_state(state)
        return it
