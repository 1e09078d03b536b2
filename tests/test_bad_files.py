"""Battery, part 1: damaged and hostile model files. Each case asserts the pack's own error, naming the file
and (where there is one) the key or field, and that no file was changed or created by the attempt."""

import json
import os
import pickle
import shutil
import struct
import zipfile

import pytest
import torch
from conftest import FIXTURES, load_cli
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.fp8.errors import CheckpointError, MagiHumanError, OutputError
from magihuman.pipeline.codecs.audio_vae import load_audio_vae
from magihuman.pipeline.codecs.text_encoder import load_text_encoder
from magihuman.pipeline.codecs.turbo_vae import load_turbo_vae
from magihuman.pipeline.codecs.wan_vae import load_wan_vae
from magihuman.pipeline.demo import write_audio_vae, write_text_encoder
from magihuman.pipeline.weights.pickle_scan import scan_pickle
from magihuman.pipeline.weights.torch_files import convert_pickle, load_torch_file
from safetensors.torch import save_file

TURBO = FIXTURES / "turbo_vaed_tiny"


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: what a failed attempt must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_raw(path, header, data: bytes = b""):
    """A safetensors file with exactly this header (any JSON value, or raw bytes) and data section."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---- safetensors headers: (name, header, data, words the message must hold besides the file name) --------
HEADERS = [
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, b"", ["nested too deeply"]),
    ("header is a list", [entry()], bytes(16), ["JSON list", "expected an object"]),
    ("header is a string", "weights", b"", ["JSON str"]),
    ("header is a number", 7, b"", ["JSON int"]),
    ("entry is a number", {"w": 3}, b"", ["'w'", "expected an object"]),
    ("entry is a list", {"w": [1, 2]}, b"", ["'w'", "'dtype', 'shape' and 'data_offsets'"]),
    ("entry lacks dtype", {"w": {"shape": [4], "data_offsets": [0, 16]}}, bytes(16), ["'w'", "'dtype'"]),
    ("entry lacks shape", {"w": {"dtype": "F32", "data_offsets": [0, 16]}}, bytes(16), ["'w'", "'shape'"]),
    ("entry lacks offsets", {"w": {"dtype": "F32", "shape": [4]}}, bytes(16), ["'w'", "'data_offsets'"]),
    ("unknown dtype", {"w": entry(dtype="F12")}, bytes(16), ["'w'", "unsupported dtype 'F12'"]),
    ("dtype not a string", {"w": entry(dtype=5)}, bytes(16), ["'w'", "unsupported dtype 5"]),
    ("negative dimension", {"w": entry(shape=(-4,))}, bytes(16), ["'w'", "'shape'", "non-negative"]),
    ("dimension is a string", {"w": entry(shape=("4",))}, bytes(16), ["'w'", "'shape'"]),
    ("dimension is a bool", {"w": entry(shape=(True,))}, bytes(16), ["'w'", "'shape'"]),
    ("shape not a list", {"w": {**entry(), "shape": 4}}, bytes(16), ["'w'", "'shape'"]),
    ("three offsets", {"w": entry(offsets=(0, 8, 16))}, bytes(16), ["'w'", "[begin, end]"]),
    ("offsets are floats", {"w": entry(offsets=(0.0, 16.0))}, bytes(16), ["'w'", "[begin, end]"]),
    ("end before begin", {"w": entry(offsets=(16, 0))}, bytes(16), ["'w'", "span -16 bytes", "needs 16"]),
    ("span too short", {"w": entry(shape=(5,))}, bytes(16), ["'w'", "span 16 bytes", "F32 x [5] needs 20"]),
    ("span too long", {"w": entry(offsets=(0, 32))}, bytes(32), ["'w'", "span 32 bytes"]),
    (
        "overlapping tensors",
        {"a": entry(), "b": entry(offsets=(8, 24))},
        bytes(24),
        ["'b' starts at byte 8", "expected 16", "overlap"],
    ),
    ("gap between tensors", {"a": entry(), "b": entry(offsets=(20, 36))}, bytes(36), ["'b'", "gap"]),
    ("data truncated", {"w": entry()}, bytes(10), ["truncated", "Re-download"]),
    ("bytes after the data", {"w": entry()}, bytes(20), ["4 unexpected bytes after the last tensor"]),
    ("metadata not an object", {"__metadata__": [1], "w": entry()}, bytes(16), ["'__metadata__'"]),
    ("metadata value a number", {"__metadata__": {"a": 1}, "w": entry()}, bytes(16), ["'__metadata__'"]),
    ("header not UTF-8", b'{"w": "\xff\xfe"}', b"", ["unreadable safetensors header"]),
    ("header not JSON", b'{"w": {"dtype": ', b"", ["unreadable safetensors header"]),
]


@pytest.mark.parametrize("name, header, data, words", HEADERS, ids=[case[0] for case in HEADERS])
def test_malformed_safetensors_header_is_named(tmp_path, name, header, data, words):
    path = write_raw(tmp_path / "model.safetensors", header, data)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as error:
        Checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}:"), message
    for word in words:
        assert word in message, message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty file", b"", ["too short for a header"]),
        ("header longer than the file", struct.pack("<Q", 1 << 40) + b"{}", ["header claims"]),
        (
            "git lfs pointer",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n",
            ["Git LFS pointer"],
        ),
    ],
)
def test_not_a_safetensors_file_is_named(tmp_path, name, content, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="|".join(words)) as error:
        Checkpoint(path)
    assert str(error.value).startswith(str(path))
    assert path.read_bytes() == content


# ---- NaN / Inf in high-precision weights -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_file_and_key(tmp_path, dtype, bad):
    weight = torch.randn(4, 4).to(dtype)
    weight[1, 2] = bad
    save_file({"good": torch.ones(2), "layer.weight": weight}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(checkpoint.load("good"), torch.ones(2))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: 'layer.weight' holds NaN or Inf.*Re-download"
    ):
        checkpoint.load("layer.weight")


def test_large_finite_fp16_weights_are_not_mistaken_for_damage(tmp_path):
    big = torch.full((100, 100), 60000.0, dtype=torch.float16)  # finite, though their fp16 sum is Inf
    save_file({"big": big}, tmp_path / "model.safetensors")
    assert torch.equal(Checkpoint(tmp_path / "model.safetensors").load("big"), big)


def test_overflow_on_conversion_is_told_apart_from_a_damaged_file(tmp_path):
    save_file({"big": torch.full((3,), 1e30)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'big': its values overflow torch.float16"):
        Checkpoint(tmp_path / "model.safetensors").load("big", dtype=torch.float16)


def test_non_finite_weight_in_a_pth_vae_is_named(tmp_path):
    from conftest import load_tensors

    weights = load_tensors(FIXTURES / "wan22_vae_tiny" / "weights.safetensors")
    key = sorted(weights)[3]
    weights[key] = weights[key].clone().fill_(float("nan"))
    torch.save(weights, tmp_path / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match=rf"Wan2.2_VAE.pth: '{key}' holds NaN or Inf"):
        load_wan_vae(tmp_path / "Wan2.2_VAE.pth")


def test_non_finite_weight_in_the_audio_vae_is_named(tmp_path):
    from safetensors.torch import load_file

    path = write_audio_vae(tmp_path / "model.safetensors", 0)
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][..., 0] = float("inf")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: '{key}' holds NaN or Inf"):
        load_audio_vae(path)


# ---- the Turbo VAE's JSON config -------------------------------------------------------------------------
def turbo_config(tmp_path, change):
    raw = json.loads((TURBO / "config.json").read_text())
    change(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path / "config.json"


REQUIRED_TURBO_KEYS = ["latent_channels", "decoder_block_out_channels", "decoder_layers_per_block",
                       "decoder_spatio_temporal_scaling", "decoder_spatio_only"]  # fmt: skip


@pytest.mark.parametrize("key", REQUIRED_TURBO_KEYS)
def test_turbo_config_without_a_key_names_it(tmp_path, key):
    config = turbo_config(tmp_path, lambda raw: raw.pop(key))
    with pytest.raises(CheckpointError, match=rf"config.json: the Turbo VAE config has no '{key}'"):
        load_turbo_vae(config, TURBO / "weights.safetensors")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda raw: raw.update(latent_channels="48"), "'latent_channels' must be a JSON integer"),
        (lambda raw: raw.update(decoder_spatio_only=True), "'decoder_spatio_only' must be a JSON list"),
        (lambda raw: raw.update(decoder_layers_per_block=[1]), "describes no valid decoder"),
        (lambda raw: raw.update(decoder_causal=True), r"unsupported Turbo VAE options \['decoder_causal'\]"),
    ],
)
def test_turbo_config_with_a_wrong_value_names_it(tmp_path, change, words):
    config = turbo_config(tmp_path, change)
    with pytest.raises(CheckpointError, match=words) as error:
        load_turbo_vae(config, TURBO / "weights.safetensors")
    assert str(config) in str(error.value)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\xff"])
def test_turbo_config_that_is_not_an_object_is_named(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(
        CheckpointError, match="config.json: (cannot read|a Turbo VAE config is a JSON object)"
    ):
        load_turbo_vae(tmp_path / "config.json", TURBO / "weights.safetensors")


# ---- T5-Gemma config and tokenizer files -----------------------------------------------------------------
@pytest.fixture(scope="module")
def t5gemma(tmp_path_factory):
    return write_text_encoder(tmp_path_factory.mktemp("t5") / "t5gemma-9b-9b-ul2", seed=0)


def edited(t5gemma, tmp_path, name, edit):
    folder = tmp_path / "t5gemma-9b-9b-ul2"
    shutil.copytree(t5gemma, folder)
    edit(folder / name)
    return folder


def edit_json(change):
    def apply(path):
        raw = json.loads(path.read_text())
        change(raw)
        path.write_text(json.dumps(raw))

    return apply


T5_CASES = [
    ("config.json", lambda p: p.write_text("{oops"), "config.json: cannot read the T5-Gemma config"),
    ("config.json", lambda p: p.write_text("[]"), "config.json: cannot read the T5-Gemma config"),
    (
        "config.json",
        edit_json(lambda c: c["encoder"].update(hidden_size=1024)),
        "'encoder.hidden_size' is 1024",
    ),
    ("config.json", edit_json(lambda c: c["encoder"].update(intermediate_size=96)), "config.json describes"),
    ("config.json", edit_json(lambda c: c["encoder"].update(vocab_size=None)), "config.json: cannot read"),
    ("config.json", edit_json(lambda c: c["encoder"].update(head_dim="x")), "config.json: cannot read"),
    ("config.json", edit_json(lambda c: c["encoder"].update(num_attention_heads=0)), "config.json: "),
    ("tokenizer.json", lambda p: p.write_text('{"model": '), "tokenizer.json: unreadable"),
    ("tokenizer_config.json", lambda p: p.write_text("nope"), "tokenizer_config.json: unreadable"),
    ("tokenizer.json", lambda p: p.write_text('{"model": {}}'), "cannot load the T5-Gemma tokenizer"),
]


@pytest.mark.parametrize("name, edit, words", T5_CASES)
def test_t5gemma_bad_config_or_tokenizer_names_the_file(t5gemma, tmp_path, name, edit, words):
    folder = edited(t5gemma, tmp_path, name, edit)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=words) as error:
        load_text_encoder(folder)
    assert str(folder) in str(error.value)
    assert snapshot(folder) == before


# ---- pickles: what they would import, code versus damage, outputs ------------------------------------------
class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


class TrainerState:
    step = 340000


def write_pickles(folder):
    """name -> path of every kind of file convert-pickle and the loaders meet."""
    folder.mkdir(exist_ok=True)
    files = {}
    torch.save({"w": torch.ones(2)}, files.setdefault("tensors", folder / "tensors.pth"))
    torch.save({"w": torch.ones(2), "x": Exploit()}, files.setdefault("exploit", folder / "exploit.pth"))
    torch.save({"w": torch.ones(2), "t": TrainerState()}, files.setdefault("object", folder / "object.ckpt"))
    legacy = files.setdefault("legacy exploit", folder / "legacy.pth")
    torch.save({"w": torch.ones(2), "x": Exploit()}, legacy, _use_new_zipfile_serialization=False)
    with open(files.setdefault("protocol 4 exploit", folder / "p4.pkl"), "wb") as f:
        pickle.dump({"x": Exploit()}, f, protocol=4)
    files.setdefault("random bytes", folder / "random.pth").write_bytes(os.urandom(4096))
    whole = files["tensors"].read_bytes()
    files.setdefault("truncated zip", folder / "cut.pth").write_bytes(whole[: len(whole) // 2])
    torch.save({"w": torch.ones(2)}, folder / "old.pth", _use_new_zipfile_serialization=False)
    files.setdefault("truncated legacy", folder / "cut_old.pth").write_bytes(
        (folder / "old.pth").read_bytes()[:40]
    )
    with zipfile.ZipFile(files.setdefault("zip without pickle", folder / "other.pth"), "w") as archive:
        archive.writestr("readme.txt", "hello")
    files.setdefault("empty", folder / "empty.pth").write_bytes(b"")
    return files


DAMAGED = {
    "random bytes": "not a PyTorch file or pickle, or damaged",
    "truncated zip": "damaged or truncated PyTorch archive",
    "truncated legacy": "truncated: the pickle ends before its STOP opcode",
    "zip without pickle": "no single data.pkl inside",
    "empty": "empty file",
}
CODE = {"exploit": "posix.system", "legacy exploit": "posix.system", "protocol 4 exploit": "posix.system",
        "object": "test_bad_files.TrainerState"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_pickle_is_reported_as_damage_not_as_code(tmp_path, kind):
    path = write_pickles(tmp_path / "in")[kind]
    for attempt in (
        lambda: load_torch_file(path),
        lambda: convert_pickle(path, tmp_path / "out.safetensors"),
    ):
        with pytest.raises(CheckpointError, match=DAMAGED[kind]) as error:
            attempt()
        assert str(path) in str(error.value) and "refused" not in str(error.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", sorted(CODE))
def test_code_carrying_pickle_lists_its_globals_and_runs_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    path = write_pickles(tmp_path / "in")[kind]
    assert CODE[kind] in scan_pickle(path).code
    with pytest.raises(
        CheckpointError, match=rf"refused to load: unpickling it would import and call .*{CODE[kind]}"
    ):
        load_torch_file(path)
    with pytest.raises(CheckpointError, match=rf"not converted: .*{CODE[kind]}.*--trust-pickle"):
        convert_pickle(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "pwned-by-pickle").exists()


def test_tensor_only_pickle_needs_no_trust(tmp_path):
    path = write_pickles(tmp_path / "in")["tensors"]
    assert scan_pickle(path).code == ()
    assert convert_pickle(path, tmp_path / "out.safetensors")[0] == 1
    assert torch.equal(Checkpoint(tmp_path / "out.safetensors").load("w"), torch.ones(2))


def test_convert_pickle_cli_lists_imports_first_and_needs_the_trust_flag(tmp_path, capsys):
    path = write_pickles(tmp_path / "in")["object"]
    out = tmp_path / "out.safetensors"
    cli = load_cli()
    assert cli.main(["convert-pickle", "--input", str(path), "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "imports: torch._utils._rebuild_tensor_v2" in captured.out and "TrainerState" in captured.out
    assert captured.err.count("\n") == 1 and "--trust-pickle" in captured.err and not out.exists()
    assert cli.main(["convert-pickle", "--input", str(path), "--output", str(out), "--trust-pickle"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_pickle_never_replaces_an_output_silently(tmp_path, overwrite):
    path = write_pickles(tmp_path / "in")["tensors"]
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier result")
    if overwrite:
        convert_pickle(path, out, overwrite=True)
        assert Checkpoint(out).keys() == ["w"]
    else:
        with pytest.raises(OutputError, match=r"out.safetensors: already exists.*--overwrite"):
            convert_pickle(path, out)
        assert out.read_bytes() == b"earlier result"


@pytest.mark.parametrize("name, words", [("folder.safetensors", "is a folder; choose another name"),
                                         ("out.pth", "must end in .safetensors")])  # fmt: skip
def test_convert_pickle_refuses_unusable_outputs(tmp_path, name, words):
    path = write_pickles(tmp_path / "in")["tensors"]
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(OutputError, match=words) as error:
        convert_pickle(path, tmp_path / name)
    assert str(tmp_path / name) in str(error.value)
    assert not (tmp_path / "out.pth").exists()


def test_every_error_here_is_the_packs_own_type():
    assert issubclass(CheckpointError, MagiHumanError) and issubclass(OutputError, MagiHumanError)
