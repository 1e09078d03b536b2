"""The pack inside a real ComfyUI: imported as a custom node, listed in /object_info, its workflows in the
Templates browser, every workflow converted, validated and run end to end on the tiny demo models, block swap
under ComfyUI's memory management, and an interrupt.

Runs when COMFYUI_DIR names a ComfyUI checkout (set up as in tests/COMFYUI.md; COMFYUI_PYTHON names the
Python that runs the server, default: `python` on PATH); skipped otherwise. The server lives in a temporary
home with its own models, input and output folders, so the checkout is never written to.
"""

import json
import os
import shutil
import time
from urllib.parse import quote

import av
import pytest
from comfyui_server import PromptRejected
from conftest import ROOT
from hf_standin import TOKEN, repos
from ui_to_api import to_api

pytest_plugins = ["comfyui_fixtures"]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (tests/COMFYUI.md)"),
]

NODE_IDS = {
    "MagiHumanDiTLoader",
    "MagiHumanVAELoader",
    "MagiHumanAudioVAELoader",
    "MagiHumanTextEncoderLoader",
    "MagiHumanTextEncode",
    "MagiHumanDistillSampler",
    "MagiHumanBaseSampler",
    "MagiHumanSuperResolution",
    "MagiHumanLongClipWindows",
    "MagiHumanDecode",
    "MagiHumanDecodeToFile",
    "MagiHumanDownloadModels",
}
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Loader inputs that name model files: with real weights absent, the only acceptable validation failures.
MODEL_INPUTS = {"model", "text_encoder", "turbo_vae", "wan_vae", "audio_vae"}
# Small settings so a run takes seconds on CPU: base stage 64x64 for 0.96 s (25 frames), SR to 128x96.
SMALL = {"seconds": 0.96, "width": 64, "height": 64, "steps": 2}
# The SR target is a dynamic combo: its custom option's widgets go by "target.width" (as the frontend sends).
SMALL_SR = {"target": "custom", "target.width": 128, "target.height": 96, "steps": 2}


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def api_prompt(object_info, name: str, **sampler) -> dict:
    prompt = to_api(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), object_info)
    for node in prompt.values():
        if node["class_type"] in ("MagiHumanDistillSampler", "MagiHumanBaseSampler"):
            node["inputs"].update(SMALL | sampler)
        elif node["class_type"] == "MagiHumanSuperResolution":
            node["inputs"].update(SMALL_SR)
    return prompt


def test_the_pack_imports_without_errors(server):
    log = server.log_text()
    imported = [line for line in log.splitlines() if line.rstrip().endswith("ComfyUI-MagiHuman")]
    assert imported and not any("IMPORT FAILED" in line for line in imported), log[-4000:]
    assert "Cannot import" not in log, log[-4000:]


def test_the_pack_installs_the_lipsync_example_voice_into_the_input_folder(server):
    """So the lip-sync workflow opens with no missing file (its run below loads it)."""
    with av.open(str(server.home / "input" / "magihuman_example_voice.wav")) as container:
        assert container.streams.audio[0].duration or container.duration


def test_every_node_is_listed_under_the_magihuman_category(object_info):
    ours = {name for name, info in object_info.items() if info["category"].startswith("MagiHuman")}
    assert ours == NODE_IDS
    assert object_info["MagiHumanDecode"]["output"] == ["IMAGE", "AUDIO", "VIDEO"]
    assert object_info["MagiHumanDecodeToFile"]["output"] == ["VIDEO", "AUDIO"]
    assert object_info["MagiHumanDistillSampler"]["output"] == ["MAGIHUMAN_LATENT"]


