"""The converter: byte parity with the published conversion, round trips, layouts, bad inputs, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, load_tensors
from magihuman.fp8.checkpoint import Checkpoint, CheckpointError
from magihuman.fp8.convert import ConvertOptions, convert_checkpoint, magihuman_experts
from magihuman.fp8.formats import Convention, Fp8Reader
from magihuman.fp8.quantize import FP8_DTYPE, Granularity, quantize, sqnr_db
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GOLDEN = FIXTURES / "dit_tiny_fp8"
SMALL = 1 << 11  # --min-elements for the tiny checkpoints below: their block weights have 3k-16k elements


def tiny_dit(dtype: torch.dtype, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Two shards shaped like the DiT (a 3-expert layer and a shared one), hidden size 32."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.05).to(dtype)

    first = {
        "adapter.text_embedder.weight": randn(32, 256),  # big enough, but skipped by name
        "adapter.text_embedder.bias": randn(32),
        "block.layers.0.attention.pre_norm.weight": randn(3 * 32),
        "block.layers.0.attention.linear_qkv.weight": randn(3 * 56, 32),
        "block.layers.0.attention.linear_proj.weight": randn(3 * 32, 32),
        "block.layers.0.mlp.up_gate_proj.weight": randn(3 * 168, 32),
        "block.layers.0.mlp.down_proj.weight": randn(3 * 32, 84),
    }
    second = {
        "block.layers.1.attention.pre_norm.weight": randn(32),
        "block.layers.1.attention.linear_qkv.weight": randn(56 * 4, 32),
        "block.layers.1.mlp.down_proj.weight": randn(32 * 4, 84),
        "final_linear_video.weight": randn(12, 32),  # under the size threshold
        "step": torch.tensor([7], dtype=torch.int64),  # not floating: kept as it is
    }
    return {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}


def write_sharded(folder, shards, metadata=None):
    folder.mkdir(parents=True)
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": metadata or {"total_size": 1}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


QUANTIZED = {
    "block.layers.0.attention.linear_qkv.weight",
    "block.layers.0.attention.linear_proj.weight",
    "block.layers.0.mlp.up_gate_proj.weight",
    "block.layers.0.mlp.down_proj.weight",
    "block.layers.1.attention.linear_qkv.weight",
    "block.layers.1.mlp.down_proj.weight",
}


def test_converter_reproduces_the_published_files_byte_for_byte(tmp_path):
    originals = load_tensors(FIXTURES / "dit_tiny_weights")
    down, norm = "block.layers.2.mlp.down_proj.weight", "block.layers.2.mlp.pre_norm.weight"
    source = {down: originals[down], norm: originals[norm]}  # bf16 and fp32 originals
    save_file(source, tmp_path / "source.safetensors")
    convert_checkpoint(tmp_path / "source.safetensors", tmp_path / "out", ConvertOptions(min_elements=0))
    converted = load_file(tmp_path / "out" / "source.safetensors")
    published = load_tensors(GOLDEN / "checkpoint")
    assert set(converted) == {down, down + ".__fp8_scale", norm}
    for key, tensor in converted.items():
        assert tensor.dtype == published[key].dtype and tensor.shape == published[key].shape
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), published[key].reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_of_a_sharded_checkpoint(tmp_path, dtype):
    shards = tiny_dit(dtype)
    source = write_sharded(tmp_path / "source", shards, {"total_size": 999, "format": "pt"})
    seen = []
    report = convert_checkpoint(
        source, tmp_path / "fp8", ConvertOptions(min_elements=SMALL), lambda r, done, total: seen.append(done)
    )
    out = tmp_path / "fp8"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "model.safetensors.index.json"])
    assert seen == sorted(seen) and seen[-1] == sum(t.nbytes for s in shards.values() for t in s.values())
    assert {t.key for t in report.quantized} == QUANTIZED
    assert all(0.015 < t.relative_error < 0.03 for t in report.quantized)  # ~2.25 % (see quantize tests)

    # Plain safetensors reads every shard; each holds the keys of its source shard plus their scales.
    for name, tensors in shards.items():
        converted = load_file(out / name)
        scales = {k + ".__fp8_scale" for k in tensors if k in QUANTIZED}
        assert set(converted) == set(tensors) | scales
        for key, tensor in tensors.items():
            expected = FP8_DTYPE if key in QUANTIZED else tensor.dtype if key == "step" else torch.bfloat16
            assert converted[key].dtype == expected, key

    index = json.loads((out / "model.safetensors.index.json").read_text())
    real_size = sum(
        t.nbytes for p in out.glob("*.safetensors") for t in load_file(p).values()
    )  # the stale 999 of the source is replaced by the real byte count
    assert index["metadata"] == {
        "total_size": real_size,
        "format": "pt",
        "quantization": "fp8_e4m3fn_per_tensor",
    }

    reader = Fp8Reader(Checkpoint(out))
    assert reader.convention is Convention.PUBLISHED and set(reader.fp8_keys()) == QUANTIZED
    for tensors in shards.values():
        for key, tensor in tensors.items():
            restored = reader.load(key, dtype=torch.float32)
            if key in QUANTIZED:
                assert sqnr_db(tensor.float(), restored) > 30.0  # e4m3 weights: ~31.5 dB
            else:
                torch.testing.assert_close(restored, tensor.float(), rtol=2**-8, atol=0)  # a bf16 rounding


def test_single_file_in_both_output_formats_holds_the_same_weights(tmp_path):
    tensors = tiny_dit(torch.float32)["model-00001-of-00002.safetensors"]
    save_file(tensors, tmp_path / "dit.safetensors")
    convert_checkpoint(
        tmp_path / "dit.safetensors", tmp_path / "published", ConvertOptions(min_elements=SMALL)
    )
    comfy = ConvertOptions(min_elements=SMALL, format=Convention.COMFY)
    report = convert_checkpoint(tmp_path / "dit.safetensors", tmp_path / "comfy", comfy)
    assert [p.name for p in report.files] == ["dit.safetensors"]  # one file, no index
    with safe_open(tmp_path / "comfy" / "dit.safetensors", "pt") as f:
        header = json.loads(f.metadata()["_quantization_metadata"])
        assert "block.layers.0.mlp.down_proj.weight_scale" in f.keys()
    assert header["format_version"] == "1.0"
    assert header["layers"]["block.layers.0.mlp.down_proj"] == {"format": "float8_e4m3fn"}
    published, comfy = (
        Fp8Reader(Checkpoint(tmp_path / "published")),
        Fp8Reader(Checkpoint(tmp_path / "comfy")),
    )
    assert comfy.convention is Convention.COMFY and sorted(comfy.keys()) == sorted(published.keys())
    for key in published.fp8_keys():
        a, b = published.load_fp8(key), comfy.load_fp8(key)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(
            a.scale, b.scale
        )


def test_expert_and_row_scales(tmp_path):
    source = write_sharded(tmp_path / "source", tiny_dit(torch.bfloat16))
    for scales, qkv0_shape, qkv1_shape, quantization in [
        (Granularity.EXPERT, (3,), (), "fp8_e4m3fn_per_expert"),
        (Granularity.ROW, (168,), (224,), "fp8_e4m3fn_per_row"),
    ]:
        out = tmp_path / scales.value
        convert_checkpoint(source, out, ConvertOptions(min_elements=SMALL, scales=scales))
        reader = Fp8Reader(Checkpoint(out))
        assert reader.load_fp8("block.layers.0.attention.linear_qkv.weight").scale.shape == qkv0_shape
        assert reader.load_fp8("block.layers.1.attention.linear_qkv.weight").scale.shape == qkv1_shape
        assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["quantization"] == (
            quantization
        )
    with pytest.raises(ValueError, match="one scale per tensor"):
        ConvertOptions(format="comfy", scales="row")


def test_experts_are_read_from_the_layer_norm_width(tmp_path):
    source = Checkpoint(write_sharded(tmp_path / "source", tiny_dit(torch.bfloat16)))
    assert magihuman_experts(source, "block.layers.0.mlp.up_gate_proj.weight") == 3
    assert magihuman_experts(source, "block.layers.1.mlp.down_proj.weight") == 1
    assert magihuman_experts(source, "adapter.text_embedder.weight") == 1


def test_every_tensor_is_streamed_through_a_memory_map_released_after_use(tmp_path, monkeypatch):
    # Resident memory stays near one tensor (peak RSS is measured by `cli.py bench fp8`): the mapped pages of
    # a tensor are dropped once it is written, so a shard is never resident as a whole.
    source = write_sharded(tmp_path / "source", tiny_dit(torch.float32))
    released = []
    release = Checkpoint.release
    monkeypatch.setattr(
        Checkpoint, "release", lambda self, file: (released.append(file.name), release(self, file))
    )
    convert_checkpoint(source, tmp_path / "fp8", ConvertOptions(min_elements=SMALL))
    keys = sum(len(t) for t in tiny_dit(torch.float32).values())
    assert len(released) == keys + len(QUANTIZED)  # once per tensor, plus once per absmax pass


def corrupt(folder, case):
    shard = folder / "model-00002-of-00002.safetensors"
    index = folder / "model.safetensors.index.json"
    if case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif case == "missing shard":
        shard.unlink()
    elif case == "index names an absent key":
        content = json.loads(index.read_text())
        content["weight_map"]["block.layers.9.ghost.weight"] = shard.name
        index.write_text(json.dumps(content))
    elif case == "git lfs pointer":
        shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif case == "nan weight":
        tensors = load_file(shard)
        tensors["block.layers.1.mlp.down_proj.weight"][5, 5] = float("nan")
        save_file(tensors, shard)


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated shard", "model-00002-of-00002.safetensors: truncated"),
        (
            "missing shard",
            "model-00002-of-00002.safetensors: shard listed in model.safetensors.index.json is",
        ),
        ("index names an absent key", "places 'block.layers.9.ghost.weight' in this shard, but it is absent"),
        ("git lfs pointer", "model-00002-of-00002.safetensors: this is a Git LFS pointer"),
        ("nan weight", r"00002-of-00002.safetensors: 'block.layers.1.mlp.down_proj.weight' holds NaN or Inf"),
    ],
)
def test_bad_inputs_fail_naming_the_file_and_leave_no_output(tmp_path, case, message):
    source = write_sharded(tmp_path / "source", tiny_dit(torch.float32))
    corrupt(source, case)
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(source, tmp_path / "fp8", ConvertOptions(min_elements=SMALL))
    assert not (tmp_path / "fp8").exists() or not any((tmp_path / "fp8").iterdir())


def test_refuses_fp8_inputs_and_occupied_outputs(tmp_path):
    with pytest.raises(CheckpointError, match="already FP8 \\(published convention\\)"):
        convert_checkpoint(GOLDEN / "checkpoint", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    save_file({"w": quantize(torch.randn(4, 4)).dequantize()}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="must be a new or empty folder"):
        convert_checkpoint(tmp_path / "plain.safetensors", tmp_path / "busy")


def test_cli_convert_prints_errors_per_tensor_and_writes_the_checkpoint(tmp_path):
    source = write_sharded(tmp_path / "source", tiny_dit(torch.bfloat16))
    command = [sys.executable, str(ROOT / "cli.py"), "convert", "--input", str(source), "--output"]
    done = subprocess.run(
        [*command, str(tmp_path / "fp8"), "--min-elements", str(SMALL)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "block.layers.0.mlp.up_gate_proj.weight  [504x32]  rel_err " in done.stdout
    assert "quantized 6 tensors, kept 6" in done.stdout and "mean relative error" in done.stdout
    assert Fp8Reader(Checkpoint(tmp_path / "fp8")).convention is Convention.PUBLISHED
    failed = subprocess.run(
        [*command, str(tmp_path / "again"), "--format", "comfy", "--scales", "row"],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "error: ComfyUI's float8_e4m3fn layers hold one scale" in failed.stderr
