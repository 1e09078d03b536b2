"""The model files MagiHuman needs: where each comes from, which ComfyUI models folder it goes in, its size,
and which example workflows use it. One table, read by the downloader and by every "file not found" error."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFile:
    name: str  # short id used on the command line (`--dit distill` -> "dit_distill")
    description: str
    repo: str  # Hugging Face repository
    patterns: tuple[str, ...]  # allow-patterns inside the repository
    folder: str  # ComfyUI models folder (folder_paths name)
    path: str  # what appears inside that folder (a file, or a folder for sharded checkpoints)
    size_gb: float  # download size in decimal GB (repository listing; T5-Gemma's encoder half estimated)
    gated: bool = False  # needs a Hugging Face token and accepted terms
    subdir: str = ""  # extra folder to download into, for repositories whose files have generic names

    @property
    def source(self) -> str:
        return f"https://huggingface.co/{self.repo}"


FP8_REPO = "SanDiegoDude/daVinci-MagiHuman-FP8"


def _dit(variant: str, folder: str, what: str) -> ModelFile:
    return ModelFile(
        name=f"dit_{variant}",
        description=f"{what} DiT, FP8 (15.3B parameters)",
        repo=FP8_REPO,
        patterns=(f"{folder}/*",),
        folder="diffusion_models",
        path=f"{folder}/",
        size_gb=15.3,
    )


MODEL_FILES: dict[str, ModelFile] = {
    f.name: f
    for f in (
        _dit("distill", "distill_fp8", "Distilled (8 steps, no guidance)"),
        _dit("base", "base_fp8", "Base (32 steps with guidance)"),
        _dit("sr_540p", "540p_sr_fp8", "540p super-resolution"),
        _dit("sr_1080p", "1080p_sr_fp8", "1080p super-resolution"),
        ModelFile(
            name="turbo_vae",
            description="Turbo VAE decoder (fast video decoder)",
            repo="GAIR/daVinci-MagiHuman",
            patterns=("turbo_vae/*",),
            folder="vae",
            path="turbo_vae/",
            size_gb=1.87,
        ),
        ModelFile(
            name="wan_vae",
            description="Wan2.2 VAE (encodes reference images; optional full-quality decoder)",
            repo="Wan-AI/Wan2.2-TI2V-5B",
            patterns=("Wan2.2_VAE.pth",),
            folder="vae",
            path="Wan2.2_VAE.pth",
            size_gb=2.82,
        ),
        ModelFile(
            name="audio_vae",
            description="Stable Audio Open 1.0 (its audio VAE decodes the sound; encodes driving audio)",
            repo="stabilityai/stable-audio-open-1.0",
            patterns=("model.safetensors", "model_config.json"),
            folder="vae",
            path="stable-audio-open-1.0/model.safetensors",
            size_gb=4.85,
            gated=True,
            subdir="stable-audio-open-1.0",
        ),
        ModelFile(
            name="text_encoder",
            description="T5-Gemma 9B text encoder (only the encoder's shards are fetched)",
            repo="google/t5gemma-9b-9b-ul2",
            patterns=("config.json", "tokenizer*", "special_tokens_map.json", "*.safetensors.index.json"),
            folder="text_encoders",
            path="t5gemma-9b-9b-ul2/",
            size_gb=18.5,
            gated=True,
            subdir="t5gemma-9b-9b-ul2",
        ),
    )
}

SHARED = ("text_encoder", "turbo_vae", "audio_vae")  # every workflow encodes text and decodes video and audio

# What each example workflow (workflows/<name>.json) needs.
WORKFLOW_FILES: dict[str, tuple[str, ...]] = {
    "MagiHuman text to video (distilled)": ("dit_distill", *SHARED),
    "MagiHuman image to video (distilled)": ("dit_distill", "wan_vae", *SHARED),
    "MagiHuman text to video (base)": ("dit_base", *SHARED),
    "MagiHuman 540p super-resolution (base)": ("dit_base", "dit_sr_540p", *SHARED),
    "MagiHuman 1080p super-resolution (distilled)": ("dit_distill", "dit_sr_1080p", *SHARED),
    "MagiHuman lip-sync to your audio (distilled)": ("dit_distill", *SHARED),
    "MagiHuman long lip-sync (distilled)": ("dit_distill", *SHARED),
}

# Short names for the command line (the workflows' earlier file names), so no title needs quoting.
WORKFLOW_SHORT_NAMES = dict(
    zip(
        ("t2v_distill", "i2v_distill", "t2v_base", "base_sr_540p", "distill_sr_1080p", "lipsync_distill",
         "lipsync_long"),
        WORKFLOW_FILES,
        strict=True,
    )
)  # fmt: skip


def missing_file_message(name: str, looked_in: list[str]) -> str:
    """A "not found" error for one catalogue entry: what is missing, where we looked, how to get it."""
    entry = MODEL_FILES[name]
    gated = " (gated: accept its terms on the website and give your token)" if entry.gated else ""
    workflow = next(w for w, names in WORKFLOW_FILES.items() if name in names)
    return (
        f"{entry.description} not found: expected '{entry.path}' in the ComfyUI '{entry.folder}' folder "
        f"(looked in: {', '.join(looked_in) or 'no such folder configured'}). Download it (about "
        f"{entry.size_gb:g} GB){gated}: in ComfyUI, add the 'MagiHuman Download Models' node, choose the "
        f"workflow (e.g. {workflow}) and run it; or run: python cli.py download --files {name}; or get it "
        f"from {entry.source}"
    )
