"""Weights files: reading PyTorch ``.pth`` / ``.ckpt`` files safely (tensors only, never executing pickled
code), and assigning a state dict to a model built on the meta device, strictly."""

import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from ...fp8.checkpoint import CheckpointError, check_finite, read_header
from ...fp8.errors import OutputError
from ...fp8.writer import SafetensorsWriter
from .pickle_scan import PickleScan, scan_pickle

# Where training checkpoints keep their weights, in order of preference (the Turbo VAE: ema_state_dict).
STATE_KEYS = ("ema_state_dict", "state_dict", "model")


# What torch.load raises on a file that passed the opcode scan but still cannot be read (damaged storages).
UNREADABLE = (
    RuntimeError,
    EOFError,
    OSError,
    IndexError,
    KeyError,
    ValueError,
    zipfile.BadZipFile,
    struct.error,
)


def load_torch_file(path: str | Path) -> dict:
    """The object in a torch.save file, loaded with ``weights_only=True`` (tensors, dicts, lists, numbers and
    strings only) and memory-mapped where the file format allows. A file whose pickle would import anything
    else is refused, naming what, before torch reads it; a damaged file is told apart from such a refusal."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        read_header(path)  # raises the LFS-pointer message
    scan = scan_pickle(path)
    if scan.code:
        raise CheckpointError(
            f"{path}: refused to load: unpickling it would import and call {_names(scan.code)}, which could "
            "run code. If you trust its source, convert it once with `python cli.py convert-pickle --input "
            f"{path} --output <file>.safetensors --trust-pickle` and use that file."
        )
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written before torch's zip format cannot be memory-mapped: read them whole (still safe).
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load ({str(e).splitlines()[0]})") from None
    except UNREADABLE as e:
        raise CheckpointError(
            f"{path}: unreadable or truncated PyTorch file ({type(e).__name__}: {e}). Re-download it."
        ) from None


def _names(globals_: tuple[str, ...]) -> str:
    shown = ", ".join(globals_[:8])
    return shown + (f" and {len(globals_) - 8} more" if len(globals_) > 8 else "")


def convert_pickle(
    source: str | Path, output: str | Path, trust: bool = False, overwrite: bool = False
) -> tuple[int, PickleScan]:
    """Rewrite a ``.pth``/``.ckpt`` as a ``.safetensors`` of its weights (from ``ema_state_dict``,
    ``state_dict`` or ``model`` when present, else the top level). The globals the file would import are
    listed first (:func:`scan_pickle`, nothing is run); a file that imports more than tensor rebuilders is
    only unpickled with ``trust`` (that *runs* its code). The output appears under its name only when complete
    and never replaces an existing file unless ``overwrite``. Returns (number of tensors, the scan)."""
    source, output = Path(source), Path(output)
    if output.suffix != ".safetensors":
        raise OutputError(f"{output}: the output must end in .safetensors")
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; choose another name")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; give --overwrite to replace it, or choose another name")
    scan = scan_pickle(source)
    if scan.code and not trust:
        raise CheckpointError(
            f"{source}: not converted: unpickling it would import and call {_names(scan.code)}. This runs "
            "code from the file; only if you trust its source, rerun with --trust-pickle."
        )
    try:
        raw = torch.load(source, map_location="cpu", weights_only=not scan.code)
    except (ImportError, AttributeError) as e:  # the pickle names classes from code not installed here
        raise CheckpointError(f"{source}: needs code that is not installed here ({e})") from None
    except (pickle.UnpicklingError, *UNREADABLE) as e:
        raise CheckpointError(
            f"{source}: unreadable or truncated PyTorch file ({type(e).__name__}: {e}). Re-download it."
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a dict of weights, found {type(raw).__name__}")
    state = next((raw[key] for key in STATE_KEYS if isinstance(raw.get(key), dict)), raw)
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {sorted(map(str, raw))[:8]})")
    for key, tensor in tensors.items():
        check_finite(tensor, tensor, f"{source}: '{key}'")
    layout = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()}
    with SafetensorsWriter(output, layout) as writer:  # written as <output>.partial, renamed when complete
        for key in writer.order:
            writer.write(key, tensors[key])
    return len(tensors), scan


def assign_weights(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, what: str, device, dtype: torch.dtype
) -> nn.Module:
    """Load ``state`` into ``model`` (built on the meta device) converted to ``dtype`` on ``device``; any
    missing, unexpected or mis-shaped key is an error naming ``source`` and the key."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise CheckpointError(
            f"{source}: not {what}: {first} ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for key, tensor in state.items():
        check_finite(tensor, tensor, f"{source}: '{key}'")
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: '{key}' has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
