"""What a PyTorch ``.pth`` / ``.ckpt`` would import if it were unpickled, read from its opcodes without
running any of them. Tells a file that carries code (globals outside the tensor-rebuilding set) apart from
one that is not a pickle at all, or is cut short."""

import io
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ...fp8.checkpoint import CheckpointError

# Globals a plain torch.save of tensors uses; all else is a callable that unpickling would import and call.
TENSOR_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state"}  # fmt: skip
PLAIN_GLOBALS = {"collections.OrderedDict", "torch.Size", "torch.device"}
STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
              "BINUNICODE8"}  # fmt: skip
MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, storage keys; raw storage bytes follow
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class PickleScan:
    path: Path
    globals: tuple[str, ...]  # "module.name" of every global the file imports, in first-use order

    @property
    def code(self) -> tuple[str, ...]:
        """The globals beyond tensor storage and rebuilding: what makes loading the file run code."""
        return tuple(name for name in self.globals if not is_tensor_global(name))


def is_tensor_global(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if name in PLAIN_GLOBALS or (module == "torch._utils" and attribute in TENSOR_REBUILDERS):
        return True
    if module == "torch":  # storage classes and dtypes (torch.FloatStorage, torch.bfloat16)
        return attribute.endswith("Storage") or isinstance(getattr(torch, attribute, None), torch.dtype)
    return False


def scan_pickle(path: str | Path) -> PickleScan:
    """The globals of a torch.save file (zip archive or legacy format) or a plain pickle. A file that is not
    a pickle, a damaged archive or a truncated pickle is a :class:`CheckpointError` saying which."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes). Re-download it.")
    with path.open("rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(names) != 1:
                    raise CheckpointError(
                        f"{path}: a zip archive but not a PyTorch file (no single data.pkl inside; found "
                        f"{archive.namelist()[:5]})"
                    )
                streams = [io.BytesIO(archive.read(names[0]))]
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(
                f"{path}: damaged or truncated PyTorch archive ({e}). Re-download it."
            ) from None
        return PickleScan(path, _globals(path, streams[0], 1))
    with path.open("rb") as f:
        return PickleScan(path, _globals(path, f, LEGACY_PICKLES))


def _globals(path: Path, stream, count: int) -> tuple[str, ...]:
    """Globals of up to ``count`` consecutive pickles in ``stream`` (stops cleanly at the end of the data)."""
    found: dict[str, None] = {}
    for index in range(count):
        if index and _at_end(stream):
            break
        try:
            for name in _pickle_globals(stream):
                found.setdefault(name)
        except ValueError as e:
            if index > 3:  # past a legacy file's object pickle
                break
            truncated = any(word in str(e) for word in ("exhausted", "not enough data", "remain"))
            raise CheckpointError(
                f"{path}: "
                + (
                    "truncated: the pickle ends before its STOP opcode. Re-download it."
                    if truncated
                    else f"not a PyTorch file or pickle, or damaged ({e}). Re-download it."
                )
            ) from None
    return tuple(found)


def _at_end(stream) -> bool:
    position = stream.tell()
    at_end = not stream.read(1)
    stream.seek(position)
    return at_end


def _pickle_globals(stream):
    """Yield "module.name" for every GLOBAL, INST and STACK_GLOBAL of one pickle. STACK_GLOBAL takes its two
    names from the stack, so string pushes and the memo are followed; what cannot be resolved is named."""
    memo: dict[int, object] = {}
    strings: list[object] = []  # values of the string pushes and memo reads, most recent last
    top = None  # the value on top of the stack when it is a string we know, else None
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            yield str(arg).replace(" ", ".", 1)
            top = None
        elif name == "STACK_GLOBAL":
            module, attribute = strings[-2:] if len(strings) >= 2 else [None, None]
            if isinstance(module, str) and isinstance(attribute, str):
                yield f"{module}.{attribute}"
            else:
                yield "<a global built at load time>"
            top = None
        elif name in ("EXT1", "EXT2", "EXT4"):
            yield f"<copyreg extension {arg}>"
            top = None
        elif name in STRING_OPS:
            top = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            strings.append(top)
        elif name in MEMO_PUTS:
            memo[arg] = top
        elif name == "MEMOIZE":
            memo[len(memo)] = top
        elif name in MEMO_GETS:
            top = memo.get(arg)
            strings.append(top)
        elif name != "FRAME":
            top = None
