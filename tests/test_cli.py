"""The command line on the tiny random stack: the demo's mp4 checked with PyAV, ``generate`` from a
ComfyUI-style models folder (text, image and audio conditioning, super-resolution), argument errors."""

import os
import shlex
import subprocess
import sys
import wave

import pytest
import torch
from conftest import ROOT, load_cli
from magihuman.pipeline.demo import build_models
from magihuman.pipeline.media.files import read_audio, write_wav
from mp4_checks import streams
from test_readme import readme_command


def test_demo_command_writes_a_playable_clip(tmp_path):
    command = readme_command("demo")
    assert command.endswith("python cli.py demo")
    run = subprocess.run(
        [sys.executable, "cli.py", "demo", "--out", str(tmp_path), "--seconds", "1.92", "--size", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "random weights" in run.stdout
    for name in ("magihuman_demo.mp4", "magihuman_demo_wan.mp4", "magihuman_demo.wav"):
        assert (tmp_path / name).is_file() and str(tmp_path / name) in run.stdout
    info = streams(tmp_path / "magihuman_demo.mp4")
    # 1.92 s -> 49 frames at 25 fps -> 13 latent frames -> 4·13 − 3 = 49 decoded frames
    assert (info["codec"], info["fps"], info["frames"]) == ("h264", 25, 49)
    assert (info["audio_codec"], info["rate"], info["channels"]) == ("aac", 44100, 2)
    assert abs(info["audio_seconds"] - info["video_seconds"]) < 0.05  # one AAC frame is 0.023 s
    with wave.open(str(tmp_path / "magihuman_demo.wav")) as sound:
        assert (sound.getnchannels(), sound.getframerate()) == (2, 44100)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


def generate(models, out, *extra):
    args = ["generate", "--models-dir", str(models), "--prompt", "a woman says hello", "--out", str(out)]
    return load_cli().main([*args, "--seconds", "0.96", "--width", "64", "--height", "64", *extra])


def write_ppm(path, height=48, width=80):
    pixels = (torch.arange(height * width * 3) % 251).to(torch.uint8).numpy().tobytes()
    path.write_bytes(f"P6 {width} {height} 255\n".encode() + pixels)
    return path


def test_generate_base_model_with_image_and_super_resolution(models, tmp_path):
    image = write_ppm(tmp_path / "face.ppm")
    # The demo folder has no base_fp8/: the DiT is given by path (the random distill weights serve).
    dit = models / "diffusion_models" / "distill_fp8"
    assert generate(models, tmp_path / "clip", "--mode", "base", "--steps", "2", "--dit", str(dit),
                    "--image", str(image), "--sr", "128x96", "--decoder", "wan") == 0  # fmt: skip
    info = streams(tmp_path / "clip.mp4")
    assert info["frames"] == 4 * (24 // 4 + 1) - 3  # 0.96 s -> 25 frames -> 7 latents -> 25 frames


def test_generate_lip_sync_keeps_the_driving_audio(models, tmp_path):
    tone = torch.sin(torch.arange(48000) / 48000 * 2 * torch.pi * 330).mul(0.5).expand(1, 2, -1)
    write_wav(tmp_path / "voice.wav", {"waveform": tone, "sample_rate": 48000})
    assert generate(models, tmp_path / "synced", "--audio", str(tmp_path / "voice.wav")) == 0
    out = read_audio(tmp_path / "synced.wav")
    reference = read_audio(tmp_path / "voice.wav")
    assert out["sample_rate"] == 44100 and out["waveform"].shape[1] == 2
    # The output sound is the user's (resampled), not a decoding of it: it keeps the tone's level and shape.
    n = out["waveform"].shape[-1]
    expected = torch.sin(torch.arange(n) / 44100 * 2 * torch.pi * 330) * 0.5
    assert (out["waveform"][0, 0] - expected).abs().max() < 2e-3
    assert reference["waveform"].shape[-1] == 48000


def test_generate_sizes_itself_to_the_gpu_memory(models, tmp_path, monkeypatch):
    """On a GPU (faked: a card's available bytes on the CPU run) T5-Gemma takes the precision that fits and
    --swap-layers auto (the default) swaps the DiT layers the card needs; an explicit count is kept."""
    from magihuman.pipeline import runner
    from magihuman.pipeline.codecs.text_encoder import encoder_bytes

    encoder = models / "text_encoders" / "t5gemma-9b-9b-ul2"
    card = encoder_bytes(encoder, fp8=True)  # the fp8 encoder fits, bf16 does not; the DiT does not either
    monkeypatch.setattr(runner, "_available_memory", lambda device: card)
    calls = {}
    for name in ("load_text_encoder", "load_dit"):
        real = getattr(runner, name)
        spy = lambda *a, real=real, name=name, **k: calls.setdefault(name, []).append(k) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(runner, name, spy)
    assert generate(models, tmp_path / "auto") == 0
    assert calls["load_text_encoder"] == [{"fp8": True}]
    assert [k["swap_layers"] for k in calls["load_dit"]] == [4]  # every layer of the 4-layer demo DiT
    calls.clear()
    assert generate(models, tmp_path / "fixed", "--swap-layers", "1") == 0
    assert [k["swap_layers"] for k in calls["load_dit"]] == [1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seconds", "0"], "seconds must be more than 0"),
        (["--width", "7"], "width must be a whole number of pixels from 64"),
        (["--sr", "huge"], "--sr must be 540p, 1080p or WIDTHxHEIGHT"),
        (["--steps", "0"], "steps must be a whole number"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(models, tmp_path, capsys, extra, message):
    assert generate(models, tmp_path / "x", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_torchrun_with_two_cpu_processes_writes_the_single_process_clip_once(models, tmp_path):
    """``torchrun --nproc-per-node 2 cli.py generate --device cpu``: gloo, sequence parallel, the same seed
    on both ranks; rank 0 alone writes, and the sound equals one process's (one thread each, so only the
    smaller GEMMs' summation order differs)."""
    from magihuman.pipeline.dit.parallel import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    run = subprocess.run(
        [*torchrun, str(ROOT / "cli.py"), "generate", "--device", "cpu", "--models-dir", str(models),
         "--prompt", "a woman says hello", "--out", str(tmp_path / "two"), "--seconds", "0.96",
         "--width", "64", "--height", "64"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote ") == 2  # rank 0's mp4 and wav, nothing from rank 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert generate(models, tmp_path / "one", "--device", "cpu") == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "one.wav", "two.mp4", "two.wav"]
    two, one = (read_audio(tmp_path / f"{name}.wav")["waveform"] for name in ("two", "one"))
    assert two.shape == one.shape and (two - one).abs().max() < 1e-3  # measured 1e-4 (16-bit steps)


def test_missing_models_name_the_folder_and_the_download(tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    assert generate(tmp_path, tmp_path / "x") == 1
    err = capsys.readouterr().err
    assert (
        "distill_fp8/" in err
        and "diffusion_models" in err
        and "python cli.py download --files dit_distill" in err
    )


def test_every_subcommand_has_complete_help():
    parser = load_cli().build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {"convert", "convert-pickle", "bench", "download", "generate", "demo"}
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert sub.description, name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"
        assert shlex.split(f"python cli.py {name} --help")  # documented invocation form
        assert "usage: python cli.py " + name in text
