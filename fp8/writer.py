"""Writing one safetensors file tensor by tensor, so that a converter holds one tensor in memory, not a file.

The header is computed up front from the planned dtypes and shapes; tensors are then appended in header order.
The file appears under its name only when complete (it is written as ``<name>.partial`` until then).
"""

import json
import math
import struct
from pathlib import Path

import torch

from .checkpoint import DTYPES

SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsWriter:
    """``layout`` maps each key to (dtype, shape). Call :meth:`write` for every key in ``self.order``."""

    def __init__(
        self,
        path: str | Path,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.layout = layout
        # Wider elements first, so every tensor starts at a multiple of its element size (safetensors allows
        # no gaps between tensors, and misaligned float data is slow or refused by some readers).
        self.order = sorted(layout, key=lambda key: (-layout[key][0].itemsize, key))
        header, offset = {}, 0
        for key in self.order:
            dtype, shape = layout[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": SAFETENSORS_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.nbytes = offset  # tensor data only, the figure an index's total_size sums
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = self._partial.open("wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._written = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._written] if self._written < len(self.order) else None
        dtype, shape = self.layout.get(key, (None, None))
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path.name}: expected '{expected}' {dtype} {shape} next, got '{key}' "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        # Little-endian bytes as safetensors requires (the native order of x86 and ARM).
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._written += 1

    def skip(self, key: str) -> None:
        """Leave the next tensor's bytes unwritten (a hole that reads as zeros, using no disk space): for
        files whose data are never read, such as the memory model's full-size checkpoint."""
        if key != self.order[self._written]:
            raise ValueError(f"{self.path.name}: expected '{self.order[self._written]}' next, got '{key}'")
        dtype, shape = self.layout[key]
        self._file.seek(math.prod(shape) * dtype.itemsize, 1)
        self._written += 1

    def close(self) -> None:
        if self._written != len(self.order):
            self.abort()
            raise ValueError(
                f"{self.path.name}: {len(self.order) - self._written} planned tensors were not written"
            )
        self._file.truncate()  # the end of the data, if the last tensors were skipped
        self._file.close()
        self._partial.replace(self.path)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
