"""The loop's input: its micro-batches, gathered in a background thread, a chunk of them at a time, ahead of the step.

`Batches` walks the mixture plan (core.data.blocks.mixture_plan) from a start step in the loop's order (step, then
micro-batch; this worker's positions, raycpt.core.data.blocks.worker_positions). A thread gathers the blocks of the next
`chunk` micro-batches from the memory-mapped corpora into one of two reused host buffers (pinned on CUDA), with one
indexed read per corpus, while the loop trains on the chunk before; `next()` copies one micro-batch of it to the
device (non-blocking from pinned memory on CUDA) and hands the buffer back once the chunk's copies are done. A chunk
per wake-up, not a batch: the thread's Python work holds the GIL the loop's thread needs, so it is done once per
chunk (the copies themselves, and the disk reads of blocks not in the page cache, run without the GIL).

The blocks and their order are the plan's, so a resumed run (started at its checkpoint's step) draws what the
uninterrupted run drew. The thread ends with `close()` (or the `with` block); an error in it is raised by the
`next()` that would have returned its batch, as the original exception.

With `with_general=True` (distillation, `train.distill_weight`) each micro-batch comes with its rows' flags, True for
a general replay row: (the same ids, a bool [micro_batch] tensor on the CPU, read from the plan: no device sync).

A third corpus, the synthetic one (data.synthetic; raycpt.core.data.blocks.synthetic_plan), comes with its own flags,
`is_synthetic`: a synthetic position is on the domain side of the plan (is_domain True) and reads the synthetic
corpus instead of the domain one. Its rows are domain-side rows: not general, counted in `domain_blocks`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raycpt.core.data.blocks import worker_positions

THREAD_NAME = "raycpt-batches"
CHUNK_BYTES = 16 * 2**20
"""At most this many bytes of token ids per chunk (int64), and at most `Batches.chunk` micro-batches."""


def gather_blocks(domain: Any, general: Any, from_domain: np.ndarray, index: np.ndarray, out: np.ndarray,
                  synthetic: Any = None, from_synthetic: np.ndarray | None = None) -> None:
    """out[j] = (domain if from_domain[j] else general)[index[j]] for every row j, one indexed read per corpus.
    `domain` / `general`: [n, block_size] arrays or raycpt.core.data.shards.ShardedBlocks (both take an integer array of
    rows). With `from_synthetic` (a subset of from_domain), those rows read `synthetic` instead of `domain`."""
    sources = ((domain, from_domain), (general, ~from_domain))
    if from_synthetic is not None:
        sources = ((domain, from_domain & ~from_synthetic), (general, ~from_domain), (synthetic, from_synthetic))
    for corpus, rows in sources:
        if rows.any():
            out[rows] = corpus[index[rows]]


class _Failed:
    """What the thread queues instead of a chunk when gathering raised: the exception itself."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # queued after the plan's last chunk


