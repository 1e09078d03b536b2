"""Weights files: reading PyTorch ``.pth`` / ``.ckpt`` files safely (tensors only, never executing pickled
code), and assigning a state dict to a model built on the meta device, strictly."""

import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ...fp8.checkpoint import CheckpointError, read_header

# Where training checkpoints keep their weights, in order of preference (the Turbo VAE: ema_state_dict).
STATE_KEYS = ("ema_state_dict", "state_dict", "model")


def load_torch_file(path: str | Path) -> dict:
    """The object in a torch.save file, loaded with ``weights_only=True`` (tensors, dicts, lists, numbers and
    strings only) and memory-mapped where the file format allows. Anything else in the pickle is refused
    without running it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        read_header(path)  # raises the LFS-pointer message
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects other than tensors, which could run "
            f"code when loaded ({str(e).splitlines()[0]}). If you trust its source, convert it once with "
            f"`python cli.py convert-pickle --input {path} --output <file>.safetensors` and use that file."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        if "mmap" in str(e):
            # Files written before torch's zip format cannot be memory-mapped: read them whole (still safe).
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as inner:
                raise CheckpointError(f"{path}: refused to load ({inner})") from None
        raise CheckpointError(
            f"{path}: unreadable or truncated PyTorch file ({e}). Re-download it."
        ) from None


def convert_pickle(source: str | Path, output: str | Path) -> int:
    """Rewrite a ``.pth``/``.ckpt`` that :func:`load_torch_file` refuses as a ``.safetensors`` of its weights
    (from ``ema_state_dict``, ``state_dict`` or ``model`` when present, else the top level). This *runs* the
    file's pickled code: only for files from a source the user trusts. Returns the number of tensors."""
    source, output = Path(source), Path(output)
    try:
        raw = torch.load(source, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, ImportError, AttributeError, EOFError, RuntimeError) as e:
        # ImportError/AttributeError: the pickle names classes from code that is not installed here.
        raise CheckpointError(f"{source}: cannot be read even with full unpickling ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a dict of weights, found {type(raw).__name__}")
    state = next((raw[key] for key in STATE_KEYS if isinstance(raw.get(key), dict)), raw)
    tensors = {key: value.contiguous() for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {sorted(raw)[:8]})")
    save_file(tensors, output)
    return len(tensors)


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
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: '{key}' has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
