"""The Download Models node against a stand-in Hugging Face Hub on 127.0.0.1 (tests/hf_standin.py), with the
real huggingface_hub client: what a workflow needs lands in the right ComfyUI folders with a progress bar;
a broken download resumes where it stopped; gated repositories need the token; offline is a clear error."""

import pytest
from hf_standin import GATED, TOKEN, HubStandIn, repos
from magihuman.pipeline.weights.catalogue import WORKFLOW_FILES
from magihuman.pipeline.weights.download import DownloadError

pytest_plugins = ["comfy_fixtures"]


@pytest.fixture
def hub(monkeypatch, comfy, tmp_path):
    import huggingface_hub.constants

    # Small chunks, so a broken connection leaves some whole chunks on disk (the client writes whole chunks).
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login of this machine
    comfy.folder_paths.set_models_dir(tmp_path / "models")
    with HubStandIn(repos(), GATED) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        yield standin
    comfy.folder_paths.set_models_dir(comfy.models)


def node(comfy):
    return next(n for n in comfy.nodes.NODES if n.define_schema().node_id == "MagiHumanDownloadModels")


def test_the_node_offers_every_workflow_and_downloads_nothing_until_run(comfy):
    schema = node(comfy).define_schema()
    workflow = next(i for i in schema.inputs if i.id == "workflow")
    assert workflow.options[: len(WORKFLOW_FILES)] == list(WORKFLOW_FILES)
    assert schema.is_output_node and schema.display_name == "MagiHuman Download Models"


def test_a_workflows_models_land_in_comfyuis_folders_with_a_progress_bar(comfy, hub, tmp_path):
    bars = len(comfy.utils.bars)
    result = node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=f"  {TOKEN} ")
    models, served = tmp_path / "models", repos()
    expected = {
        "diffusion_models/distill_fp8/model-00001-of-00001.safetensors": served[
            "SanDiegoDude/daVinci-MagiHuman-FP8"]["distill_fp8/model-00001-of-00001.safetensors"],
        "text_encoders/t5gemma-9b-9b-ul2/model-00001-of-00002.safetensors": served[
            "google/t5gemma-9b-9b-ul2"]["model-00001-of-00002.safetensors"],
        "vae/turbo_vae/checkpoint-340000.ckpt": served["GAIR/daVinci-MagiHuman"][
            "turbo_vae/checkpoint-340000.ckpt"],
        "vae/stable-audio-open-1.0/model.safetensors": served["stabilityai/stable-audio-open-1.0"][
            "model.safetensors"],
    }  # fmt: skip
    for path, content in expected.items():
        assert (models / path).read_bytes() == content, path
    for absent in ("diffusion_models/base_fp8", "text_encoders/t5gemma-9b-9b-ul2/model-00002-of-00002"
                   ".safetensors", "vae/distill", "diffusion_models/README.md"):  # fmt: skip
        assert not (models / absent).exists(), absent
    bar = comfy.utils.bars[bars]
    assert len(comfy.utils.bars) == bars + 1 and bar.current == bar.total > 1_000_000
    assert "4 models ready" in result.args[0] and "stable-audio-open-1.0/model.safetensors" in result.args[0]

    # A second run finds everything in place: it asks for the listings (and T5-Gemma's index metadata), and
    # fetches no file again.
    before = len(hub.requests)
    node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=TOKEN)
    again = hub.requests[before:]
    assert again and all(method == "HEAD" or path.startswith("/api/models/") for method, path, _ in again)


def test_a_broken_download_resumes_where_it_stopped(comfy, hub, tmp_path):
    name = "distill_fp8/model-00001-of-00001.safetensors"
    hub.cut = (name, 200_000)  # the connection breaks after 200 kB of 1 MB, and the network stays down
    with pytest.raises(DownloadError, match="(?s)cannot reach Hugging Face.*a new run resumes"):
        node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=TOKEN)
    target = tmp_path / "models" / "diffusion_models" / name
    assert not target.exists()

    hub.down = False  # back online
    node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=TOKEN)
    ranges = hub.file_gets(name)
    assert ranges[0] is None and ranges[-1] == f"bytes={3 * 64 * 1024}-", ranges  # 3 whole chunks were kept
    assert target.read_bytes() == repos()["SanDiegoDude/daVinci-MagiHuman-FP8"][name]


def test_gated_repositories_need_the_token(comfy, hub):
    with pytest.raises(DownloadError, match="google/t5gemma-9b-9b-ul2 is gated.*token input"):
        node(comfy).execute(workflow="MagiHuman text to video (distilled)", token="")
    with pytest.raises(DownloadError, match="is gated.*not been granted"):
        node(comfy).execute(workflow="MagiHuman text to video (distilled)", token="hf_not_granted")


def test_offline_is_a_clear_error(comfy, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DownloadError, match="(?s)cannot reach Hugging Face.*Check the network"):
        node(comfy).execute(workflow="MagiHuman image to video (distilled)", token=TOKEN)


def test_cancel_stops_the_download_and_a_rerun_completes_it(comfy, hub, tmp_path):
    comfy.mm.interrupt_processing = True
    with pytest.raises(comfy.mm.InterruptProcessingException):
        node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=TOKEN)
    node(comfy).execute(workflow="MagiHuman text to video (distilled)", token=TOKEN)
    target = tmp_path / "models" / "diffusion_models" / "distill_fp8" / "model-00001-of-00001.safetensors"
    assert target.stat().st_size == 1_000_000
