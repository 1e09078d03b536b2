"""The download plan (offline): which repository, which files, which ComfyUI folder; and the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT
from magihuman.pipeline.weights import download
from magihuman.pipeline.weights.catalogue import MODEL_FILES, WORKFLOW_FILES, missing_file_message
from magihuman.pipeline.weights.download import DownloadError, encoder_shards, files_for, plan, resolve

MODELS = Path("/comfy/models")


def test_distill_workflow_plan_fetches_the_fp8_dit_and_the_shared_models():
    downloads = {
        d.file.name: d
        for d in plan(files_for([], [], ["MagiHuman text to video (distilled)"], [], False), MODELS)
    }
    assert list(downloads) == ["dit_distill", "text_encoder", "turbo_vae", "audio_vae"]
    dit = downloads["dit_distill"]
    assert (dit.file.repo, dit.patterns, dit.target) == (
        "SanDiegoDude/daVinci-MagiHuman-FP8",
        ("distill_fp8/*",),
        MODELS / "diffusion_models",
    )
    turbo = downloads["turbo_vae"]
    assert (turbo.file.repo, turbo.patterns, turbo.target) == (
        "GAIR/daVinci-MagiHuman",
        ("turbo_vae/*",),
        MODELS / "vae",
    )
    audio = downloads["audio_vae"]
    assert audio.file.repo == "stabilityai/stable-audio-open-1.0" and audio.file.gated
    assert audio.target == MODELS / "vae" / "stable-audio-open-1.0"
    text = downloads["text_encoder"]
    assert (
        text.file.repo == "google/t5gemma-9b-9b-ul2"
        and text.target == MODELS / "text_encoders" / "t5gemma-9b-9b-ul2"
    )


def test_choices_combine_without_repeats():
    names = files_for(
        ["distill"], ["1080p"], ["MagiHuman 1080p super-resolution (distilled)"], ["wan_vae"], False
    )
    assert names == ["dit_distill", "dit_sr_1080p", "text_encoder", "turbo_vae", "audio_vae", "wan_vae"]
    assert files_for([], [], [], [], True) == list(MODEL_FILES)
    wan = plan(["wan_vae"], MODELS)[0]
    assert (wan.file.repo, wan.patterns, wan.target) == (
        "Wan-AI/Wan2.2-TI2V-5B",
        ("Wan2.2_VAE.pth",),
        MODELS / "vae",
    )


def test_the_short_names_the_workflows_had_choose_the_same_files_as_their_titles():
    from magihuman.pipeline.weights.catalogue import WORKFLOW_SHORT_NAMES

    for short, title in WORKFLOW_SHORT_NAMES.items():
        assert (
            files_for([], [], [short], [], False)
            == list(WORKFLOW_FILES[title])
            == files_for([], [], [title], [], False)
        )
    assert WORKFLOW_SHORT_NAMES["lipsync_long"] == "MagiHuman long lip-sync (distilled)"
    assert WORKFLOW_SHORT_NAMES["i2v_distill"] == "MagiHuman image to video (distilled)"


def test_every_workflow_names_known_files_and_needs_a_dit():
    for workflow, names in WORKFLOW_FILES.items():
        assert set(names) <= set(MODEL_FILES), workflow
        assert any(name.startswith("dit_") for name in names), workflow


def test_unknown_names_are_errors_listing_the_known_ones():
    with pytest.raises(
        DownloadError, match=r"unknown workflow.*t2v_distill \('MagiHuman text to video \(distilled\)'\)"
    ):
        files_for([], [], ["t2v_turbo"], [], False)
    with pytest.raises(DownloadError, match="unknown model file.*dit_distill"):
        plan(["dit_ultra"], MODELS)


def test_only_encoder_shards_of_t5gemma_are_fetched():
    index = {
        "weight_map": {
            "model.encoder.layers.0.self_attn.q_proj.weight": "model-00001-of-00004.safetensors",
            "model.encoder.norm.weight": "model-00002-of-00004.safetensors",
            "model.decoder.layers.0.self_attn.q_proj.weight": "model-00003-of-00004.safetensors",
            "lm_head.weight": "model-00004-of-00004.safetensors",
        }
    }
    assert encoder_shards(index) == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"]
    with pytest.raises(DownloadError, match="no encoder weights"):
        encoder_shards({"weight_map": {"model.decoder.x": "a.safetensors"}})


def test_resolve_picks_exact_files_and_sums_their_sizes(tmp_path, monkeypatch):
    repo_files = {
        "config.json": 2_000,
        "tokenizer.model": 4_000_000,
        "tokenizer_config.json": 40_000,
        "special_tokens_map.json": 600,
        "model.safetensors.index.json": 50_000,
        "model-00001-of-00003.safetensors": 5_000_000_000,
        "model-00002-of-00003.safetensors": 5_000_000_000,
        "model-00003-of-00003.safetensors": 4_000_000_000,
        "README.md": 9_000,
    }
    index = {
        "weight_map": {
            "model.encoder.a": "model-00001-of-00003.safetensors",
            "model.decoder.b": "model-00003-of-00003.safetensors",
        }
    }

    def hf_hub_download(repo, filename, local_dir, token):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index))
        return str(path)

    class FakeApi:
        def model_info(self, repo, files_metadata, token):
            siblings = [SimpleNamespace(rfilename=n, size=s) for n, s in repo_files.items()]
            return SimpleNamespace(siblings=siblings)

    hub = SimpleNamespace(HfApi=FakeApi, hf_hub_download=hf_hub_download, errors=download._hub().errors)
    monkeypatch.setattr(download, "_hub", lambda: hub)
    files, size = resolve(plan(["text_encoder"], tmp_path)[0], token=None)
    assert sorted(files) == sorted(
        [
            "config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors.index.json",
            "model-00001-of-00003.safetensors",
        ]
    )
    assert size == 2_000 + 4_000_000 + 40_000 + 600 + 50_000 + 5_000_000_000


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "cannot reach Hugging Face to fetch SanDiegoDude/daVinci-MagiHuman-FP8",
        ),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ],
)
def test_offline_is_a_clear_error(tmp_path, env, message):
    # Port 9 on loopback has no listener: the request fails at once, nothing leaves this machine.
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "download", "--models-dir", str(tmp_path), "--dit", "distill"],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_missing_file_message_says_where_and_how():
    text = missing_file_message("audio_vae", ["/comfy/models/vae"])
    assert "stable-audio-open-1.0/model.safetensors" in text and "'vae' folder" in text
    assert "huggingface.co/stabilityai/stable-audio-open-1.0" in text and "gated" in text
    assert "python cli.py download --files audio_vae" in text and "about 4.85 GB" in text
    assert "'MagiHuman Download Models' node" in text and "MagiHuman text to video (distilled)" in text
