"""Safetensors checkpoints on disk: one file or a sharded folder with an index, validated and read lazily.

Every tensor is read on demand straight into memory it owns, in the caller's dtype and on the caller's device
(or into a buffer the caller provides), so no full-size copy of a checkpoint is ever held and nothing keeps a
file's memory map alive after loading. Problems are reported as :class:`CheckpointError`
naming the file and, where it applies, the key, what was expected and what was found.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .file_reads import read_contiguous, read_rows

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
LFS_POINTER_PREFIX = b"version https://git-lfs"
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """What a file's header says about one tensor, read without touching its data."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # of the data in the file, in bytes from the start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header into ({key: TensorInfo}, __metadata__); detect LFS pointers, truncation."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if (head + f.read(len(LFS_POINTER_PREFIX) - 8)).startswith(LFS_POINTER_PREFIX):
            raise CheckpointError(
                f"{path}: this is a Git LFS pointer ({size} bytes), not the weights. Download the real file "
                "(e.g. `git lfs pull` in its repository, or `python cli.py download`)."
            )
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        f.seek(8)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: not a safetensors file or truncated (header claims {header_len} bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise CheckpointError(
                f"{path}: unreadable safetensors header ({reason}). Re-download this file."
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object of "
            "tensors. Re-download this file."
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map names to strings, found {metadata!r:.80}")
    infos = {key: _tensor_info(path, key, entry, 8 + header_len) for key, entry in header.items()}
    _check_layout(path, header, 8 + header_len, size)
    return infos, metadata


def _tensor_info(path: Path, key: str, entry, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, and byte offsets that span
    exactly dtype size x element count (what the safetensors reader would otherwise fail on, unnamed)."""
    where = f"{path}: tensor '{key}'"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(
            f"{where}: expected an object with 'dtype', 'shape' and 'data_offsets', found {entry!r:.80}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise CheckpointError(
            f"{where}: 'shape' must be a list of non-negative integers, found {shape!r:.80}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(n) for n in offsets)):
        raise CheckpointError(f"{where}: 'data_offsets' must be [begin, end] integers, found {offsets!r:.80}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: 'data_offsets' {offsets} span {end - begin} bytes, but {dtype} x {shape} needs "
            f"{expected}. The file is damaged: re-download it."
        )
    return TensorInfo(key, path, DTYPES[dtype], tuple(shape), expected, data_start + begin)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, header: dict, data_start: int, size: int) -> None:
    """Tensors must tile the data section back to back from byte 0 to its end, as safetensors requires."""
    position = 0
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor '{key}' starts at byte {begin} of the data, expected {position} (tensors "
                "overlap or leave a gap). The file is damaged: re-download it."
            )
        position = end
    if size < data_start + position:
        raise CheckpointError(
            f"{path}: truncated: the header describes {data_start + position} bytes but the file has {size}. "
            "Re-download this file."
        )
    if size > data_start + position:
        raise CheckpointError(
            f"{path}: {size - data_start - position} unexpected bytes after the last tensor (the header "
            f"describes {data_start + position}). The file is damaged: re-download it."
        )


def check_finite(tensor: torch.Tensor, stored: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf in a high-precision tensor (FP8 data is checked through its scales): one reduction per
    tensor as it loads, so a damaged file is named here instead of turning a whole clip into noise."""
    if not tensor.is_floating_point() or tensor.element_size() < 2 or bool(torch.isfinite(tensor.sum())):
        return  # a NaN or Inf anywhere makes the sum non-finite; a sum is ~50x faster than isfinite().all()
    if bool(torch.isfinite(tensor).all()):
        return  # only the sum overflowed (fp16): the values themselves are fine
    if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
        raise CheckpointError(
            f"{where} holds NaN or Inf values: the file is damaged. Re-download it (`python cli.py download` "
            "fetches the published files)."
        )
    raise CheckpointError(
        f"{where}: its values overflow {tensor.dtype} (Inf after conversion from {stored.dtype}); load it in "
        "a wider dtype"
    )


def find_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder}: several index files ({', '.join(p.name for p in indexes)}); keep one"
        )
    return indexes[0] if indexes else None


class Checkpoint:
    """A validated safetensors checkpoint: a single ``.safetensors`` file, or a folder with one file or with
    ``*.safetensors.index.json`` plus shards. Headers are read eagerly; tensor data lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index_metadata: dict = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        index = self._locate()
        if index is None:
            self._add_file(self.files[0])
        else:
            self._read_index(index)

    def _locate(self) -> Path | None:
        path = self.path
        if path.is_file() and path.name.endswith(".index.json"):
            self.files = []
            return path
        if path.is_file():
            self.files = [path]
            return None
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such file or folder")
        index = find_index(path)
        if index is not None:
            self.files = []
            return index
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(p.name for p in files) or "no .safetensors files"
            raise CheckpointError(
                f"{path}: expected model.safetensors.index.json with its shards, or exactly one .safetensors "
                f"file; found {found}"
            )
        self.files = files
        return None

    def _add_file(self, file: Path) -> dict[str, TensorInfo]:
        infos, metadata = read_header(file)
        self.file_metadata[file] = metadata
        for key, info in infos.items():
            if key in self._infos:
                raise CheckpointError(f"{file}: key '{key}' also appears in {self._infos[key].file.name}")
            self._infos[key] = info
        return infos

    def _read_index(self, index: Path) -> None:
        try:
            content = json.loads(index.read_text())
            weight_map = content["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        self.index_metadata = content.get("metadata") or {}
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard, keys in sorted(shards.items()):
            file = index.parent / shard
            if not file.exists():
                raise CheckpointError(
                    f"{file}: shard listed in {index.name} is missing ({len(keys)} tensors)"
                )
            self.files.append(file)
            infos = self._add_file(file)
            for key in keys:
                if key not in infos:
                    raise CheckpointError(
                        f"{file}: {index.name} places '{key}' in this shard, but it is absent"
                    )
            unlisted = sorted(set(infos) - set(keys))
            if unlisted:
                raise CheckpointError(
                    f"{file}: holds {len(unlisted)} tensors that {index.name} does not list (first: "
                    f"'{unlisted[0]}'); the index is out of date"
                )

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise CheckpointError(f"{self.path}: no tensor '{key}'")
        return self._infos[key]

    @property
    def metadata(self) -> dict[str, str]:
        """Header ``__metadata__`` of all files merged (shards normally agree), then the index metadata."""
        merged: dict = {}
        for metadata in self.file_metadata.values():
            merged.update(metadata)
        merged.update(self.index_metadata)
        return merged

    def load(
        self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor in memory of its own, converted straight to ``dtype`` on ``device`` (never a view of the
        file's memory map, which would keep the whole mapping resident as long as the tensor lives)."""
        info = self.info(key)
        out = self.load_into(key, torch.empty(info.shape, dtype=dtype or info.dtype, device=device))
        if out.device.type != "meta":  # meta tensors (the memory model) have no values to check
            check_finite(out, self.mapped(key), f"{info.file}: '{key}'")
        return out

    def load_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor into ``out`` (any device and dtype, possibly a strided view of a larger buffer,
        e.g. a padded weight), by plain reads where ``out`` is CPU memory of the stored dtype (straight into
        it when contiguous, through a bounce buffer of a few rows when row-strided); returns ``out``."""
        info = self.info(key)
        if tuple(out.shape) != info.shape:
            raise CheckpointError(f"{info.file}: '{key}' is {list(info.shape)}, not {list(out.shape)}")
        if not info.nbytes:
            return out
        if out.device.type == "cpu" and out.dtype == info.dtype and out.is_contiguous():
            read_contiguous(info.file, info.offset, out, key)
        elif out.device.type == "cpu" and out.dtype == info.dtype and out.dim() == 2 and out.stride(1) == 1:
            read_rows(info.file, info.offset, out, key)  # a padded weight's [E·N, K] view
        else:
            out.copy_(self.mapped(key))
        return out

    def mapped(self, key: str) -> torch.Tensor:
        """A view of one tensor in its file's memory map, in the stored dtype, for consumers that stream
        through it and drop it (the converter): keeping it keeps the mapping's pages resident."""
        info = self.info(key)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="pt")
        return handle.get_tensor(key)

    def release(self, file: Path) -> None:
        """Drop the memory map of one file (tensors loaded from it own their memory and stay valid)."""
        self._handles.pop(file, None)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
