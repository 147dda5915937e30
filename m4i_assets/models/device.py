"""Where the model adapters run: one rule for CLIPs, captioners and attack models."""

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def device_for(preferred: str | None = None) -> torch.device:
    """`cuda` when present (or the device asked for), else `cpu`."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def deterministic_training(threads: int | None) -> Iterator[None]:
    """Run a training with `threads` torch threads (None: leave them) and deterministic algorithms, so that
    its checkpoint's bytes depend on neither the host's cores nor on running in a worker process or in the
    caller's (CPU kernels split reductions by thread count). On CUDA, cuBLAS needs a fixed workspace for
    determinism; it is set here when unset. The caller's thread count and algorithm mode are restored."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before_threads, before_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        torch.use_deterministic_algorithms(before_mode)


def trains_deterministically(fn: Callable) -> Callable:
    """Run `fn` under `deterministic_training` with its own `threads` argument."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with deterministic_training(signature.bind(*args, **kwargs).arguments.get("threads")):
            return fn(*args, **kwargs)

    return run
