"""Test set-up: reach the pack as ``magihuman.*`` without installing it, and skip GPU-only tests on CPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# _bootstrap is loaded by path so the repository root never lands on sys.path (where ``import fp8`` would
# silently work and hide a non-relative import).
_spec = importlib.util.spec_from_file_location("_bootstrap", ROOT / "_bootstrap.py")
_bootstrap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bootstrap)
sys.modules["_bootstrap"] = _bootstrap  # what cli.py imports when tests call it in-process
_bootstrap.load()


def load_tensors(path) -> dict:
    """Every tensor of a safetensors file or checkpoint folder, as stored."""
    from magihuman.fp8.checkpoint import Checkpoint

    checkpoint = Checkpoint(path)
    return {key: checkpoint.load(key) for key in checkpoint.keys()}


def load_cli():
    """The repository's cli.py as a module (it sits beside the package, not in it)."""
    spec = importlib.util.spec_from_file_location("magihuman_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
