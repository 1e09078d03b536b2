"""Reading every FP8 convention into one form, and refusing unknown, contradictory or scale-less files."""

import json
import logging

import pytest
import torch
from conftest import FIXTURES, load_tensors
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.fp8.formats import Convention, FormatError, Fp8Reader
from magihuman.fp8.quantize import FP8_DTYPE, Fp8Weight, Granularity, quantize
from safetensors.torch import save_file

QKV = "block.layers.0.attention.linear_qkv.weight"
DOWN = "block.layers.2.mlp.down_proj.weight"
NORM = "block.layers.2.mlp.pre_norm.weight"


def reference_weights() -> dict[str, Fp8Weight]:
    """Two FP8 weights as the published converter made them (from the golden tiny checkpoint)."""
    published = load_tensors(FIXTURES / "dit_tiny_fp8" / "checkpoint")
    return {key: Fp8Weight(published[key], published[key + ".__fp8_scale"]) for key in (QKV, DOWN)}


def norm() -> torch.Tensor:
    return torch.linspace(-1, 1, 128, dtype=torch.bfloat16)


def write(path, tensors, metadata=None, index_metadata=None):
    """One file, or (with index_metadata) a folder of one shard per tensor group plus an index."""
    if index_metadata is None:
        save_file(tensors, path, metadata=metadata)
        return path
    path.mkdir()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, path / name, metadata=metadata)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": index_metadata, "weight_map": weight_map})
    )
    return path


def comfy_quant(config: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(config).encode()), dtype=torch.uint8)


def every_convention(tmp_path) -> dict[str, Checkpoint]:
    weights = reference_weights()
    fp8 = {k: w.data for k, w in weights.items()}
    modules = [k.removesuffix(".weight") for k in weights]
    layers = {m: {"format": "float8_e4m3fn"} for m in modules}
    files = {
        "published": write(
            tmp_path / "published",
            fp8 | {k + ".__fp8_scale": w.scale for k, w in weights.items()} | {NORM: norm()},
            index_metadata={"total_size": 0, "quantization": "fp8_e4m3fn_per_tensor"},
        ),
        "comfy_quant tensors": write(
            tmp_path / "comfy.safetensors",
            fp8
            | {m + ".weight_scale": weights[m + ".weight"].scale for m in modules}
            | {m + ".comfy_quant": comfy_quant(layers[m]) for m in modules}
            | {NORM: norm()},
        ),
        "comfy header": write(
            tmp_path / "comfy_header.safetensors",
            fp8
            | {m + ".weight_scale": weights[m + ".weight"].scale.reshape(1) for m in modules}
            | {NORM: norm()},
            metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})},
        ),
        "comfy legacy": write(
            tmp_path / "legacy.safetensors",
            fp8
            | {m + ".scale_weight": weights[m + ".weight"].scale for m in modules}
            | {"scaled_fp8": torch.empty(0, dtype=FP8_DTYPE), NORM: norm()},
        ),
        "plain": write(
            tmp_path / "plain.safetensors",
            {k: w.dequantize(torch.bfloat16) for k, w in weights.items()} | {NORM: norm()},
        ),
    }
    return {name: Checkpoint(path) for name, path in files.items()}


def test_every_convention_gives_the_same_effective_weights(tmp_path):
    weights = reference_weights()
    expected_conventions = {
        "published": Convention.PUBLISHED,
        "comfy_quant tensors": Convention.COMFY,
        "comfy header": Convention.COMFY,
        "comfy legacy": Convention.COMFY_LEGACY,
        "plain": Convention.PLAIN,
    }
    for name, checkpoint in every_convention(tmp_path).items():
        reader = Fp8Reader(checkpoint)
        assert reader.convention is expected_conventions[name], name
        assert sorted(reader.keys()) == sorted([QKV, DOWN, NORM]), name  # scales and markers consumed
        assert torch.equal(reader.load(NORM), norm())
        for key, weight in weights.items():
            # bf16 of q·s: exactly what the plain checkpoint stores, so all five agree bit for bit.
            assert torch.equal(reader.load(key, dtype=torch.bfloat16), weight.dequantize(torch.bfloat16)), (
                name
            )
        if name != "plain":
            assert sorted(reader.fp8_keys()) == sorted([QKV, DOWN])
            assert reader.granularities == {Granularity.TENSOR}
            loaded = reader.load_fp8(DOWN)
            assert torch.equal(loaded.data.view(torch.uint8), weights[DOWN].data.view(torch.uint8))
            assert loaded.scale.shape == () and torch.equal(loaded.scale, weights[DOWN].scale)


