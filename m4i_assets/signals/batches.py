"""One way to run a model over records in batches: `map_batches`, used by every signal that decodes records and runs a
model forward on them (embeddings, augmentation deltas).

A batch's work is `prepare(start, stop)` (decode its images, preprocess them, tokenise its captions: CPU work) then
`compute(prepared)` (the model's forward). `map_batches` hands the batches to torch's DataLoader:

- On the CPU, one forked worker process per core the step was given (`torch.get_num_threads()`) prepares *and*
  computes whole batches, each with one intra-op thread. One batch's decoding overlaps another's forward with no
  core oversubscribed and no GIL shared: decode threads between multi-threaded forwards held each other up on the
  GIL (PIL's and torchvision's per-image Python work) and left the cores idle while they decoded
  (`bench/embeddings.py`). A forward on one thread also makes a batch's numbers independent of the cores and of
  the worker that ran it. A worker is handed its next batch when it returns one, and the results are put back
  in order here: a worker on a busier core does fewer batches instead of the others idling at the end (with
  batches dealt in turn, one worker of a 2,000-record run once idled 0.6 s of its 3.95 s), and the short last
  batch goes first, so that the workers end on full batches together. Where there is only one batch or one
  core, or the process may not fork (a daemonic process, such as a Celery pool worker), the batches run here,
  on one thread as well.
- On CUDA, up to 8 worker processes prepare batches two ahead into pinned memory while this process computes them.

Batches are the caller's `batch_size` records in order whatever ran them, so the results equal a loop over the
batches bit for bit.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from m4i_assets.data.images import open_rgb
from m4i_assets.models.device import device_for

CUDA_DECODE_WORKERS = 8
CUDA_PREFETCH = 2  # batches each CUDA decode worker prepares ahead
CPU_PREFETCH = 1  # a CPU worker is handed its next batch when it returns one: the batches balance over the cores


def decode_images(image_uris: Sequence[str], preprocess: Callable) -> torch.Tensor:
    """`preprocess(open_rgb(uri))` of each image, stacked."""
    return torch.stack([preprocess(open_rgb(uri)) for uri in image_uris])


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run torch's CPU kernels on `threads` threads, restoring the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Batches(Dataset):
    """Batch i of `n` records: (i, `compute(prepare(start, stop))`), or (i, `prepare`'s result) without `compute`."""

    def __init__(self, n: int, batch_size: int, prepare: Callable, compute: Callable | None) -> None:
        self.n, self.batch_size, self.prepare, self.compute = n, batch_size, prepare, compute

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, index: int) -> Any:
        start = index * self.batch_size
        prepared = self.prepare(start, min(start + self.batch_size, self.n))
        if self.compute is None:
            return index, prepared
        with intra_op_threads(1):
            return index, self.compute(prepared)


def may_fork() -> bool:
    """Whether this process may start worker processes (a daemonic one, such as a Celery pool's, may not)."""
    return not multiprocessing.current_process().daemon


def map_batches(
    n: int,
    batch_size: int,
    prepare: Callable[[int, int], Any],
    compute: Callable[[Any], Any],
    device: str | torch.device | None = None,
) -> Iterator[Any]:
    """`compute(prepare(start, stop))` of consecutive batches of `n` records, in order (module docstring: where
    each runs). `prepare` and `compute` run in forked workers: they must not rely on this process's threads
    (a DuckDB connection, a lock held elsewhere), and what they return comes back pickled (tensors through
    shared memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    dev = device if isinstance(device, torch.device) else device_for(device)
    cuda = dev.type == "cuda"
    batches = _Batches(n, batch_size, prepare, None if cuda else compute)
    cores = len(os.sched_getaffinity(0))
    workers = min(CUDA_DECODE_WORKERS if cuda else torch.get_num_threads(), cores, len(batches))
    workers = workers if may_fork() and workers > (0 if cuda else 1) else 0
    spread = workers > 0 and not cuda
    loader = DataLoader(
        batches,
        batch_size=None,  # an item is a whole batch
        sampler=[len(batches) - 1, *range(len(batches) - 1)] if spread else None,  # the short batch first
        num_workers=workers,
        prefetch_factor=(CUDA_PREFETCH if cuda else CPU_PREFETCH) if workers else None,
        pin_memory=cuda,
        multiprocessing_context="fork" if workers else None,
        generator=torch.Generator(),  # the workers' seeds, drawn without touching the global generator
        in_order=not spread,  # CPU workers' batches come as they finish, reordered below
    )
    waiting: dict[int, Any] = {}  # batches that finished before an earlier one
    next_index = 0
    iterator = iter(loader)
    try:
        for index, item in iterator:
            waiting[index] = item
            while next_index in waiting:
                item = waiting.pop(next_index)
                next_index += 1
                yield compute(item) if cuda else item
    finally:
        # Workers stop now, also when a batch failed or the caller stopped early: left to the garbage collector
        # (the error's traceback holds the iterator), their shutdown ran whenever a later allocation collected
        # it, waiting 5 s per worker there (torch's worker-status interval). The multi-process iterator has no
        # public close; the in-process one has nothing to stop.
        getattr(iterator, "_shutdown_workers", lambda: None)()