class Batches(Iterator[Any]):
    """This worker's micro-batches from `start_step` to `steps`, as int64 [micro_batch, block_size] tensors on
    `device`, gathered ahead in a background thread, `chunk` micro-batches at a time (fewer for long blocks:
    CHUNK_BYTES). `domain_blocks` counts the domain-side blocks (real and synthetic) among those handed out so far,
    `synthetic_blocks` the synthetic ones among them. `with_general`: yield (ids, is_general) pairs instead,
    is_general a bool [micro_batch] CPU tensor (True: the row is general replay; a synthetic row is not).
    `synthetic`, `is_synthetic`: the synthetic corpus and the plan's flags for it (core.data.blocks.synthetic_plan);
    None: two corpora, as before. Use as a context manager (or call `close()`): the thread never outlives it."""

    def __init__(self, domain: Any, general: Any, is_domain: np.ndarray, index: np.ndarray, *, start_step: int,
                 steps: int, rank: int, world_size: int, micro_batch: int, grad_accum: int,
                 device: torch.device | str, chunk: int = 8, with_general: bool = False, synthetic: Any = None,
                 is_synthetic: np.ndarray | None = None) -> None:
        self.device = torch.device(device)
        self.with_general = with_general
        layout = dict(rank=rank, world_size=world_size, batch_size=micro_batch, grad_accum=grad_accum)
        if steps > start_step:
            end = worker_positions(steps - 1, grad_accum - 1, **layout).stop
            if end > len(is_domain):
                raise ValueError(f"the mixture plan holds {len(is_domain)} positions; step {steps - 1} needs {end}")
        self.domain_blocks = 0
        self.synthetic_blocks = 0
        self._plan = (domain, general, is_domain, index, synthetic, is_synthetic)
        self._layout = layout
        self._micro_batches = range(start_step * grad_accum, steps * grad_accum)  # step * grad_accum + micro
        width = domain.shape[1]
        self._chunk = max(1, min(chunk, CHUNK_BYTES // (8 * micro_batch * width)))
        # Two chunk buffers: the thread fills one while the loop copies micro-batches out of the other. A buffer
        # goes from `_free` to the thread, is filled and queued on `_ready`, and comes back to `_free` with the
        # event that marks its last device copy done (None: done already) once the loop has taken all of it.
        pinned = self.device.type == "cuda"
        self._free: queue.Queue = queue.Queue()
        for _ in range(2):
            self._free.put((torch.empty((self._chunk * micro_batch, width), dtype=torch.int64, pin_memory=pinned),
                            None))
        self._ready: queue.Queue = queue.Queue()
        # the chunk being handed out, its domain-side and synthetic counts, its rows' general flags [count, micro_batch]
        self._current: tuple[torch.Tensor, list[int], list[int], torch.Tensor] | None = None
        self._taken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._gather, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _gather(self) -> None:
        domain, general, is_domain, index, synthetic, is_synthetic = self._plan
        layout, grad_accum, batch = self._layout, self._layout["grad_accum"], self._layout["batch_size"]
        try:
            for first in range(self._micro_batches.start, self._micro_batches.stop, self._chunk):
                item = self._free.get()
                if item is None or self._stop.is_set():
                    return
                host, copied = item
                if copied is not None:
                    copied.synchronize()  # the last device copy out of this buffer has finished
                count = min(self._chunk, self._micro_batches.stop - first)
                pos = np.r_[tuple(worker_positions(*divmod(m, grad_accum), **layout)
                                  for m in range(first, first + count))]
                from_domain = is_domain[pos]
                from_synthetic = is_synthetic[pos] if is_synthetic is not None else None
                gather_blocks(domain, general, from_domain, index[pos], host.numpy()[:count * batch],
                              synthetic=synthetic, from_synthetic=from_synthetic)
                rows = from_domain.reshape(count, batch)
                synthetic_counts = (from_synthetic.reshape(count, batch).sum(axis=1).tolist()
                                    if from_synthetic is not None else [0] * count)
                self._ready.put((host, rows.sum(axis=1).tolist(), synthetic_counts, torch.from_numpy(~rows)))
            self._ready.put(_END)
        except BaseException as err:  # raised again in the loop's thread, by next()
            self._ready.put(_Failed(err))

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._current is None or self._taken == len(self._current[1]):
            self._release()
            item = self._ready.get()
            if item is _END or isinstance(item, _Failed):
                self._ready.put(item)  # and again on a later call: never a batch past the end or the error
                if item is _END:
                    raise StopIteration
                raise item.error
            self._current, self._taken = item, 0
        host, counts, synthetic_counts, general = self._current
        batch = self._layout["batch_size"]
        input_ids = host[self._taken * batch:(self._taken + 1) * batch].to(self.device, non_blocking=True, copy=True)
        self.domain_blocks += counts[self._taken]
        self.synthetic_blocks += synthetic_counts[self._taken]
        self._taken += 1
        return (input_ids, general[self._taken - 1]) if self.with_general else input_ids

    def _release(self) -> None:
        """Hand the chunk being handed out back to the thread, with an event after its last device copy."""
        if self._current is None:
            return
        copied = None
        if self.device.type == "cuda":  # the copies were queued on the target device's current stream
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self._free.put((self._current[0], copied))
        self._current = None

    def close(self) -> None:
        """Stop the thread and wait for it (a chunk it is gathering is finished first)."""
        self._stop.set()
        self._free.put(None)
        self._thread.join()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
