"""The DiT's token stream: 2x2 video patches, audio frames and text tokens packed as [video | audio | text],
their 9-column RoPE coordinates (styles v1/v2), and the unpacking of the model's outputs back to latents.

Several samples can share one stream (batched CFG): then all samples' video tokens come first, then all audio
tokens, then all text tokens, so every modality (= every expert of the per-modality layers) is one row block.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import CoordsStyle

PATCH = 2  # spatial patch size (the temporal patch size is 1)


@dataclass(frozen=True)
class SampleShape:
    """Token counts of one sample: a video latent of ``frames`` x (2·height) x (2·width), audio, text."""

    frames: int  # F latent frames
    height: int  # h/2 patch rows
    width: int  # w/2 patch columns
    audio: int  # A audio latent frames
    text: int  # L text tokens

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def total(self) -> int:
        return self.video + self.audio + self.text


@dataclass(frozen=True)
class TokenStream:
    """Layout of a packed stream: every sample's video tokens, then every sample's audio, then every text."""

    samples: tuple[SampleShape, ...]

    @property
    def splits(self) -> tuple[int, int, int]:
        """Rows per modality (video, audio, text): the expert splits of the per-modality layers."""
        return (
            sum(s.video for s in self.samples),
            sum(s.audio for s in self.samples),
            sum(s.text for s in self.samples),
        )

    @property
    def total(self) -> int:
        return sum(self.splits)

    def sample_rows(self, i: int) -> tuple[range, range, range]:
        """Stream rows of sample ``i``'s video, audio and text tokens."""
        nv, na, _ = self.splits
        v0 = sum(s.video for s in self.samples[:i])
        a0 = nv + sum(s.audio for s in self.samples[:i])
        t0 = nv + na + sum(s.text for s in self.samples[:i])
        s = self.samples[i]
        return range(v0, v0 + s.video), range(a0, a0 + s.audio), range(t0, t0 + s.text)