def test_the_workflows_are_in_the_templates_browser_with_their_pictures(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates["ComfyUI-MagiHuman"]) == [p.stem for p in WORKFLOWS]
    for path in WORKFLOWS:
        # The names hold spaces and parentheses: the frontend requests them percent-encoded.
        served = server.fetch(f"/api/workflow_templates/ComfyUI-MagiHuman/{quote(path.name)}")
        assert json.loads(served) == json.loads(path.read_text())
        picture = server.fetch(f"/api/workflow_templates/ComfyUI-MagiHuman/{quote(path.stem)}.jpg")
        assert picture == path.with_suffix(".jpg").read_bytes()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_converts_and_validates(server, object_info, path):
    """With every model input pointed at an absent file, the server's only complaints are those inputs:
    the graph, its links and all other widget values are valid."""
    prompt = to_api(json.loads(path.read_text()), object_info)
    renamed = set()
    for node_id, node in prompt.items():
        for name in MODEL_INPUTS & node["inputs"].keys():
            if isinstance(node["inputs"][name], str) and node["inputs"][name] != "none":  # not a link
                node["inputs"][name] = "absent-" + node["inputs"][name]
                renamed.add((node_id, name))
    with pytest.raises(PromptRejected) as rejected:
        server.queue(prompt)
    errors = [
        (node_id, error)
        for node_id, node in rejected.value.body["node_errors"].items()
        for error in node["errors"]
    ]
    assert all(error["type"] == "value_not_in_list" for _, error in errors), errors
    assert {(node_id, error["extra_info"]["input_name"]) for node_id, error in errors} == renamed


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_runs_end_to_end_and_saves_an_mp4_with_sound(server, object_info, path):
    entry = server.wait(server.queue(api_prompt(object_info, path.stem)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [item for output in entry["outputs"].values() for item in output.get("images", [])]
    assert len(saved) == 1 and saved[0]["filename"].endswith(".mp4")
    video = server.output / saved[0]["subfolder"] / saved[0]["filename"]
    with av.open(str(video)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        assert container.streams.video[0].frames == 25  # 0.96 s at 25 fps: 24 + 1 frames
        assert container.streams.audio[0].channels == 2
        assert container.streams.audio[0].rate == 44100


def test_block_swap_runs_under_comfyui_memory_management(server, object_info):
    """With swap_layers, ComfyUI's ModelPatcher holds only the resident part of the DiT (a module list)."""
    prompt = api_prompt(object_info, "MagiHuman text to video (distilled)", seed=3)
    loader = next(node for node in prompt.values() if node["class_type"] == "MagiHumanDiTLoader")
    loader["inputs"]["swap_layers"] = 2
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_an_interrupt_during_sampling_stops_the_run_and_the_next_run_succeeds(server, object_info):
    # After this first run the loaders and the prompt are cached: in the long run only the sampler, decoder
    # and save execute, and the sampler is the long part.
    server.wait(server.queue(api_prompt(object_info, "MagiHuman text to video (distilled)")))
    long_run = api_prompt(
        object_info,
        "MagiHuman text to video (distilled)",
        seconds=4.0,
        width=448,
        height=256,
        steps=1000,
        seed=7,
    )
    prompt_id = server.queue(long_run)
    deadline = time.monotonic() + 60
    while not server.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    server.post("/interrupt")
    entry = server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    messages = dict(entry["status"]["messages"])
    assert messages["execution_interrupted"]["node_type"] == "MagiHumanDistillSampler", messages

    again = server.wait(server.queue(api_prompt(object_info, "MagiHuman text to video (distilled)", seed=8)))
    assert again["status"]["status_str"] == "success", again["status"]


def test_the_download_node_fetches_a_workflows_models_into_comfyuis_default_folders(server):
    """Against a stand-in Hub (HF_ENDPOINT); runs last, and removes what it fetched, since the stand-in's
    files would shadow the demo models in the loaders."""
    downloads = server.home / "downloads"
    try:
        inputs = {"workflow": "MagiHuman text to video (distilled)", "token": TOKEN}
        prompt = {"1": {"class_type": "MagiHumanDownloadModels", "inputs": inputs}}
        entry = server.wait(server.queue(prompt))
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert "4 models ready" in entry["outputs"]["1"]["text"][0]
        served = repos()
        dit, t5 = served["SanDiegoDude/daVinci-MagiHuman-FP8"], served["google/t5gemma-9b-9b-ul2"]
        turbo, sao = served["GAIR/daVinci-MagiHuman"], served["stabilityai/stable-audio-open-1.0"]
        shard = "model-00001-of-00001.safetensors"
        for path, content in (
            (f"diffusion_models/distill_fp8/{shard}", dit[f"distill_fp8/{shard}"]),
            ("text_encoders/t5gemma-9b-9b-ul2/config.json", t5["config.json"]),
            ("vae/turbo_vae/checkpoint-340000.ckpt", turbo["turbo_vae/checkpoint-340000.ckpt"]),
            ("vae/stable-audio-open-1.0/model.safetensors", sao["model.safetensors"]),
        ):
            assert (downloads / path).read_bytes() == content, path

        prompt["1"]["inputs"]["token"] = ""  # gated repositories without a token: a clear error in the UI
        entry = server.wait(server.queue(prompt))
        error = dict(entry["status"]["messages"])["execution_error"]
        assert "is gated" in error["exception_message"] and "token" in error["exception_message"]
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
