"""An out-of-memory error halves the batch and retries; other errors pass through."""

from __future__ import annotations

import pytest
import torch

from workers.dissection import with_batch_backoff


def test_out_of_memory_halves_the_batch_until_it_fits():
    tried = []

    def run(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_size

    assert with_batch_backoff(run, 64) == 8
    assert tried == [64, 32, 16, 8]


def test_out_of_memory_at_batch_one_is_raised():
    def run(batch_size: int) -> int:
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        with_batch_backoff(run, 4)


def test_other_errors_are_not_retried():
    tried = []

    def run(batch_size: int) -> int:
        tried.append(batch_size)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        with_batch_backoff(run, 32)
    assert tried == [32]
