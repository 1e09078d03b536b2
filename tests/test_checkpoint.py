"""Reading safetensors checkpoints: layouts, lazy dtype/device conversion and every bad-file error."""

import json
import threading

import pytest
import torch
from magihuman.fp8 import file_reads
from magihuman.fp8.checkpoint import Checkpoint, CheckpointError
from safetensors.torch import save_file


def write_sharded(folder, shards):
    """shards: {file name: {key: tensor}} -> folder with an index like the published ones."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def sharded(tmp_path):
    return write_sharded(
        tmp_path / "ckpt",
        {
            "model-00001-of-00002.safetensors": {"a.weight": torch.randn(4, 8), "a.bias": torch.randn(4)},
            "model-00002-of-00002.safetensors": {"b.weight": torch.randn(16, 8, dtype=torch.bfloat16)},
        },
    )


def test_sharded_folder_reads_headers_and_converts_on_load(sharded):
    ckpt = Checkpoint(sharded)
    assert sorted(ckpt.keys()) == ["a.bias", "a.weight", "b.weight"]
    assert ckpt.info("b.weight").shape == (16, 8) and ckpt.info("b.weight").dtype == torch.bfloat16
    assert ckpt.metadata == {"total_size": 0}
    loaded = ckpt.load("a.weight", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.shape == (4, 8)


def test_single_file_and_folder_with_one_file(tmp_path):
    save_file({"x": torch.ones(3)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for path in (tmp_path / "model.safetensors", tmp_path):
        ckpt = Checkpoint(path)
        assert ckpt.keys() == ["x"] and ckpt.metadata == {"format": "pt"}
        torch.testing.assert_close(ckpt.load("x"), torch.ones(3))


def test_folder_with_several_files_and_no_index_is_ambiguous(tmp_path):
    save_file({"x": torch.ones(3)}, tmp_path / "one.safetensors")
    save_file({"y": torch.ones(3)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="one.safetensors, two.safetensors"):
        Checkpoint(tmp_path)


def test_truncated_shard_names_the_file(sharded):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: truncated"):
        Checkpoint(sharded)


def test_missing_shard_names_the_file(sharded):
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"model-00001-of-00002.safetensors: shard listed in .* missing"
    ):
        Checkpoint(sharded)


def test_index_key_absent_from_its_shard(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["c.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places 'c.weight' in this shard, but it is absent"):
        Checkpoint(sharded)


def test_shard_key_missing_from_index(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["a.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not list .*'a.bias'"):
        Checkpoint(sharded)


def test_lfs_pointer_in_place_of_a_shard(sharded):
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    (sharded / "model-00001-of-00002.safetensors").write_text(pointer)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors: this is a Git LFS pointer"):
        Checkpoint(sharded)


def test_garbage_file_is_not_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"<html>404</html>" * 4)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(tmp_path / "model.safetensors")


def test_missing_path_and_unknown_key(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        Checkpoint(tmp_path / "nope")
    ckpt = Checkpoint(write_sharded(tmp_path / "c", {"m.safetensors": {"x": torch.ones(1)}}))
    with pytest.raises(CheckpointError, match="no tensor 'zz'"):
        ckpt.info("zz")


@pytest.mark.parametrize("reads", ["scatter", "one view a call", "short"])
def test_large_tensors_are_read_by_several_threads_in_pieces_into_their_final_buffers(
    tmp_path, monkeypatch, reads
):
    """Contiguous destinations are filled piece by piece in threads; a row-strided one (a padded weight)
    straight into its rows, in blocks of rows, leaving its padding alone. The bytes are the file's, with
    scatter reads, one view per read (Windows) and reads that return less than asked."""
    monkeypatch.setattr(file_reads, "PIECE_BYTES", 4096)
    monkeypatch.setattr(file_reads, "READ_THREADS", 3)
    if reads == "one view a call":
        monkeypatch.setattr(file_reads, "SCATTER_VIEWS", 1)
    if reads == "short":
        read_at = file_reads._read_at
        monkeypatch.setattr(file_reads, "_read_at", lambda f, views, at: read_at(f, [views[0][:100]], at))
    threads, calls = set(), []
    fill = file_reads._fill

    def recording_fill(file, offset, views, key):
        threads.add(threading.get_ident())
        calls.append((key, [len(v) for v in views]))
        fill(file, offset, views, key)

    monkeypatch.setattr(file_reads, "_fill", recording_fill)
    weight = torch.randn(300, 37)  # 44 KB: 11 pieces, and 300 rows of 148 bytes in blocks of 27
    codes = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    save_file({"w": weight, "codes": codes}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path / "model.safetensors") as ckpt:
        assert torch.equal(ckpt.load("w"), weight) and torch.equal(ckpt.load("codes"), codes)
        assert [len(sizes) for key, sizes in calls if key == "w"] == [1] * 11
        calls.clear()
        padded = torch.full((301, 48), -1.0)
        ckpt.load_into("w", padded[:300, :37])
    assert [len(sizes) for _, sizes in calls] == [27] * 11 + [3]
    assert {size for _, sizes in calls for size in sizes} == {148}
    assert len(threads) > 1
    assert torch.equal(padded[:300, :37], weight)
    assert (padded[:, 37:] == -1).all() and (padded[300] == -1).all()
