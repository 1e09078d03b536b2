"""Where results go, decided and checked before any model loads: the file names of one clip, a location that
is writable, and no existing file replaced unless asked. Every file is written under a temporary name beside
its target and renamed into place only when complete, so a full disk, a crash or Ctrl-C never leaves a
half-written clip (and never damages an earlier one)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...fp8.errors import OutputError

CLIP_SUFFIXES = (".mp4", ".wav")


def clip_outputs(prefix: str | Path, extra_decoders: tuple[str, ...] = ()) -> dict[str, Path]:
    """The files of one clip named after ``prefix``: {"mp4": <prefix>.mp4, "wav": <prefix>.wav, and
    "<decoder>": <prefix>_<decoder>.mp4 for each extra decoder}. A prefix that already ends in .mp4 or .wav
    names the clip itself (``result.mp4`` gives result.mp4 and result.wav); any other dot belongs to the
    name (``take.1`` gives take.1.mp4 and take.1.wav, apart from take.2's files)."""
    prefix = Path(prefix)
    if prefix.name in ("", ".", ".."):
        raise OutputError(f"{prefix}: --out must name a clip (e.g. output/clip), not a folder")
    stem = prefix.name[: -len(prefix.suffix)] if prefix.suffix.lower() in CLIP_SUFFIXES else prefix.name
    if not stem:
        raise OutputError(f"{prefix}: --out must name a clip (e.g. output/clip)")
    files = {"mp4": prefix.with_name(f"{stem}.mp4"), "wav": prefix.with_name(f"{stem}.wav")}
    files.update({name: prefix.with_name(f"{stem}_{name}.mp4") for name in extra_decoders})
    return files


def check_outputs(paths: list[Path], overwrite: bool = False) -> None:
    """Make sure every path can be written: its folder exists or can be made, accepts a new file, and the
    path itself is free (or, with ``overwrite``, an ordinary file). Nothing is left behind by the check."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path}: a folder is in the way of this output; choose another --out")
        if path.exists() and not overwrite:
            raise OutputError(
                f"{path}: already exists; give --overwrite to replace it, or choose another --out"
            )
    for folder in dict.fromkeys(path.parent for path in paths):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = _temporary(folder / "write-check")
            probe.touch(exist_ok=False)
            probe.unlink()
        except FileExistsError:
            raise OutputError(
                f"{folder}: not a folder (a file has this name); choose another --out"
            ) from None
        except OSError as e:
            raise OutputError(f"{folder}: cannot write outputs here ({e.strerror or e})") from None


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers pick the same format); when the
    block ends normally it is renamed to ``path``, otherwise (error, Ctrl-C) it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; give --overwrite to replace it, or choose another name")
    temporary = _temporary(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def staged_outputs(targets: dict[str, Path], overwrite: bool = False) -> Iterator[dict[str, Path]]:
    """Yield {name: temporary path} for a set of files that belong together (a clip's mp4 and wav): when the
    block ends normally all are renamed into place, otherwise none is and the temporaries are removed."""
    check_outputs(list(targets.values()), overwrite)
    temporaries = {name: _temporary(path) for name, path in targets.items()}
    try:
        yield temporaries
        missing = [str(targets[name]) for name, path in temporaries.items() if not path.is_file()]
        if missing:
            raise OutputError(f"{', '.join(missing)}: not written")
        for name, path in temporaries.items():
            os.replace(path, targets[name])
    finally:
        for path in temporaries.values():
            path.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """A hidden name in the same folder (so the rename never crosses file systems), unique per process."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
