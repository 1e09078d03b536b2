"""The real ComfyUI server that the real-ComfyUI and browser tests share (one start per test session): a
temporary home with the pack, the tiny demo models under their published names, a user picture, and a
stand-in Hugging Face Hub for the download node. Opt in with ``pytest_plugins = ["comfyui_fixtures"]``."""

import os
from pathlib import Path

import pytest
from comfyui_server import ComfyServer, write_home
from conftest import ROOT
from hf_standin import GATED, HubStandIn, repos
from magihuman.pipeline.demo import build_models
from PIL import Image

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout (tests/COMFYUI.md)")
    home = tmp_path_factory.mktemp("comfyui_home")
    models = build_models(home / "models")
    diffusion = models / "diffusion_models"
    for alias, source in (("base_fp8", "distill_fp8"), ("1080p_sr_fp8", "540p_sr_fp8")):
        (diffusion / alias).symlink_to(diffusion / source, target_is_directory=True)
    write_home(home, ROOT, models)
    # The user's picture the image workflow loads (the lip-sync one's example voice the pack installs).
    Image.new("RGB", (160, 90), (200, 120, 80)).save(home / "input" / "example.png")
    with HubStandIn(repos(), GATED) as hub:
        comfy = ComfyServer(
            Path(COMFYUI_DIR), os.environ.get("COMFYUI_PYTHON", "python"), home, {"HF_ENDPOINT": hub.url}
        )
        comfy.hub, comfy.home = hub, home
        try:
            comfy.wait_ready()
            yield comfy
        finally:
            comfy.stop()
