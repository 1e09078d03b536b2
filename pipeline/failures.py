"""How the command line ends when something goes wrong: one line on stderr and a non-zero exit, never a
traceback (``--debug`` shows it). Outputs are written under temporary names (:mod:`.media.outputs`), so
an error or Ctrl-C at any point leaves no partial file behind."""

import logging
import sys
import traceback
from collections.abc import Callable

import torch

from ..fp8.errors import MagiHumanError
from .weights.download import DownloadError

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def run_command(command: Callable, args, debug: bool = False) -> int:
    """Run one subcommand; its problems become ``error: <message>`` and exit status 1, Ctrl-C status 130."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # notes such as a shortened prompt
    try:
        return command(args) or 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted: stopped before finishing; no partial files were left", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1


def describe(error: Exception) -> str:
    """One line for any error: the pack's own messages as they are (they name file, key or argument), a
    file-system error with its path, out-of-memory with what to try, and anything else as a likely bug."""
    if isinstance(error, (MagiHumanError, DownloadError, ValueError)):
        text = str(error)
    elif isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror or error}"
    elif isinstance(error, torch.OutOfMemoryError):
        text = (
            "out of GPU memory. Try --swap-layers N (e.g. 15 on a 16 GB card), a smaller --width/--height "
            "or fewer --seconds"
        )
    elif isinstance(error, MemoryError):
        text = "out of system memory; close other programs or make the clip smaller"
    else:
        text = f"unexpected {type(error).__name__}: {error} (likely a bug: rerun with --debug and report it)"
    return " ".join(text.split())  # one line, whatever the message held
