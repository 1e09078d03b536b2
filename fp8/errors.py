"""The pack's own exception types, shared by every layer (this is the lowest package, so all can import it).

Each is a ``ValueError``, so ComfyUI shows the message as it is and older callers that catch ``ValueError``
still work. Every message says what is wrong, where (file, key, argument or input) and how to fix it.
"""


class MagiHumanError(ValueError):
    """A problem the user can fix; the command line ends with this message alone (no traceback)."""


class CheckpointError(MagiHumanError):
    """A checkpoint file or folder that cannot be used as it is; the message says which file and why."""


class InputError(MagiHumanError):
    """A user input (prompt, size, seed, device, image, audio, path) that cannot be used."""


class OutputError(MagiHumanError):
    """An output that cannot be written where asked (already there, unwritable, a folder in the way)."""