def test_published_golden_checkpoint_reads_as_published():
    reader = Fp8Reader(Checkpoint(FIXTURES / "dit_tiny_fp8" / "checkpoint"))
    assert reader.convention is Convention.PUBLISHED and reader.granularities == {Granularity.TENSOR}
    assert len(reader.fp8_keys()) == 24 and not reader.is_fp8(NORM)  # 6 layers x 4 block linears
    up = reader.load_fp8("block.layers.2.mlp.up_gate_proj.weight")
    assert up.shape == (680, 128) and up.scale.dtype == torch.float32


def test_reader_never_hands_out_a_bare_fp8_tensor(tmp_path):
    for name, checkpoint in every_convention(tmp_path).items():
        reader = Fp8Reader(checkpoint)
        for key in reader.keys():
            assert reader.load(key).dtype != FP8_DTYPE, (name, key)
        for key in checkpoint.keys():
            if key not in reader.keys():  # scales and markers are not weights
                with pytest.raises(FormatError, match="bookkeeping"):
                    reader.load(key)


def test_high_precision_weights_are_quantized_while_loading(tmp_path):
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    reader = Fp8Reader(
        Checkpoint(write(tmp_path / "plain.safetensors", {"m.weight": weight, "m.bias": weight[0].clone()}))
    )
    loaded = reader.load_fp8("m.weight", scales=Granularity.EXPERT, num_experts=3)
    reference = quantize(weight, Granularity.EXPERT, 3)
    assert torch.equal(loaded.data.view(torch.uint8), reference.data.view(torch.uint8))
    assert torch.equal(loaded.scale, reference.scale) and loaded.scale.shape == (3,)
    with pytest.raises(FormatError, match="not a weight matrix"):
        reader.load_fp8("m.bias")


def test_per_expert_and_per_row_scales_are_recognised_by_shape(tmp_path):
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    expert, row = quantize(weight, Granularity.EXPERT, 3), quantize(weight, Granularity.ROW)
    tensors = {
        "a.weight": expert.data,
        "a.weight.__fp8_scale": expert.scale,
        "b.weight": row.data,
        "b.weight.__fp8_scale": row.scale.reshape(48, 1),  # [rows, 1] is read as per row
    }
    reader = Fp8Reader(Checkpoint(write(tmp_path / "mixed.safetensors", tensors)))
    assert reader.granularities == {Granularity.EXPERT, Granularity.ROW}
    assert reader.load_fp8("b.weight").scale.shape == (48,)
    torch.testing.assert_close(reader.load("a.weight", dtype=torch.float32), expert.dequantize(torch.float32))


def test_static_input_scales_are_reported_and_not_silently_used(tmp_path, caplog):
    weight = reference_weights()[DOWN]
    tensors = {DOWN: weight.data, DOWN.replace("weight", "weight_scale"): weight.scale}
    module = DOWN.removesuffix(".weight")
    one = write(tmp_path / "one.safetensors", tensors | {module + ".input_scale": torch.tensor(1.0)})
    assert Fp8Reader(Checkpoint(one)).ignored_input_scales == []
    half = write(tmp_path / "half.safetensors", tensors | {module + ".input_scale": torch.tensor(0.5)})
    with caplog.at_level(logging.WARNING):
        reader = Fp8Reader(Checkpoint(half))
    assert reader.ignored_input_scales == [module + ".input_scale"]
    assert "1 static input scales are not used" in caplog.text
    assert module + ".input_scale" not in reader.keys()


def test_legacy_marker_with_two_elements_asks_for_full_precision_matmul(tmp_path):
    weight = reference_weights()[DOWN]
    module = DOWN.removesuffix(".weight")
    tensors = {DOWN: weight.data, module + ".scale_weight": weight.scale, "scaled_fp8": torch.zeros(2)}
    reader = Fp8Reader(Checkpoint(write(tmp_path / "legacy.safetensors", tensors)))
    assert reader.convention is Convention.COMFY_LEGACY and reader.full_precision_matmul


