"""Battery, part 2: the command line given bad inputs, bad outputs and faults, on the tiny demo models. Each
case asserts one ``error:`` line naming what is wrong and where, no traceback, a non-zero exit, no model
loaded before an input error, and that files already in the output folder are untouched."""

import errno
import os
import wave

import pytest
import torch
from conftest import load_cli
from magihuman.pipeline import runner
from magihuman.pipeline.media.files import read_audio, write_wav
from magihuman.pipeline.media.outputs import atomic_output, clip_outputs

pytest_plugins = ["comfy_fixtures"]  # for demo_models: the tiny stack, built once per session

LOADERS = ("load_text_encoder", "load_wan_vae", "load_audio_vae", "load_dit", "load_turbo_vae")


@pytest.fixture
def models(demo_models):
    return demo_models


@pytest.fixture
def workspace(tmp_path):
    """An output folder holding an earlier clip that no failed run may touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.mp4").write_bytes(b"an earlier clip")
    return out


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def generate(models, out, *extra):
    args = ["generate", "--models-dir", str(models), "--prompt", "a woman says hello", "--out", str(out)]
    return load_cli().main([*args, "--seconds", "0.2", "--width", "64", "--height", "64", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def fails_before_loading(models, workspace, capsys, monkeypatch, extra, words):
    for name in LOADERS:
        monkeypatch.setattr(runner, name, lambda *a, **k: pytest.fail("a model loaded before the check"))
    before = contents(workspace)
    assert generate(models, workspace / "clip", *extra) == 1
    line = one_error_line(capsys)
    for word in words:
        assert word in line, line
    assert contents(workspace) == before
    return line


def write_ppm(path, height, width):
    pixels = (torch.arange(height * width * 3) % 251).to(torch.uint8).numpy().tobytes()
    path.write_bytes(f"P6 {width} {height} 255\n".encode() + pixels)
    return path


def write_tone(path, seconds, rate=16000):
    tone = torch.sin(torch.arange(int(seconds * rate)) / rate * 2 * torch.pi * 220).mul(0.5).view(1, 1, -1)
    return write_wav(path, {"waveform": tone, "sample_rate": rate})


# ---- request values: (extra arguments, words the error line must hold) -----------------------------------
VALUES = [
    (["--prompt", ""], ["--prompt is empty"]),
    (["--prompt", "   \n\t"], ["--prompt is empty"]),
    (["--seed", "-1"], ["seed must be a whole number from 0 to", "-1"]),
    (["--seed", str(2**64)], ["seed must be a whole number from 0 to", str(2**64)]),
    (["--seconds", "0"], ["seconds must be more than 0"]),
    (["--seconds", "-3"], ["seconds must be more than 0", "-3"]),
    (["--seconds", "601"], ["at most 600"]),
    (["--seconds", "nan"], ["seconds must be more than 0", "nan"]),
    (["--seconds", "0.05"], ["multiple of 1/25", "0.05"]),
    (["--width", "7"], ["width must be a whole number of pixels from 64", "7"]),
    (["--width", "5000"], ["width must be a whole number of pixels", "5000"]),
    (["--height", "0"], ["height must be a whole number of pixels", "0"]),
    (["--steps", "0"], ["steps must be a whole number from 1"]),
    (["--steps", "1001"], ["steps must be a whole number from 1 to 1000", "1001"]),
    (["--sr", "huge"], ["--sr must be 540p, 1080p or WIDTHxHEIGHT", "huge"]),
    (["--sr", "10x10"], ["--sr 10x10: width must be a whole number of pixels from 64"]),
    (["--sr", "128x9999"], ["--sr 128x9999: height must be a whole number of pixels", "9999"]),
    (["--swap-layers", "-1"], ["--swap-layers must be 0 or more", "-1"]),
    (["--device", "gpu"], ["--device 'gpu' is not a device"]),
    (["--device", "tpu:0"], ["--device 'tpu:0' is not a device"]),
    (["--device", ""], ["--device '' is not a device"]),
]


@pytest.mark.parametrize("extra, words", VALUES, ids=[" ".join(case[0]) for case in VALUES])
def test_bad_request_value_is_refused_before_any_model_loads(
    models, workspace, capsys, monkeypatch, extra, words
):
    fails_before_loading(models, workspace, capsys, monkeypatch, extra, words)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--seconds", "four"], ["argument --seconds: invalid float value: 'four'"]),
        (["--mode", "fast"], ["argument --mode: invalid choice: 'fast'"]),
        (["--decoder", "vhs"], ["argument --decoder: invalid choice: 'vhs'"]),
        (["--colour"], ["unrecognized arguments: --colour"]),
    ],
)
def test_mistyped_command_line_is_one_line_pointing_at_help(models, workspace, capsys, extra, words):
    with pytest.raises(SystemExit) as exit_:
        generate(models, workspace / "clip", *extra)
    assert exit_.value.code == 2
    line = one_error_line(capsys)
    assert all(word in line for word in words) and "(see `python cli.py generate --help`)" in line
    assert contents(workspace) == {"earlier.mp4": b"an earlier clip"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(models, workspace, capsys, monkeypatch, device):
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--device", device], [f"--device {device}"])


# ---- model paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag", ["--dit", "--sr-dit", "--text-encoder", "--audio-vae", "--turbo-vae", "--wan-vae"]
)
def test_mistyped_model_path_is_named_with_its_flag(models, workspace, capsys, monkeypatch, flag):
    missing = workspace / "distill_fp8_typo"
    extra = [flag, str(missing)] + (["--sr", "128x128"] if flag == "--sr-dit" else [])
    fails_before_loading(
        models, workspace, capsys, monkeypatch, extra, [f"{flag} {missing}: no such file or folder"]
    )


def test_super_resolution_dit_in_the_base_slot_is_refused(models, workspace, capsys, monkeypatch):
    sr = models / "diffusion_models" / "540p_sr_fp8"
    words = [f"--dit {sr} is the sr_540p DiT", "needs the distill or base DiT"]
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--dit", str(sr)], words)


def test_base_dit_in_the_super_resolution_slot_is_refused(models, workspace, capsys, monkeypatch):
    dit = models / "diffusion_models" / "distill_fp8"
    words = [f"--sr-dit {dit} is the distill DiT", "needs a super-resolution DiT"]
    fails_before_loading(
        models, workspace, capsys, monkeypatch, ["--sr", "128x128", "--sr-dit", str(dit)], words
    )


def test_models_dir_that_is_not_a_folder_is_named(workspace, capsys, monkeypatch):
    fails_before_loading(
        workspace / "nowhere", workspace, capsys, monkeypatch, [], ["--models-dir", "nowhere"]
    )


def test_damaged_dit_header_ends_in_one_line_naming_the_shard(models, workspace, capsys, tmp_path):
    import shutil

    dit = shutil.copytree(models / "diffusion_models" / "distill_fp8", tmp_path / "distill_fp8")
    shard = sorted(dit.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    assert generate(models, workspace / "clip", "--dit", str(dit)) == 1
    assert shard.name in one_error_line(capsys)
    assert contents(workspace) == {"earlier.mp4": b"an earlier clip"}


# ---- reference image and driving audio -----------------------------------------------------------------
def image_cases(folder):
    (folder / "notes.txt").write_text("not a picture")
    return {
        "missing file": (folder / "face.png", ["face.png: cannot read this image"]),
        "not an image": (folder / "notes.txt", ["notes.txt: cannot read this image"]),
        "1x1 pixels": (write_ppm(folder / "dot.ppm", 1, 1), ["dot.ppm", "is 1x1 pixels", "at least 16x16"]),
        "8x40 pixels": (write_ppm(folder / "thin.ppm", 8, 40), ["thin.ppm", "is 40x8 pixels"]),
    }


@pytest.mark.parametrize("case", ["missing file", "not an image", "1x1 pixels", "8x40 pixels"])
def test_unusable_reference_image_is_refused_first(models, workspace, capsys, monkeypatch, tmp_path, case):
    path, words = image_cases(tmp_path)[case]
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--image", str(path)], words)


def audio_cases(folder):
    (folder / "noise.mp3").write_bytes(os.urandom(3000))
    with wave.open(str(folder / "empty.wav"), "wb") as empty:
        empty.setnchannels(1), empty.setsampwidth(2), empty.setframerate(16000)
    return {
        "missing file": (folder / "voice.wav", ["voice.wav: cannot read audio"]),
        "random bytes": (folder / "noise.mp3", ["noise.mp3: cannot read audio"]),
        "a picture": (write_ppm(folder / "face.ppm", 32, 32), ["face.ppm: this file has no audio stream"]),
        "no samples": (folder / "empty.wav", ["empty.wav: the audio stream is empty"]),
    }


@pytest.mark.parametrize("case", ["missing file", "random bytes", "a picture", "no samples"])
def test_unusable_driving_audio_is_refused_first(models, workspace, capsys, monkeypatch, tmp_path, case):
    path, words = audio_cases(tmp_path)[case]
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--audio", str(path)], words)


def test_long_driving_audio_is_read_only_as_far_as_the_clip_needs(tmp_path, caplog):
    path = write_tone(tmp_path / "speech.wav", 60.0)
    audio = read_audio(path, seconds=1.0)
    assert audio["waveform"].shape[-1] == 16000
    assert (
        "speech.wav is 60.0 s long; the clip uses its first 1.00 s, the rest (59.0 s) is unused"
        in caplog.text
    )


def test_long_driving_audio_from_a_node_is_cut_before_resampling(caplog):
    from magihuman.pipeline.codecs.audio_io import from_audio

    tone = {"waveform": torch.zeros(1, 2, 48000 * 120), "sample_rate": 48000}  # 2 minutes
    assert from_audio(tone, 6).shape == (1, 2, 2048 * 6)
    assert "driving audio is 120.0 s; the clip uses its first 0.24 s" in caplog.text


# ---- outputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["clip.mp4", "clip.wav", "clip_wan.mp4"])
def test_existing_output_is_refused_without_overwrite(models, workspace, capsys, monkeypatch, existing):
    (workspace / existing).write_bytes(b"keep me")
    words = [f"{workspace / existing}: already exists", "--overwrite"]
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--decoder", "both"], words)


def test_folder_in_the_way_of_an_output_is_refused(models, workspace, capsys, monkeypatch):
    (workspace / "clip.wav").mkdir()
    words = [f"{workspace / 'clip.wav'}: a folder is in the way"]
    fails_before_loading(models, workspace, capsys, monkeypatch, ["--overwrite"], words)


def test_output_folder_blocked_by_a_file_is_found_first(models, workspace, capsys, monkeypatch):
    (workspace / "renders").write_text("a file, not a folder")
    for name in LOADERS:
        monkeypatch.setattr(runner, name, lambda *a, **k: pytest.fail("a model loaded before the check"))
    before = contents(workspace)
    assert generate(models, workspace / "renders" / "clip") == 1
    assert "renders" in one_error_line(capsys) and contents(workspace) == before


@pytest.mark.parametrize(
    "prefix, names",
    [
        ("take.1", ("take.1.mp4", "take.1.wav")),
        ("result.mp4", ("result.mp4", "result.wav")),
        ("voice.WAV", ("voice.mp4", "voice.wav")),
        ("plain", ("plain.mp4", "plain.wav")),
    ],
)
def test_sound_is_named_after_the_clip(tmp_path, prefix, names):
    files = clip_outputs(tmp_path / prefix)
    assert (files["mp4"].name, files["wav"].name) == names


def test_two_takes_keep_their_own_sound_and_a_third_is_refused(models, workspace, capsys):
    assert generate(models, workspace / "take.1") == 0
    assert generate(models, workspace / "take.2") == 0
    assert generate(models, workspace / "result.mp4") == 0
    names = set(contents(workspace))
    assert {"take.1.mp4", "take.1.wav", "take.2.mp4", "take.2.wav", "result.mp4", "result.wav"} <= names
    assert not any(name.endswith(".mp4.mp4") or ".partial" in name for name in names)
    capsys.readouterr()
    assert generate(models, workspace / "take.1") == 1 and "take.1.mp4: already exists" in one_error_line(
        capsys
    )
    assert generate(models, workspace / "take.1", "--overwrite") == 0


# ---- faults while running --------------------------------------------------------------------------------
def test_ctrl_c_leaves_no_partial_files_and_one_line(models, workspace, capsys, monkeypatch):
    (workspace / "clip.mp4").write_bytes(b"the clip of yesterday")
    original = runner.write_wav

    def interrupted(path, audio, overwrite=False):
        original(path, audio, overwrite)  # the sound is complete under its temporary name, the mp4 too
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_wav", interrupted)
    assert generate(models, workspace / "clip", "--overwrite") == 130
    assert one_error_line(capsys).startswith("interrupted:")
    assert contents(workspace) == {"clip.mp4": b"the clip of yesterday", "earlier.mp4": b"an earlier clip"}


def test_full_disk_keeps_the_earlier_clip_and_names_the_file(models, workspace, capsys, monkeypatch):
    (workspace / "clip.mp4").write_bytes(b"the clip of yesterday")

    def disk_full(path, frames, audio, **_):
        with atomic_output(path) as temporary:
            temporary.write_bytes(b"half a clip")
            raise OSError(errno.ENOSPC, "No space left on device", str(temporary))

    monkeypatch.setattr(runner, "write_mp4", disk_full)
    assert generate(models, workspace / "clip", "--overwrite") == 1
    assert "No space left on device" in one_error_line(capsys)
    assert contents(workspace) == {"clip.mp4": b"the clip of yesterday", "earlier.mp4": b"an earlier clip"}


def test_a_nan_latent_names_the_dit_to_re_download(models, workspace, capsys, monkeypatch):
    original = runner.generate_long

    def poisoned(dit, request):
        latent = original(dit, request)
        latent.video[0, 0, 0, 0, 0] = float("nan")
        return latent

    monkeypatch.setattr(runner, "generate_long", poisoned)
    assert generate(models, workspace / "clip") == 1
    line = one_error_line(capsys)
    assert "NaN or Inf" in line and "distill_fp8" in line and "re-download" in line
    assert contents(workspace) == {"earlier.mp4": b"an earlier clip"}


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_are_one_line_unless_debug(models, workspace, capsys, monkeypatch, debug):
    monkeypatch.setattr(runner, "load_dit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kaboom")))
    assert generate(models, workspace / "clip", *(["--debug"] if debug else [])) == 1
    err = capsys.readouterr().err
    assert ("Traceback" in err) == debug and "error: unexpected RuntimeError: kaboom" in err
    assert contents(workspace) == {"earlier.mp4": b"an earlier clip"}
