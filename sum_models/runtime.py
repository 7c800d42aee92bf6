"""Process-level runtime helpers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily sets torch's intra-op thread count (process-global; not for concurrent callers).

    The SUM model's tensors are small: on a shared machine one thread is several times faster than two
    (OpenMP threads spin-wait for each other when cores are busy).

    Args:
        num_threads: Threads to use inside the block; None leaves torch's setting alone.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