def bad_checkpoint(tmp_path, case):
    weight = reference_weights()[DOWN]
    module = DOWN.removesuffix(".weight")
    published = {DOWN: weight.data, DOWN + ".__fp8_scale": weight.scale}
    comfy = {DOWN: weight.data, module + ".weight_scale": weight.scale}
    path = tmp_path / "bad.safetensors"
    if case == "unknown comfy format":
        return write(path, comfy | {module + ".comfy_quant": comfy_quant({"format": "nvfp4"})})
    if case == "unknown comfy layer option":
        return write(
            path, comfy | {module + ".comfy_quant": comfy_quant({"format": "float8_e4m3fn", "group": 32})}
        )
    if case == "comfy configs disagree":
        header = {"layers": {module: {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}}}
        tensors = comfy | {module + ".comfy_quant": comfy_quant({"format": "float8_e4m3fn"})}
        return write(path, tensors, metadata={"_quantization_metadata": json.dumps(header)})
    if case == "comfy config for a missing layer":
        header = {"layers": {module: {"format": "float8_e4m3fn"}, "other": {"format": "float8_e4m3fn"}}}
        return write(path, comfy, metadata={"_quantization_metadata": json.dumps(header)})
    if case == "unknown metadata":
        return write(path, published, metadata={"quantization_config": "{}"})
    if case == "unknown published quantization":
        return write(tmp_path / "folder", published, index_metadata={"quantization": "fp8_e4m3fn_blockwise"})
    if case == "metadata contradicts scales":
        expert = quantize(weight.dequantize(torch.float32), Granularity.EXPERT, 2)
        tensors = {DOWN: expert.data, DOWN + ".__fp8_scale": expert.scale}
        return write(tmp_path / "folder", tensors, index_metadata={"quantization": "fp8_e4m3fn_per_tensor"})
    if case == "mixed conventions":
        return write(path, published | {module + ".weight_scale": weight.scale.clone()})
    if case == "scale without fp8 weight":
        return write(path, {DOWN: weight.dequantize(), DOWN + ".__fp8_scale": weight.scale})
    if case == "fp8 without scale":
        return write(path, {DOWN: weight.data, NORM: norm()})
    if case == "scale of the wrong shape":
        return write(path, {DOWN: weight.data, DOWN + ".__fp8_scale": torch.ones(5)})
    if case == "e5m2 weights":
        return write(
            path, {DOWN: weight.data.float().to(torch.float8_e5m2), DOWN + ".__fp8_scale": weight.scale}
        )
    if case == "fp16 legacy marker":
        tensors = {DOWN: weight.data, module + ".scale_weight": weight.scale}
        return write(path, tensors | {"scaled_fp8": torch.empty(0, dtype=torch.float16)})
    if case == "negative scale":
        return write(path, {DOWN: weight.data, DOWN + ".__fp8_scale": -weight.scale})
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown comfy format", r"layer 'block.layers.2.mlp.down_proj' has quantization config .*nvfp4"),
        ("unknown comfy layer option", r"'group': 32\}; only"),
        ("comfy configs disagree", "has two different configs"),
        ("comfy config for a missing layer", "disagree about layer 'other'"),
        ("unknown metadata", "unknown quantization metadata 'quantization_config'"),
        ("unknown published quantization", "unknown metadata quantization 'fp8_e4m3fn_blockwise'"),
        (
            "metadata contradicts scales",
            "metadata says 'fp8_e4m3fn_per_tensor' but the scales found are: expert",
        ),
        ("mixed conventions", r"mixes FP8 conventions: published .*; comfy"),
        (
            "scale without fp8 weight",
            "belongs to 'block.layers.2.mlp.down_proj.weight', which is torch.bfloat16",
        ),
        ("fp8 without scale", "FP8 tensor 'block.layers.2.mlp.down_proj.weight' has no scale"),
        ("scale of the wrong shape", r"fits no granularity for a weight with 128 rows"),
        ("e5m2 weights", "is torch.float8_e5m2; only float8_e4m3fn"),
        ("fp16 legacy marker", "marker 'scaled_fp8' names torch.float16"),
    ],
)
def test_unknown_contradictory_or_incomplete_quantization_is_refused(tmp_path, case, message):
    path = bad_checkpoint(tmp_path, case)
    with pytest.raises(FormatError, match=message) as error:
        Fp8Reader(Checkpoint(path))
    assert str(tmp_path) in str(error.value)  # the message names the file or folder


def test_a_bad_scale_value_is_refused_when_loaded(tmp_path):
    reader = Fp8Reader(Checkpoint(bad_checkpoint(tmp_path, "negative scale")))
    with pytest.raises(FormatError, match=r"bad.safetensors: scale '.*__fp8_scale' holds zero, negative"):
        reader.load_fp8(DOWN)
