"""Batch sampler whose batches hold captions of one length, each caption once per epoch."""

import math

import numpy as np
import torch.utils.data


class LengthBucketSampler(torch.utils.data.Sampler):
    """Yields index batches of equal caption length; shardable across distributed ranks.

    Each epoch shuffles the captions within each length, cuts every length's captions
    into batches, and shuffles the batch order; `set_epoch` reseeds, as with
    `DistributedSampler`. With `num_replicas` > 1 every rank gets the same number of
    batches (a few are repeated to even out the shards).

    As in the CVND project, a sampler assigned to `.sampler` (its notebook assigns a
    `SubsetRandomSampler` of `get_train_indices()` before every `next(iter(loader))`) replaces
    the epoch: batches of `batch_size` are then cut from what it yields, in its order.
    """

    def __init__(
        self, lengths, batch_size, shuffle=True, seed=0, drop_last=False, num_replicas=1, rank=0
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.num_replicas, self.rank = drop_last, num_replicas, rank
        self.epoch = 0
        self.sampler = None
        order = np.argsort(self.lengths, kind="stable")
        bounds = np.flatnonzero(np.diff(self.lengths[order])) + 1
        self.buckets = {int(self.lengths[b[0]]): b for b in np.split(order, bounds) if len(b)}

    def set_epoch(self, epoch):
        """Make the next iteration use `epoch`'s shuffle."""
        self.epoch = epoch

    def _all_batches(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for length in sorted(self.buckets):
            idx = self.buckets[length]
            if self.shuffle:
                idx = rng.permutation(idx)
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            batches.extend(idx[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _batches_of_assigned_sampler(self):
        """Batches cut from the indices the assigned sampler yields, as torch's BatchSampler cuts."""
        batch = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __iter__(self):
        if self.sampler is not None:
            yield from self._batches_of_assigned_sampler()
            return
        batches = self._all_batches()
        per_rank = math.ceil(len(batches) / self.num_replicas) if batches else 0
        short = per_rank * self.num_replicas - len(batches)
        batches += [batches[i % len(batches)] for i in range(short)]
        for batch in batches[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self):
        if self.sampler is not None:
            n = len(self.sampler)
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        sizes = [len(b) for b in self.buckets.values()]
        full = (
            sum(n // self.batch_size for n in sizes)
            if self.drop_last
            else sum(math.ceil(n / self.batch_size) for n in sizes)
        )
        return math.ceil(full / self.num_replicas)

    def sample_batch(self, rng=None):
        """One batch of random same-length indices, length drawn by frequency (CVND style)."""
        rng = rng or np.random  # the global NumPy RNG, as in CVND: np.random.seed repeats a run
        weights = np.array([len(b) for b in self.buckets.values()], dtype=np.float64)
        length = list(self.buckets)[rng.choice(len(weights), p=weights / weights.sum())]
        return rng.choice(self.buckets[length], size=self.batch_size).tolist()
