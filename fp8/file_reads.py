"""Reading a tensor's bytes from a file into CPU memory the tensor owns, as fast as the page cache allows.

Plain reads, not a memory map: a mapped read faults in every page twice (the map's and the destination's)
and a tensor that views the map keeps the whole mapping resident. What a load costs beyond a raw read is
the kernel copy and the first touch of fresh destination pages; both run in several threads (the reads
release the GIL), and on Linux the destination is advised to transparent huge pages first (one fault per
2 MiB instead of per 4 KiB). A row-strided destination (a padded weight) is read straight into its rows,
up to IOV_MAX rows per scatter read (``preadv``) where the system has it: a bounce buffer adds a copy
and, allocated fresh, a first touch of its own. BENCHMARKS.md (DiT loading) has the times."""

import ctypes
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import torch

from .errors import CheckpointError

PIECE_BYTES = 64 * 2**20  # one read call; also the unit of work of the reading threads
READ_THREADS = 4  # reads wait on page faults and copies: a few threads help even on 2 cores
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
# Views one read call fills: scatter reads (preadv) where the system has them (not Windows), IOV_MAX at most.
SCATTER_VIEWS = os.sysconf("SC_IOV_MAX") if hasattr(os, "preadv") else 1


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back the untouched pages of [address, address + nbytes) with transparent huge pages
    (advice: ignored where THP is off; nothing to do on other systems)."""
    if not sys.platform.startswith("linux") or nbytes < 4 * HUGE_PAGE:
        return
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    length = (address + nbytes - start) // HUGE_PAGE * HUGE_PAGE
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_HUGEPAGE)


def _read_at(f, views: list[memoryview], offset: int) -> int:
    if SCATTER_VIEWS > 1:
        return os.preadv(f.fileno(), views, offset)
    f.seek(offset)
    return f.readinto(views[0])


def _fill(file: Path, offset: int, views: list[memoryview], key: str) -> None:
    """Fill ``views`` one after the other with the bytes stored from ``offset`` on: up to SCATTER_VIEWS of
    them per system call."""
    with file.open("rb", buffering=0) as f:
        pending = deque(views)
        while pending:
            count = _read_at(f, list(islice(pending, SCATTER_VIEWS)), offset)
            if not count:
                raise CheckpointError(f"{file}: truncated while reading '{key}'")
            offset += count
            while count:  # drop the views this call filled; a partly filled one keeps its rest
                view = pending.popleft()
                if count < len(view):
                    pending.appendleft(view[count:])
                    break
                count -= len(view)


def _in_parallel(work, items: list) -> None:
    if len(items) == 1 or READ_THREADS == 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        for _ in pool.map(work, items):  # re-raises the first failure
            pass


def read_contiguous(file: Path, offset: int, out: torch.Tensor, key: str) -> None:
    """Fill the contiguous CPU tensor ``out`` with its ``out.nbytes`` bytes stored at ``offset``."""
    _advise_huge_pages(out.data_ptr(), out.nbytes)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
    starts = list(range(0, len(view), PIECE_BYTES))
    _in_parallel(lambda s: _fill(file, offset + s, [view[s : s + PIECE_BYTES]], key), starts)


def read_rows(file: Path, offset: int, out: torch.Tensor, key: str) -> None:
    """Fill the 2-D CPU view ``out`` [rows, cols] (rows strided inside a wider buffer, e.g. a padded weight)
    with the row-major tensor stored at ``offset``, each row read straight into its place and the bytes
    between rows left alone; blocks of about ``PIECE_BYTES`` of rows go to the reading threads."""
    rows, cols = out.shape
    row_bytes, stride_bytes = cols * out.element_size(), out.stride(0) * out.element_size()
    span = (rows - 1) * stride_bytes + row_bytes  # from the first row's start to the last row's end
    _advise_huge_pages(out.data_ptr(), span)
    flat = out.view(torch.uint8).as_strided((span,), (1,))
    memory = memoryview(flat.numpy()).cast("B")
    step = max(1, PIECE_BYTES // row_bytes)

    def block(first: int) -> None:
        starts = range(first * stride_bytes, min(rows, first + step) * stride_bytes, stride_bytes)
        _fill(file, offset + first * row_bytes, [memory[s : s + row_bytes] for s in starts], key)

    _in_parallel(block, list(range(0, rows, step)))
