"""Loader nodes: the DiT (any published layout, FP8 in any convention), the video VAEs, the audio VAE and the
T5-Gemma text encoder, each picked from ComfyUI's model folders. Loaded models stay loaded between runs
(ComfyUI keeps node outputs while their inputs are unchanged)."""

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..fp8.capability import MODES as FP8_MODES
from ..fp8.errors import InputError
from ..pipeline.codecs.audio_vae import load_audio_vae
from ..pipeline.codecs.text_encoder import choose_precision, load_text_encoder
from ..pipeline.codecs.turbo_vae import load_turbo_vae, turbo_files
from ..pipeline.codecs.wan_vae import load_wan_vae
from ..pipeline.dit.block_swap import BlockSwap
from ..pipeline.dit.config import VARIANTS
from ..pipeline.dit.device_memory import dit_tokens, held_by_others, swap_layers_for
from ..pipeline.dit.fusion import MODES as COMPILE_MODES
from ..pipeline.dit.fusion import fuse
from ..pipeline.dit.loading import BF16, detect_variant, load_dit
from ..pipeline.dit.parallel import Ulysses
from ..pipeline.precision import vae_dtype
from ..pipeline.workers import LoadSettings, WorkerPool
from .memory import AUTO_SWAP, DEFAULT_LATENTS, Managed
from .model_lists import (
    dit_choices,
    preferred,
    resolve,
    text_encoder_choices,
    turbo_choices,
    vae_file_choices,
)
from .types import AUDIO_VAE, DIT, TEXT_ENCODER, VIDEO_VAE, LoadedDiT, LoadedTextEncoder, VideoVAEs

log = logging.getLogger(__name__)

CATEGORY = "MagiHuman/loaders"
NONE = "none"


class DiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = dit_choices()
        return io.Schema(
            node_id="MagiHumanDiTLoader",
            display_name="MagiHuman DiT Loader",
            category=CATEGORY,
            description="Loads a daVinci-MagiHuman DiT (base, distilled or super-resolution) from "
            "diffusion_models: a sharded folder such as distill_fp8/ or a single .safetensors file.",
            inputs=[
                io.Combo.Input(
                    "model",
                    options=choices,
                    default=preferred(choices, "dit_distill"),
                    tooltip="A DiT folder (e.g. distill_fp8/, base_fp8/, 540p_sr_fp8/, 1080p_sr_fp8/) "
                    "or file in models/diffusion_models. FP8, BF16 and FP32 checkpoints all load.",
                ),
                io.Combo.Input(
                    "variant",
                    options=["auto", *VARIANTS],
                    default="auto",
                    tooltip="Which model this is. auto reads it from the name (distill, base, 540p, "
                    "1080p); it decides the coordinate style and 1080p local attention.",
                ),
                io.Combo.Input(
                    "compute",
                    options=[*FP8_MODES, BF16],
                    default="auto",
                    tooltip="auto: FP8 tensor cores where the GPU has them (RTX 40xx/50xx, H100), "
                    "otherwise FP8 weights dequantized on the fly; bf16 needs twice the memory.",
                ),
                io.Combo.Input(
                    "attention",
                    options=["auto", "sdpa", "flash", "sage"],
                    default="auto",
                    tooltip="Attention kernel. auto uses flash-attn when installed, else PyTorch SDPA.",
                ),
                io.Int.Input(
                    "swap_layers",
                    default=AUTO_SWAP,
                    min=AUTO_SWAP,
                    max=40,
                    tooltip="Keep this many of the last 40 layers in system memory and stream them in for "
                    "each step. Same result, slower. -1 = auto: the fewest that let a 5 s clip at this "
                    "model's size fit your GPU (from bench memory's predictions: none on 24 GB cards; on "
                    "16 GB 4 for 256p, 7 for 540p SR); 0 = none.",
                ),
                io.Boolean.Input(
                    "fast_accum",
                    default=False,
                    optional=True,
                    tooltip="FP8 tensor-core matmuls with fast accumulation: faster on H100/H200, slightly "
                    "less exact sums. Off matches the published FP8 runtime. No effect on other paths.",
                ),
                io.Combo.Input(
                    "compile",
                    options=list(COMPILE_MODES),
                    default="auto",
                    optional=True,
                    tooltip="torch.compile the norms, RoPE, gates, activations and FP8 input scaling into "
                    "fused kernels. auto: where Triton works (CUDA with the triton package); the first "
                    "run compiles for a minute. off: plain PyTorch everywhere.",
                ),
                io.Int.Input(
                    "gpus",
                    default=1,
                    min=1,
                    max=8,
                    optional=True,
                    tooltip="Run each DiT call on this many GPUs together (sequence parallelism; 1, 2, 4 or "
                    "8). This GPU and the next ones; every GPU holds a full replica (14.3 GiB FP8 each), "
                    "loaded by a worker process kept until the model is unloaded. Helps 540p/1080p SR and "
                    "the guided base model, hardly distilled 256p. 1 = this GPU alone.",
                ),
            ],  # fmt: skip
            outputs=[DIT.Output(display_name="dit")],
        )

    @classmethod
    def execute(
        cls, model, variant, compute, attention, swap_layers, fast_accum=False, compile="auto", gpus=1
    ) -> io.NodeOutput:
        # The file first: a mistyped name is a missing file, not a DiT of unknown variant.
        path = resolve(model, "diffusion_models", "dit_distill" if variant == "auto" else f"dit_{variant}")
        variant = detect_variant(model) if variant == "auto" else variant
        # Loaded to the offload device: ComfyUI brings the model to the GPU when a sampler asks for it
        # (Managed.use), so nothing sits on the GPU unseen by its memory manager, which can then make room
        # for the text encoder first on a first run. The swapped layers stay in (pinned) system memory.
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        chosen = swap_layers == AUTO_SWAP
        if chosen:
            swap_layers = auto_swap(path, variant, compute, device)
        settings = LoadSettings(str(path), variant, compute, attention, swap_layers, fast_accum, compile)
        workers = None if gpus == 1 else worker_pool(settings, device, gpus)  # they load meanwhile
        try:
            dit, report = load_dit(path, variant, compute, offload, attention, fast_accum=fast_accum)
            if workers is not None:
                Ulysses(0, gpus).check_heads(dit.config.num_heads_q, dit.config.num_heads_kv)
                workers.wait_ready()
        except BaseException:
            if workers is not None:
                workers.shutdown()
            raise
        if swap_layers:
            dit.block_swap = BlockSwap(dit, swap_layers, device, offload)
        fuse(dit, compile, device)
        managed = Managed(dit, dit.block_swap.resident(dit) if swap_layers else None)
        description = (
            f"{model} ({report.variant}, {report.convention}, {report.linear}, {report.seconds:.0f} s)"
        ) + (f" on {gpus} devices" if workers is not None else "")
        if swap_layers:
            description += f", {swap_layers} layers swapped{' (auto)' if chosen else ''}"
        return io.NodeOutput(LoadedDiT(managed, report.variant, description, workers))


