"""What the loader nodes offer: model files and sharded model folders found in ComfyUI's model folders
(sharded checkpoints appear as one "folder/" entry), and turning a choice back into a path."""

import os
from fnmatch import fnmatch
from pathlib import Path

import folder_paths

from ..fp8.checkpoint import CheckpointError
from ..pipeline.weights.catalogue import MODEL_FILES, missing_file_message


def _roots(folder: str) -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(folder) if Path(p).is_dir()]


def _folders_with(folder: str, pattern: str) -> list[str]:
    """Subfolders (any depth) holding a file matching ``pattern``, as "relative/path/". Symlinked folders
    are followed (people link model folders from other drives), as ComfyUI's own file lists do."""
    found = set()
    for root in _roots(folder):
        for directory, _, files in os.walk(root, followlinks=True):
            if any(fnmatch(name, pattern) for name in files):
                found.add(Path(directory).relative_to(root).as_posix() + "/")
    return sorted(found)


def _files(folder: str, suffixes: tuple[str, ...], skip: list[str]) -> list[str]:
    """Model files of ``folder`` with one of ``suffixes``, except those inside the ``skip`` folders."""
    return [
        name
        for name in folder_paths.get_filename_list(folder)
        if name.endswith(suffixes) and not any(name.startswith(prefix) for prefix in skip)
    ]


def dit_choices() -> list[str]:
    """Sharded DiT folders (published layout) and single-file DiTs in diffusion_models."""
    sharded = _folders_with("diffusion_models", "*.safetensors.index.json")
    return sharded + _files("diffusion_models", (".safetensors",), sharded)


def text_encoder_choices() -> list[str]:
    """T5-Gemma HF folders (sharded, with an index) and single encoder files with a config.json beside."""
    sharded = _folders_with("text_encoders", "*.safetensors.index.json")
    singles = _files("text_encoders", (".safetensors",), sharded)
    return sharded + [
        name for name in singles if (_full(name, "text_encoders").parent / "config.json").is_file()
    ]


def turbo_choices() -> list[str]:
    """Turbo VAE folders (a .json config next to a .ckpt or .safetensors) in vae."""
    configs = _folders_with("vae", "*.json")
    return [f for f in configs if any(_full(f, "vae").glob(p) for p in ("*.ckpt", "*.safetensors"))]


def vae_file_choices() -> list[str]:
    """Single VAE files in vae (the Wan2.2 VAE, the Stable Audio VAE, ...)."""
    return _files("vae", (".safetensors", ".pth", ".ckpt"), turbo_choices())


def _full(choice: str, folder: str) -> Path:
    for root in _roots(folder):
        if (root / choice).exists():
            return root / choice
    return Path(choice)


def resolve(choice: str, folder: str, catalogue_name: str) -> Path:
    """The path of a chosen entry; a missing one is an error naming the folder, the entry and its source."""
    for root in _roots(folder):
        if choice and (root / choice).exists():
            return root / choice
    looked_in = [str(p) for p in _roots(folder)] or list(folder_paths.get_folder_paths(folder))
    message = missing_file_message(catalogue_name, looked_in)
    raise CheckpointError(f"'{choice}' is not in the '{folder}' folder. {message}")


def preferred(choices: list[str], catalogue_name: str) -> str | None:
    """The default of a combo: the catalogue's published name when present, else the first choice."""
    expected = MODEL_FILES[catalogue_name].path
    matches = [c for c in choices if c == expected or c.endswith("/" + expected)]
    return (matches or choices or [None])[0]