def patchify_video(video: torch.Tensor) -> torch.Tensor:
    """[1,C,F,h,w] -> [F·h/2·w/2, 4C] tokens in raster order (f, row, col); features channel-major
    (c·4 + ph·2 + pw), as the official UnfoldNd packing."""
    _, c, f, h, w = video.shape
    x = video[0].reshape(c, f, h // PATCH, PATCH, w // PATCH, PATCH)  # [C, F, h', 2, w', 2]
    return x.permute(1, 2, 4, 0, 3, 5).reshape(f * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify_video(tokens: torch.Tensor, shape: SampleShape) -> torch.Tensor:
    """[F·h'·w', 4C] -> [1,C,F,h,w]. Output features are channel-MINOR ((ph·2 + pw)·C + c): the official
    output head is trained that way, so this is deliberately not the inverse of :func:`patchify_video`."""
    c = tokens.shape[1] // (PATCH * PATCH)
    x = tokens.reshape(shape.frames, shape.height, shape.width, PATCH, PATCH, c)  # [F, h', w', 2, 2, C]
    x = x.permute(5, 0, 1, 3, 2, 4)  # [C, F, h', 2, w', 2]
    return x.reshape(1, c, shape.frames, shape.height * PATCH, shape.width * PATCH)


def _check_sample(where: str, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, channels) -> None:
    c_video, c_audio, c_text = channels
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != c_video:
        raise ValueError(f"{where}video latent must be [1,{c_video},F,h,w], got {list(video.shape)}")
    if video.shape[3] % PATCH or video.shape[4] % PATCH or 0 in video.shape:
        raise ValueError(
            f"{where}video latent height and width must be even and non-zero (2x2 patches), got "
            f"{video.shape[3]}x{video.shape[4]}"
        )
    if audio.ndim != 3 or audio.shape[0] != 1 or audio.shape[2] != c_audio or audio.shape[1] < 1:
        raise ValueError(f"{where}audio latent must be [1,A>=1,{c_audio}], got {list(audio.shape)}")
    if text.ndim != 3 or text.shape[0] != 1 or text.shape[2] != c_text or text.shape[1] < 1:
        raise ValueError(
            f"{where}text embedding must be [1,L>=1,{c_text}] trimmed to its real length, "
            f"got {list(text.shape)}"
        )
    for name, t in (("video", video), ("audio", audio), ("text", text)):
        if not t.is_floating_point():
            raise ValueError(f"{where}{name} must be a float tensor, got {t.dtype}")


def pack(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], channels: tuple[int, int, int]
) -> tuple[TokenStream, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack (video [1,C,F,h,w], audio [1,A,Ca], text [1,L,Ct]) samples into one stream.

    ``channels`` = (C, Ca, Ct). Returns the layout and the fp32 video [Σ F·h'·w', 4C], audio [Σ A, Ca] and
    text [Σ L, Ct] token blocks (no zero padding: each embedder reads only its own block).
    """
    if not samples:
        raise ValueError("pack() needs at least one (video, audio, text) sample")
    shapes, videos, audios, texts = [], [], [], []
    for i, (video, audio, text) in enumerate(samples):
        _check_sample(f"sample {i}: " if len(samples) > 1 else "", video, audio, text, channels)
        _, _, f, h, w = video.shape
        shapes.append(SampleShape(f, h // PATCH, w // PATCH, audio.shape[1], text.shape[1]))
        videos.append(patchify_video(video.float()))
        audios.append(audio[0].float())
        texts.append(text[0].float())
    return TokenStream(tuple(shapes)), torch.cat(videos), torch.cat(audios), torch.cat(texts)


def unpack(
    video_out: torch.Tensor, audio_out: torch.Tensor, stream: TokenStream
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split the heads' outputs (video [Σv, 4C], audio [Σa, Ca]) into per-sample ([1,C,F,h,w], [1,A,Ca])."""
    videos = video_out.split([s.video for s in stream.samples])
    audios = audio_out.split([s.audio for s in stream.samples])
    return [
        (unpatchify_video(v, s), a.unsqueeze(0))
        for v, a, s in zip(videos, audios, stream.samples, strict=True)
    ]


# ---- coordinates ------------------------------------------------------------------------------------------
def grid_coords(
    size: tuple[int, int, int], ref: tuple[int, int, int], offset_t: int, device: torch.device | None = None
) -> torch.Tensor:
    """[T·H·W, 9] rows (t+offset_t, h, w, T, H, W, refT, refH, refW) in raster order, fp32.

    The Fourier embedding scales each axis by (ref-1)/(size-1): callers never pass size 1 with ref != 1.
    """
    t, h, w = (torch.arange(n, dtype=torch.float32, device=device) for n in size)
    grid = torch.stack(torch.meshgrid(t + offset_t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)
    coords = torch.empty(grid.shape[0], 9, device=device)  # [T·H·W, 9]
    coords[:, :3] = grid
    for column, value in enumerate((*size, *ref), start=3):
        coords[:, column] = value  # a fill kernel: no host-to-device copy, so no sync per forward (S5)
    return coords


def video_coords(s: SampleShape, device: torch.device | None = None) -> torch.Tensor:
    """Both styles: integer grid, reference = own size ("extra": no interpolation)."""
    size = (s.frames, s.height, s.width)
    return grid_coords(size, size, 0, device)


def audio_coords(s: SampleShape, style: CoordsStyle, device: torch.device | None = None) -> torch.Tensor:
    """Audio frame i sits at video time i·(refT-1)/(A-1): refT = (A-1)//4+1 (v2) or the frame count (v1)."""
    ref_t = (s.audio - 1) // 4 + 1 if style == "v2" else s.frames
    if style == "v1" and s.audio == 1 and ref_t != 1:
        raise ValueError(
            f"coords v1 (SR models) need at least 2 audio latent frames for a {s.frames}-frame video, got 1"
        )
    return grid_coords((s.audio, 1, 1), (ref_t, 1, 1), 0, device)


def text_coords(s: SampleShape, style: CoordsStyle, device: torch.device | None = None) -> torch.Tensor:
    """v2: offset -L and reference 1, so every text token gets time 0 (L=1: scale 1, time -1).
    v1: time i/(L-1) in [0, 1]; undefined for L=1, which is rejected."""
    if style == "v1" and s.text == 1:
        raise ValueError(
            "coords v1 (SR models) need at least 2 text tokens (text time is i/(L-1)); got L=1. "
            "Encode a non-empty prompt for the SR stage."
        )
    if style == "v2":
        return grid_coords((s.text, 1, 1), (1, 1, 1), -s.text, device)
    return grid_coords((s.text, 1, 1), (2, 1, 1), 0, device)


def stream_coords(
    stream: TokenStream, style: CoordsStyle, device: torch.device | None = None
) -> torch.Tensor:
    """[S, 9] coordinates of every stream row, in stream order."""
    parts = [video_coords(s, device) for s in stream.samples]
    parts += [audio_coords(s, style, device) for s in stream.samples]
    parts += [text_coords(s, style, device) for s in stream.samples]
    return torch.cat(parts)