def auto_swap(path, variant: str, compute: str, device) -> int:
    """swap_layers for "auto" (-1): none off the GPU; on a GPU the fewest layers that let the variant's
    default clip fit the card's memory (:func:`usable_memory`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    available = usable_memory(device)
    count = swap_layers_for(path, variant, compute, dit_tokens(*DEFAULT_LATENTS[variant]), available)
    log.info("swap_layers auto: %d layers for %.1f GiB available on %s", count, available / 2**30, device)
    return count


def usable_memory(device: torch.device) -> int:
    """What the "auto" choices size a model for: the card's total memory less ComfyUI's reserve and less
    what other programs hold on it now. Total rather than free memory: ComfyUI offloads its other models to
    make room for the one it loads (the DiT when a sampler runs, the text encoder while it encodes)."""
    others = held_by_others(device)
    if others:
        log.info("%.1f GiB of %s are held by other programs", others / 2**30, device)
    return mm.get_total_memory(device) - mm.minimum_inference_memory() - others


def worker_pool(settings: LoadSettings, device, gpus: int) -> WorkerPool:
    """The processes for ranks 1..gpus-1, started now: on CUDA the GPUs after ComfyUI's own (wrapping
    around), on a CPU-only host CPU processes (for testing: no speed gain)."""
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if gpus > count:
            raise InputError(
                f"gpus is {gpus} but this machine has {count} CUDA GPUs; set gpus to at most {count}"
            )
        first = device.index if device.index is not None else torch.cuda.current_device()
        devices = [torch.device("cuda", (first + i) % count) for i in range(1, gpus)]
    elif device.type == "cpu":
        devices = [torch.device("cpu")] * (gpus - 1)
    else:
        raise InputError(f"gpus > 1 needs CUDA GPUs (or the CPU, for testing); ComfyUI runs on {device}")
    pool = WorkerPool(settings, device, devices)
    pool.start()
    return pool


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        turbo, files = turbo_choices(), vae_file_choices()
        return io.Schema(
            node_id="MagiHumanVAELoader",
            display_name="MagiHuman Video VAE Loader",
            category=CATEGORY,
            description="Loads the video decoders from models/vae: the fast Turbo VAE decoder and the Wan2.2 "
            "VAE (needed to encode a reference image, and the full-quality decoder).",
            inputs=[
                io.Combo.Input(
                    "turbo_vae",
                    options=[*turbo, NONE],
                    default=preferred(turbo, "turbo_vae") or NONE,
                    tooltip="The turbo_vae/ folder (TurboV3-Wan22-TinyShallow_7_7.json + "
                    "checkpoint-340000.ckpt) from GAIR/daVinci-MagiHuman, or none.",
                ),
                io.Combo.Input(
                    "wan_vae",
                    options=[*files, NONE],
                    default=preferred(files, "wan_vae") or NONE,
                    tooltip="Wan2.2_VAE.pth (Wan-AI/Wan2.2-TI2V-5B) or ComfyUI's wan2.2_vae.safetensors, "
                    "or none when no reference image is used and Turbo decodes.",
                ),
            ],  # fmt: skip
            outputs=[VIDEO_VAE.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, turbo_vae, wan_vae) -> io.NodeOutput:
        if turbo_vae == NONE and wan_vae == NONE:
            raise InputError("choose at least one video VAE (Turbo VAE or Wan2.2 VAE)")
        offload, dtype = mm.unet_offload_device(), vae_dtype(mm.get_torch_device())
        turbo = None
        if turbo_vae != NONE:
            turbo = load_turbo_vae(*turbo_files(resolve(turbo_vae, "vae", "turbo_vae")), offload, dtype)
        wan = None if wan_vae == NONE else load_wan_vae(resolve(wan_vae, "vae", "wan_vae"), offload, dtype)
        return io.NodeOutput(VideoVAEs(turbo, wan))


class AudioVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = vae_file_choices()
        return io.Schema(
            node_id="MagiHumanAudioVAELoader",
            display_name="MagiHuman Audio VAE Loader",
            category=CATEGORY,
            description="Loads the Stable Audio Open VAE: latents to stereo sound, sound to latents.",
            inputs=[
                io.Combo.Input(
                    "audio_vae",
                    options=files,
                    default=preferred(files, "audio_vae"),
                    tooltip="stable-audio-open-1.0/model.safetensors (stabilityai/stable-audio-open-1.0, "
                    "gated) or a VAE-only Stable Audio file, in models/vae.",
                ),
            ],  # fmt: skip
            outputs=[AUDIO_VAE.Output(display_name="audio_vae")],
        )

    @classmethod
    def execute(cls, audio_vae) -> io.NodeOutput:
        return io.NodeOutput(load_audio_vae(resolve(audio_vae, "vae", "audio_vae"), mm.unet_offload_device()))


class TextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = text_encoder_choices()
        return io.Schema(
            node_id="MagiHumanTextEncoderLoader",
            display_name="MagiHuman T5-Gemma Loader",
            category=CATEGORY,
            description="Loads the T5-Gemma 9B text encoder (encoder half only) from models/text_encoders.",
            inputs=[
                io.Combo.Input(
                    "text_encoder",
                    options=choices,
                    default=preferred(choices, "text_encoder"),
                    tooltip="The t5gemma-9b-9b-ul2/ folder (config, tokenizer, shards) or an "
                    "encoder-only .safetensors with config.json and tokenizer files beside it.",
                ),
                io.Combo.Input(
                    "weights",
                    options=["auto", "bf16", "fp8"],
                    default="auto",
                    tooltip="fp8 stores the encoder's linear layers in FP8: about half the memory "
                    "(9.6 instead of 17.3 GiB on the GPU while it encodes), slightly different "
                    "embeddings. auto (with device gpu): bf16 when it fits in the GPU's memory beside "
                    "ComfyUI's reserve (20 GB cards and up), else fp8 (12-16 GB cards), else bf16 on "
                    "the CPU.",
                ),
                io.Combo.Input(
                    "device",
                    options=["gpu", "cpu"],
                    default="gpu",
                    tooltip="gpu: encode on the GPU (the encoder leaves it right after); cpu: encode "
                    "on the CPU, slower but using no GPU memory.",
                ),
            ],  # fmt: skip
            outputs=[TEXT_ENCODER.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, text_encoder, weights, device) -> io.NodeOutput:
        path = resolve(text_encoder, "text_encoders", "text_encoder")
        on_gpu, fp8 = device == "gpu", weights == "fp8"
        if weights == "auto":
            fp8, on_gpu = auto_precision(path) if on_gpu else (False, False)
        encoder = load_text_encoder(path, mm.unet_offload_device(), fp8=fp8)
        return io.NodeOutput(LoadedTextEncoder(encoder, on_gpu))


def auto_precision(path) -> tuple[bool, bool]:
    """(fp8, on the GPU) for weights "auto", sized to :func:`usable_memory` (the encoder visits the GPU only
    while it encodes; nodes/memory.py, on_device)."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        return False, True  # no GPU: the compute device is the CPU, bf16 is the reference precision
    return choose_precision(path, usable_memory(device))
