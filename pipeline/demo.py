"""The demo: a tiny random-weight MagiHuman stack (DiT and SR DiT, Turbo and Wan2.2 VAEs, audio VAE, T5-Gemma
text encoder) written in the real on-disk layouts under a ComfyUI-style models folder, and the whole
pipeline run on it through the real loaders. It proves the machinery, not the art: the weights are noise."""

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fp8.convert import ConvertOptions, convert_checkpoint
from .codecs.audio_vae import OobleckConfig, OobleckVAE
from .codecs.turbo_vae import TurboConfig, TurboVAEDecoder
from .codecs.wan_vae import WanVAE, WanVAEConfig
from .dit.config import PRESETS, DiTConfig
from .dit.rope import default_bands

PROMPT = (
    "A woman in a bright kitchen looks at the camera, smiles and says hello. "
    'Dialogue: <woman, English>: "Hello world." Background Sound: <soft rain>'
)
TURBO_CONFIG = TurboConfig(block_out_channels=(8, 16, 16, 32))
WAN_CONFIG = WanVAEConfig(dim=8, dec_dim=8)
AUDIO_CONFIG = OobleckConfig(channels=8)
TEXT_WIDTH = 3584  # the DiT reads T5-Gemma-9B features, whatever the encoder's size


def random_dit_state(config: DiTConfig, generator: torch.Generator, device="cpu") -> dict[str, torch.Tensor]:
    """A DiT state dict in the original checkpoint dtypes (bf16 block linears, fp32 everything else), with
    N(0, 0.02) weights, zero norm offsets (RMSNorm weight 1 + 0) and the computed RoPE bands."""
    from .dit.model import MagiDiT

    state = {}
    for key, placeholder in MagiDiT(config, device="meta").state_dict().items():
        if key.endswith("rope.bands"):
            state[key] = default_bands(config.head_dim).to(device)
        elif "norm" in key:
            state[key] = torch.zeros(placeholder.shape, device=device)
        else:
            noise = torch.randn(placeholder.shape, generator=generator, device=device)
            state[key] = noise.mul_(0.02).to(placeholder.dtype)
    return state


def write_dit(folder: Path, config: DiTConfig, seed: int) -> Path:
    """The DiT as published: sharded FP8 (``__fp8_scale`` keys, index with metadata), via the converter."""
    state = random_dit_state(config, torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch)
        half = [
            k for k in state if not k.startswith("block.") or int(k.split(".")[2]) < config.num_layers // 2
        ]
        shards = {
            "model-00001-of-00002.safetensors": half,
            "model-00002-of-00002.safetensors": [k for k in state if k not in half],
        }
        for name, keys in shards.items():
            save_file({k: state[k] for k in keys}, source / name)
        index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items() for k in keys}}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
        # Threshold = one hidden x hidden matrix: exactly the block linears, as 2^20 picks at full size.
        convert_checkpoint(source, folder, ConvertOptions(min_elements=config.hidden_size**2))
    return folder


def write_turbo_vae(folder: Path, seed: int) -> Path:
    """``TurboV3-Wan22-TinyShallow_7_7.json`` + ``checkpoint-340000.ckpt`` (weights under ema_state_dict)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    c = TURBO_CONFIG
    config = {
        "_class_name": "AutoencoderKLTurboVAED",
        "latent_channels": c.latent_channels,
        "decoder_block_out_channels": list(c.block_out_channels),
        "decoder_layers_per_block": list(c.layers_per_block),
        "decoder_spatio_temporal_scaling": list(c.spatio_temporal_scaling),
        "decoder_spatio_only": list(c.spatio_only),
        "decoder_is_dw_conv": [False] * 5,
        "decoder_causal": False,
        "patch_size": c.patch_size,
        "patch_size_t": 1,
        "use_unpatchify": True,
        "first_chunk_size": c.first_chunk_size,
        "step_size": c.step_size,
        "temporal_compression_ratio": c.temporal_compression,
    }
    (folder / "TurboV3-Wan22-TinyShallow_7_7.json").write_text(json.dumps(config, indent=2))
    torch.save({"ema_state_dict": TurboVAEDecoder(c).state_dict()}, folder / "checkpoint-340000.ckpt")
    return folder


def write_wan_vae(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(WanVAE(WAN_CONFIG).state_dict(), path)
    return path


def write_audio_vae(path: Path, seed: int) -> Path:
    """Like ``stable-audio-open-1.0/model.safetensors``: the VAE under ``pretransform.model.`` with
    weight-normed convolutions (``weight_g`` = ‖v‖ per output channel, ``weight_v`` = v)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in OobleckVAE(AUDIO_CONFIG).state_dict().items():
        if key.endswith(".weight") and tensor.ndim == 3:
            module = "pretransform.model." + key.removesuffix(".weight")
            state[module + ".weight_g"] = tensor.norm(dim=(1, 2), keepdim=True)
            state[module + ".weight_v"] = tensor
        else:
            state["pretransform.model." + key] = tensor
    save_file(state, path)
    return path


def build_tokenizer(folder: Path, words: list[str]) -> None:
    """A word-level tokenizer with Gemma's special tokens (BOS prepended), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *dict.fromkeys(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)


def write_text_encoder(folder: Path, seed: int, hidden: int = TEXT_WIDTH) -> Path:
    """An HF-layout T5-Gemma folder (encoder and decoder, sharded with an index), narrow but for its width."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    torch.manual_seed(seed)
    words = PROMPT.replace(".", " ").replace(":", " ").split()
    module = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, vocab_size=len(words) + 4, max_position_embeddings=1024,
                  sliding_window=256)  # fmt: skip
    config = T5GemmaConfig(encoder=module, decoder=dict(module), vocab_size=len(words) + 4)
    T5GemmaForConditionalGeneration(config).save_pretrained(folder, max_shard_size="8MB")
    build_tokenizer(folder, words)
    return folder


def build_models(models_dir: Path, seed: int = 0) -> Path:
    """Every demo model in the folders ComfyUI and ``python cli.py download`` use."""
    write_dit(models_dir / "diffusion_models" / "distill_fp8", PRESETS["demo"], seed)
    write_dit(models_dir / "diffusion_models" / "540p_sr_fp8", PRESETS["demo_sr"], seed + 1)
    write_turbo_vae(models_dir / "vae" / "turbo_vae", seed + 2)
    write_wan_vae(models_dir / "vae" / "Wan2.2_VAE.pth", seed + 3)
    write_audio_vae(models_dir / "vae" / "stable-audio-open-1.0" / "model.safetensors", seed + 4)
    write_text_encoder(models_dir / "text_encoders" / "t5gemma-9b-9b-ul2", seed + 5)
    return models_dir


def describe_models(models_dir: Path) -> str:
    """One line per model file or folder with its size."""
    lines = []
    for path in sorted(models_dir.glob("*/*")):
        size = (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if path.is_dir()
            else path.stat().st_size
        )
        lines.append(f"  {path.relative_to(models_dir)}  ({size / 1e6:.1f} MB)")
    return "\n".join(lines)
