"""Safetensors checkpoints on disk: one file or a sharded folder with an index, validated and read lazily.

Every tensor is read from a memory-mapped file on demand and converted straight to the caller's dtype and
device, so no full-size copy of a checkpoint is ever held. Problems are reported as :class:`CheckpointError`
naming the file and, where it applies, the key, what was expected and what was found.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used as it is; the message says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    """What a file's header says about one tensor, read without touching its data."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    infos, data_end = {}, 0
    for key, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos[key] = TensorInfo(key, path, DTYPES[entry["dtype"]], tuple(entry["shape"]), end - begin)
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated: the header describes {expected} bytes but the file has {size}. "
            "Re-download this file."
        )
    return infos, metadata


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
        """Read one tensor from its memory-mapped file, converted straight to ``dtype`` on ``device``."""
        info = self.info(key)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="pt")
        tensor = handle.get_tensor(key)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def release(self, file: Path) -> None:
        """Drop the memory map of one file (tensors already loaded from it stay valid)."""
        self._handles.pop(file, None)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
