"""The T5-Gemma text encoder (the encoder half of ``google/t5gemma-9b-9b-ul2``, hidden 3584) through the
T5Gemma classes of ``transformers``: tokenise without padding, take the last hidden state, round it through
fp16, pad or trim to 640 rows and keep the real length. Only the encoder's weights are ever read."""

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ...fp8.checkpoint import Checkpoint, CheckpointError
from ...fp8.linear import Fp8Linear
from ...fp8.quantize import quantize
from ..weights.catalogue import MODEL_FILES

log = logging.getLogger(__name__)

TARGET_LENGTH = 640  # text tokens the DiT reads
TEXT_WIDTH = 3584  # T5-Gemma-9B's width, the DiT's text input
ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # full HF checkpoint / encoder-only file
TIED_EMBEDDING = "model.decoder.embed_tokens.weight"  # holds the shared embedding when the encoder's is tied

# The official unconditional text for guidance, verbatim: visual, audio and speech segments joined by ", ".
NEGATIVE_PROMPT = ", ".join(
    (
        (
            "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
            "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
            "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
            "fused fingers, still picture, messy background, three legs, many people in the background, "
            "walking backwards"
        ),
        (
            "low quality, worst quality, poor quality, noise, background noise, hiss, hum, buzz, crackle, "
            "static, compression artifacts, MP3 artifacts, digital clipping, distortion, muffled, muddy, "
            "unclear, echo, reverb, room echo, over-reverberated, hollow sound, distant, washed out, harsh, "
            "shrill, piercing, grating, tinny, thin sound, boomy, bass-heavy, flat EQ, over-compressed, "
            "abrupt cut, jarring transition, sudden silence, looping artifact, music, instrumental, sirens, "
            "alarms, crowd noise, unrelated sound effects, chaotic, disorganized, messy, cheap sound"
        ),
        (
            "emotionless, flat delivery, deadpan, lifeless, apathetic, robotic, mechanical, monotone, flat "
            "intonation, undynamic, boring, reading from a script, AI voice, synthetic, text-to-speech, TTS, "
            "insincere, fake emotion, exaggerated, overly dramatic, melodramatic, cheesy, cringey, hesitant, "
            "unconfident, tired, weak voice, stuttering, stammering, mumbling, slurred speech, "
            "mispronounced, bad articulation, lisp, vocal fry, creaky voice, mouth clicks, lip smacks, wet "
            "mouth sounds, heavy breathing, audible inhales, plosives, p-pops, coughing, clearing throat, "
            "sneezing, speaking too fast, rushed, speaking too slow, dragged out, unnatural pauses, awkward "
            "silence, choppy, disjointed, multiple speakers, two voices, background talking, out of tune, "
            "off-key, autotune artifacts"
        ),
    )
)


@dataclass(frozen=True)
class TextEmbedding:
    """features: [1, 640, 3584] float16, zero rows after ``length``; ``tokens()`` is what the DiT reads."""

    features: torch.Tensor
    length: int
    dropped: int = 0  # prompt tokens past the 640 the DiT reads, cut before encoding

    def tokens(self) -> torch.Tensor:
        return self.features[:, : self.length].float()  # [1, L, 3584]


