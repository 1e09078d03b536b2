"""The T5-Gemma encoder through transformers on a tiny config and tokenizer built here: both loading paths,
the decoder never read, lengths and padding, the cache, FP8 weights, and the missing-file errors."""

import json

import pytest
import torch
from magihuman.fp8.checkpoint import Checkpoint, CheckpointError
from magihuman.fp8.quantize import sqnr_db
from magihuman.pipeline.codecs.text_encoder import (
    NEGATIVE_PROMPT,
    TARGET_LENGTH,
    TEXT_WIDTH,
    load_text_encoder,
)
from safetensors.torch import save_file

WORDS = "a woman speaks to the camera in a bright kitchen and the man laughs says hello world rain".split()


def write_tokenizer(folder):
    """A small word-level tokenizer with Gemma's special tokens (BOS prepended, no EOS), as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """An HF-layout T5-Gemma folder (encoder + decoder, sharded, indexed) like google/t5gemma-9b-9b-ul2:
    narrow inside, but as wide as T5-Gemma-9B (the loader refuses other widths)."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    folder = tmp_path_factory.mktemp("t5gemma")
    module = dict(
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=1024,
        sliding_window=256,
    )
    torch.manual_seed(0)
    model = T5GemmaForConditionalGeneration(
        T5GemmaConfig(encoder=module, decoder=dict(module), vocab_size=64)
    )
    model.save_pretrained(folder, max_shard_size="4MB")
    write_tokenizer(folder)
    return folder


def test_folder_layout_loads_the_encoder_only_and_never_reads_the_decoder(hf_folder, monkeypatch):
    read = []
    original = Checkpoint.load

    def spy(self, key, *args, **kwargs):
        read.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "load", spy)
    encoder = load_text_encoder(hf_folder, dtype=torch.float32)
    assert read and all(key.startswith("model.encoder.") for key in read)
    assert len(Checkpoint(hf_folder).files) > 1  # sharded, with an index
    assert not hasattr(encoder.model, "decoder")


def test_lengths_padding_and_fp16_rounding(hf_folder):
    encoder = load_text_encoder(hf_folder, dtype=torch.float32)
    embedding = encoder.encode("a woman speaks to the camera")
    assert (
        embedding.features.shape == (1, TARGET_LENGTH, TEXT_WIDTH)
        and embedding.features.dtype == torch.float16
    )
    assert embedding.length == 7  # BOS + 6 words, no padding tokens
    assert embedding.features[:, 7:].abs().max() == 0
    tokens = embedding.tokens()
    assert tokens.shape == (1, 7, TEXT_WIDTH) and tokens.dtype == torch.float32
    ids = encoder.tokenizer(["a woman speaks to the camera"], return_tensors="pt")
    reference = encoder.model(**ids).last_hidden_state
    torch.testing.assert_close(tokens, reference.half().float())
    long = encoder.encode(" ".join(["rain"] * 700))  # trimmed to 640 rows
    assert long.length == TARGET_LENGTH


def test_single_encoder_only_file_with_tokenizer_beside_it(hf_folder, tmp_path):
    full = load_text_encoder(hf_folder, dtype=torch.float32)
    state = {key: tensor for key, tensor in full.model.state_dict().items()}  # "encoder.*" keys
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "t5gemma_encoder.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_folder / name).read_bytes())
    single = load_text_encoder(tmp_path / "t5gemma_encoder.safetensors", dtype=torch.float32)
    prompt = "the man laughs"
    assert torch.equal(single.encode(prompt).features, full.encode(prompt).features)


def test_cache_hits_without_running_the_model(hf_folder):
    encoder = load_text_encoder(hf_folder)
    calls = []
    encoder.model.register_forward_hook(lambda *args: calls.append(1))
    first = encoder.encode(NEGATIVE_PROMPT)
    second = encoder.encode(NEGATIVE_PROMPT)
    assert second is first and len(calls) == 1
    encoder.encode("hello world")
    assert len(calls) == 2


def test_fp8_weights_stay_close_to_bf16(hf_folder):
    bf16 = load_text_encoder(hf_folder).encode("a woman speaks in a bright kitchen")
    fp8_encoder = load_text_encoder(hf_folder, fp8=True)
    linear = fp8_encoder.model.encoder.layers[0].self_attn.q_proj
    assert linear.weight.dtype == torch.float8_e4m3fn
    fp8 = fp8_encoder.encode("a woman speaks in a bright kitchen")
    # Per-tensor e4m3 weights: ~31 dB per linear (fp8 tests), a few layers deep; measured ~27 dB here.
    assert sqnr_db(bf16.tokens(), fp8.tokens()) > 20


def test_missing_files_say_what_is_needed_and_where_it_comes_from(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({}))
    with pytest.raises(
        CheckpointError,
        match=r"needs tokenizer_config.json, tokenizer.json \(or tokenizer.model\).*google/t5gemma",
    ):
        load_text_encoder(folder)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_text_encoder(tmp_path / "absent")


def test_negative_prompt_keeps_its_audio_and_speech_segments():
    assert NEGATIVE_PROMPT.startswith("Bright tones, overexposed, static, blurred details")
    assert (
        "walking backwards, low quality, worst quality, poor quality, noise, background noise"
        in NEGATIVE_PROMPT
    )
    assert "cheap sound, emotionless, flat delivery" in NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.endswith("out of tune, off-key, autotune artifacts")


def test_encoder_bytes_match_the_loaded_weights_and_pick_the_auto_precision(hf_folder):
    from magihuman.pipeline.codecs.text_encoder import (
        ENCODE_ACTIVATION_BYTES,
        choose_precision,
        encoder_bytes,
    )

    def weight_bytes(encoder):
        model = encoder.model
        return sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.float32)

    bf16, fp8 = encoder_bytes(hf_folder, fp8=False), encoder_bytes(hf_folder, fp8=True)
    assert bf16 - ENCODE_ACTIVATION_BYTES == weight_bytes(load_text_encoder(hf_folder))
    loaded_fp8 = weight_bytes(load_text_encoder(hf_folder, fp8=True))  # FP8 rows padded to 16
    assert 0 <= loaded_fp8 - (fp8 - ENCODE_ACTIVATION_BYTES) <= 0.2 * loaded_fp8
    assert fp8 < bf16
    assert choose_precision(hf_folder, bf16) == (False, True)
    assert choose_precision(hf_folder, bf16 - 1) == (True, True)
    assert choose_precision(hf_folder, fp8 - 1) == (False, False)
