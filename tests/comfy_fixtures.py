"""Run the node pack against tests/fake_comfy (a stand-in for ComfyUI's API) in CI, with the tiny demo models
in a ComfyUI-style models folder. Opt in with ``pytest_plugins = ["comfy_fixtures"]``."""

import importlib
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT
from magihuman.pipeline.demo import build_models

FAKE = ROOT / "tests" / "fake_comfy"
FAKE_MODULES = ("comfy_api", "comfy", "folder_paths")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("comfy_models"))


@pytest.fixture(scope="module")
def comfy(demo_models, tmp_path_factory):
    """The fake ComfyUI modules and the pack's ``nodes`` imported under them; removed afterwards so no other
    test sees a ``comfy`` module."""
    sys.path.insert(0, str(FAKE))
    try:
        folder_paths = importlib.import_module("folder_paths")
        folder_paths.set_models_dir(demo_models)
        folder_paths.temp_directory = str(tmp_path_factory.mktemp("comfy_temp"))
        namespace = SimpleNamespace(
            folder_paths=folder_paths,
            mm=importlib.import_module("comfy.model_management"),
            utils=importlib.import_module("comfy.utils"),
            latest=importlib.import_module("comfy_api.latest"),
            nodes=importlib.import_module("magihuman.nodes"),
            models=demo_models,
        )
        yield namespace
    finally:
        sys.path.remove(str(FAKE))
        for name in list(sys.modules):
            if name.split(".")[0] in FAKE_MODULES or name.startswith("magihuman.nodes"):
                del sys.modules[name]