class Fp8EncoderLinear(Fp8Linear):
    """An FP8 stand-in for the encoder's ``nn.Linear`` layers: same state-dict names, any leading dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))  # [tokens, out]
        return y.view(*x.shape[:-1], self.out_features)


class TextEncoder:
    """Encodes prompts; embeddings are cached in memory per prompt (this instance is one model)."""

    def __init__(self, model, tokenizer, name: str, cache_size: int = 32):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self.cache_size = cache_size

    @property
    def device(self) -> torch.device:
        return self.model.encoder.embed_tokens.weight.device

    def to(self, device: torch.device | str) -> "TextEncoder":
        """Move the weights (e.g. off the GPU once the prompts are encoded); cached embeddings stay valid."""
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, prompt: str) -> TextEmbedding:
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        # No padding (only real tokens), and never more than the DiT reads: a prompt of any length costs
        # at most 640 tokens of encoder work (the tokenizer's count of the whole is cheap).
        total = len(self.tokenizer(prompt)["input_ids"])
        ids = self.tokenizer([prompt], return_tensors="pt", truncation=True, max_length=TARGET_LENGTH)
        dropped = total - ids["input_ids"].shape[1]
        if dropped > 0:
            tail = self.tokenizer.decode(ids["input_ids"][0, -8:], skip_special_tokens=True)
            log.warning(
                "the prompt is %d tokens; the DiT reads the first %d: the last %d are dropped (the prompt is "
                "used up to '... %s')", total, TARGET_LENGTH, dropped, tail,
            )  # fmt: skip
        hidden = self.model(
            input_ids=ids["input_ids"].to(self.device), attention_mask=ids["attention_mask"].to(self.device)
        ).last_hidden_state  # [1, L, D]
        hidden = hidden.half().cpu()[:, :TARGET_LENGTH]
        length = hidden.shape[1]
        features = torch.nn.functional.pad(hidden, (0, 0, 0, TARGET_LENGTH - length))  # [1, 640, D]
        embedding = TextEmbedding(features, length, max(dropped, 0))
        self.cache[prompt] = embedding
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return embedding


def _files(path: Path) -> tuple[Path, Path]:
    """(folder with config and tokenizer, weights path) for an HF folder or an encoder-only file."""
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    needed = ["config.json", "tokenizer_config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer.model)")
    if missing:
        entry = MODEL_FILES["text_encoder"]
        raise CheckpointError(
            f"{folder}: the T5-Gemma encoder needs {', '.join(missing)} beside its weights. They come with "
            f"{entry.source} (gated: accept its terms, then `python cli.py download --files text_encoder "
            "--token ...`); nothing is downloaded at run time."
        )
    return folder, path


def _encoder_state(checkpoint: Checkpoint) -> dict[str, str]:
    """{encoder state-dict key: checkpoint key}, reading nothing (decoder tensors are never touched)."""
    mapping = {}
    for key in checkpoint.keys():
        for prefix in ENCODER_PREFIXES:
            if key.startswith(prefix):
                mapping["encoder." + key.removeprefix(prefix)] = key
                break
    if "encoder.embed_tokens.weight" not in mapping and TIED_EMBEDDING in checkpoint:
        mapping["encoder.embed_tokens.weight"] = TIED_EMBEDDING  # tied input embedding, shared by both halves
    if not mapping:
        raise CheckpointError(
            f"{checkpoint.path}: no T5-Gemma encoder weights ('model.encoder.*' or 'encoder.*' tensors)"
        )
    return mapping


# Activation memory of one encode at the 640-token cap, with margin: `bench memory` predicts 0.08 GiB (bf16)
# and 0.09 GiB (fp8) for the full-size encoder.
ENCODE_ACTIVATION_BYTES = 256 * 2**20


def encoder_bytes(path: str | Path, fp8: bool) -> int:
    """Device bytes of the loaded encoder (weights in bf16, or its block linears in FP8) plus one encode's
    activations, from the checkpoint headers (nothing is read). FP8 row padding and scales are not counted:
    a fraction of a percent."""
    checkpoint = Checkpoint(_files(Path(path))[1])
    total = ENCODE_ACTIVATION_BYTES
    for key, source in _encoder_state(checkpoint).items():
        shape = checkpoint.info(source).shape
        numel = math.prod(shape)
        quantized = fp8 and key.endswith(".weight") and ".layers." in key and len(shape) == 2
        total += numel * (1 if quantized else 2)
    return total


def choose_precision(path: str | Path, available: int) -> tuple[bool, bool]:
    """(fp8, on the device) for the "auto" setting: bf16 on the device when it fits in ``available`` bytes
    (device memory less ComfyUI's reserve), else FP8 on the device, else bf16 on the CPU."""
    if encoder_bytes(path, fp8=False) <= available:
        return False, True
    if encoder_bytes(path, fp8=True) <= available:
        return True, True
    return False, False


def load_text_encoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
) -> TextEncoder:
    """Load the encoder from an HF-layout folder (config, tokenizer, safetensors shards with index) or an
    encoder-only ``.safetensors`` with config and tokenizer files beside it. ``fp8`` stores the encoder's
    linear layers in FP8 (quantized while loading, one tensor at a time), halving their memory."""
    from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaEncoderModel

    folder, weights = _files(Path(path))
    config = _config(folder / "config.json", T5GemmaConfig)
    config.is_encoder_decoder = False  # the official code loads it encoder-only as well
    tokenizer = _tokenizer(folder, AutoTokenizer)  # before the weights: a bad file fails in a second
    checkpoint = Checkpoint(weights)
    mapping = _encoder_state(checkpoint)
    try:
        with torch.device("meta"):
            model = T5GemmaEncoderModel(config)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, IndexError) as e:
        raise CheckpointError(
            f"{folder / 'config.json'}: describes no buildable T5-Gemma encoder ({type(e).__name__}: {e})"
        ) from None
    if fp8:
        _swap_linears(model)
    expected_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key, source in mapping.items():  # from the headers, before any weight is read
        found = checkpoint.info(source).shape
        if key in expected_shapes and found != expected_shapes[key]:
            raise CheckpointError(
                f"{checkpoint.info(source).file}: '{source}' has shape {list(found)}, but config.json "
                f"describes {list(expected_shapes[key])}: the weights and {folder / 'config.json'} are from "
                "different models"
            )
    state = {}
    for key, source in mapping.items():
        tensor = checkpoint.load(source, device, dtype)
        if fp8 and key.endswith(".weight") and ".layers." in key and tensor.ndim == 2:
            state.update(quantize(tensor, name=source).state_dict(key.removesuffix("weight")))
        else:
            state[key] = tensor
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"'{missing[0]}' is missing" if missing else f"'{unexpected[0]}' is unexpected"
        raise CheckpointError(f"{weights}: not the encoder that config.json describes: {what}")
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are computed, not stored: rebuild that module off the meta device.
    model.encoder.rotary_emb = type(model.encoder.rotary_emb)(config=config.encoder).to(device)
    name = f"{weights}{' fp8' if fp8 else ''}"
    log.info("loaded T5-Gemma encoder from %s (%d tensors, fp8=%s)", weights, len(mapping), fp8)
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, name)


