"""Reading a tensor's bytes from a file into CPU memory the tensor owns, as fast as the page cache allows.

Plain reads, not a memory map: a mapped read faults in every page twice (the map's and the destination's)
and a tensor that views the map keeps the whole mapping resident. What a load costs beyond a raw read is
the kernel copy and the first touch of fresh destination pages; both run in several threads (``readinto``
releases the GIL), and on Linux the destination is advised to transparent huge pages first (one fault per
2 MiB instead of per 4 KiB); BENCHMARKS.md (DiT loading) has the times.
"""

import ctypes
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import CheckpointError

PIECE_BYTES = 64 * 2**20  # one read call; also the unit of work of the reading threads
READ_THREADS = 4  # reads wait on page faults and copies: a few threads help even on 2 cores
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back the untouched pages of [address, address + nbytes) with transparent huge pages
    (advice: ignored where THP is off; nothing to do on other systems)."""
    if not sys.platform.startswith("linux") or nbytes < 4 * HUGE_PAGE:
        return
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    length = (address + nbytes - start) // HUGE_PAGE * HUGE_PAGE
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_HUGEPAGE)


def _read_range(file: Path, offset: int, view: memoryview, key: str) -> None:
    with file.open("rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            count = f.readinto(view[done : done + PIECE_BYTES])
            if not count:
                raise CheckpointError(f"{file}: truncated while reading '{key}'")
            done += count


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
    _in_parallel(lambda s: _read_range(file, offset + s, view[s : s + PIECE_BYTES], key), starts)


def read_rows(file: Path, offset: int, out: torch.Tensor, key: str) -> None:
    """Fill the 2-D CPU view ``out`` [rows, cols] (rows strided inside a wider buffer, e.g. a padded weight)
    with the row-major tensor stored at ``offset``: blocks of rows are read into a bounce buffer each and
    copied into their rows."""
    rows, cols = out.shape
    row_bytes = cols * out.element_size()
    _advise_huge_pages(out.data_ptr(), rows * out.stride(0) * out.element_size())
    step = max(1, PIECE_BYTES // 4 // row_bytes)

    def block(first: int) -> None:
        last = min(rows, first + step)
        bounce = torch.empty((last - first, cols), dtype=out.dtype)
        view = memoryview(bounce.view(torch.uint8).numpy()).cast("B")
        _read_range(file, offset + first * row_bytes, view, key)
        out[first:last].copy_(bounce)

    _in_parallel(block, list(range(0, rows, step)))
