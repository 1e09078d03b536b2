"""The DiT loader reads every tensor straight into the buffer it lives in: no second copy of any weight at
any moment (counted with a live-storage counter), and no loaded tensor aliasing a shard's memory map."""

import shutil

import torch
from conftest import FIXTURES
from magihuman.benchmarks.live_bytes import LiveBytes
from magihuman.fp8.linear import Fp8Linear
from magihuman.pipeline.dit import loading
from magihuman.pipeline.dit.loading import load_dit
from magihuman.pipeline.dit.model import MagiDiT

FP8 = FIXTURES / "dit_tiny_fp8" / "checkpoint"
WEIGHTS = FIXTURES / "dit_tiny_weights"


def storage_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the model's distinct storages, bytes of the largest one)."""
    sizes = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        sizes[storage._cdata] = storage.nbytes()
    return sum(sizes.values()), max(sizes.values())


def test_the_fixture_pads_like_the_real_model():
    model, _ = load_dit(FP8, "base", compute="dequantize")
    layer = model.block.layers[2]
    # qkv N 200 and up_gate N 680 pad their rows, down K 340 its columns: the cases of the real model.
    padded = [
        m for m in layer.modules() if isinstance(m, Fp8Linear) and m.weight_padded.shape != m.weight.shape
    ]
    assert len(padded) == 3


def test_cpu_load_allocates_the_model_once_and_holds_nothing_else():
    with LiveBytes(device="cpu") as counter:
        model, _ = load_dit(FP8, "base", compute="dequantize")
    model_bytes, largest = storage_bytes(model)
    # The peak may exceed the model by one tensor in flight (a dtype conversion); nothing is kept beside it.
    assert counter.peak <= model_bytes + largest
    assert counter.live == model_bytes


def test_device_load_holds_no_unpadded_copy_of_a_padded_weight(monkeypatch):
    # On a device every tensor read is a fresh allocation (the GPU case, here on "meta"): reading into the
    # padded buffer avoids holding a checkpoint-shaped copy beside it until load_state_dict pads it.
    counter = LiveBytes(device="meta")

    def build_then_count(*args, **kwargs):  # the meta placeholders of the build are no device memory
        model = MagiDiT(*args, **kwargs)
        counter.__enter__()
        return model

    monkeypatch.setattr(loading, "MagiDiT", build_then_count)
    try:
        model, _ = load_dit(FP8, "base", compute="fp8-matmul", device="meta")
    finally:
        counter.__exit__(None, None, None)
    model_bytes, largest = storage_bytes(model)
    assert counter.live == model_bytes
    assert counter.peak <= model_bytes + largest


def test_quantizing_while_loading_writes_into_the_padded_buffer():
    with LiveBytes(device="cpu") as counter:
        model, _ = load_dit(WEIGHTS, "base", compute="dequantize")
    model_bytes, largest = storage_bytes(model)
    assert counter.live == model_bytes
    # A float32 source is quantized in row chunks (float32 temporaries of about 64 MB at most).
    assert counter.peak <= model_bytes + 4 * largest


def test_loaded_tensors_do_not_alias_the_checkpoint_files(tmp_path):
    folder = shutil.copytree(FP8, tmp_path / "checkpoint")
    model, _ = load_dit(folder, "base", compute="dequantize")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for shard in folder.glob("*.safetensors"):  # overwrite the data in place: mapped pages would change
        size = shard.stat().st_size
        with shard.open("r+b") as f:
            f.seek(size // 8)
            f.write(b"\x11" * (size - size // 8))
    after = model.state_dict()
    raw = {k: v.reshape(-1).view(torch.uint8) for k, v in before.items()}
    changed = [k for k in before if not torch.equal(raw[k], after[k].reshape(-1).view(torch.uint8))]
    assert not changed