def _config(path: Path, config_class):
    """config.json as a T5GemmaConfig whose encoder is T5-Gemma-9B wide; errors name the file and key."""
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, found {type(raw).__name__}")
        config = config_class.from_dict(raw)
    except MemoryError:
        raise
    except Exception as e:  # transformers validates fields with its own exception types: name the file
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path}: cannot read the T5-Gemma config ({reason})") from None
    width = getattr(config.encoder, "hidden_size", None)
    if width != TEXT_WIDTH:
        raise CheckpointError(
            f"{path}: 'encoder.hidden_size' is {width}, but the DiT reads T5-Gemma-9B features {TEXT_WIDTH} "
            f"wide; use {MODEL_FILES['text_encoder'].source}"
        )
    return config


def _tokenizer(folder: Path, tokenizer_class):
    """The tokenizer beside the weights; a damaged tokenizer file is named (the library does not name it)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text())
            except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
                raise CheckpointError(
                    f"{folder / name}: unreadable ({e}). Re-download the T5-Gemma tokenizer files"
                ) from None
    try:
        return tokenizer_class.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # the tokenizers library raises bare Exceptions; this is the file boundary
        raise CheckpointError(
            f"{folder}: cannot load the T5-Gemma tokenizer ({type(e).__name__}: {e})"
        ) from None


def _swap_linears(model) -> None:
    """Replace every linear layer of the encoder blocks by its FP8 counterpart (built on meta)."""
    for layer in model.encoder.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    fp8 = Fp8EncoderLinear(
                        child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                    )
                    setattr(parent, name, fp8)
