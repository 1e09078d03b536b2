"""Import this checkout as the package ``magihuman`` without installing it.

The pack's folders import each other relatively and must never become top-level modules: ``nodes`` is
ComfyUI's own module, and ``pipeline``/``fp8`` are names other packs use too. ComfyUI imports the pack by its
folder name; ``cli.py`` and the tests call :func:`load`, which registers the repository root under one
private package name, whatever the folder is called.
"""

import importlib.util
import sys
from pathlib import Path

PACKAGE = "magihuman"
ROOT = Path(__file__).resolve().parent


def load():
    """Import the repository root as the package ``magihuman`` (once) and return it."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    return package
