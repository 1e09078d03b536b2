"""Results to files (an mp4 with H.264 video and AAC stereo sound through PyAV, a 16-bit wav), each written
under a temporary name and renamed when complete; user pictures and sound read from files."""

import itertools
import logging
import math
import wave
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ...fp8.errors import InputError
from .frames import check_image_size
from .outputs import atomic_output

log = logging.getLogger(__name__)


def write_mp4(
    path: str | Path,
    frames: torch.Tensor | Iterable[torch.Tensor],
    audio: dict | None,
    fps: int = 25,
    overwrite: bool = False,
) -> Path:
    """``frames``: IMAGE [T, H, W, 3] in 0..1 (even H and W), or an iterable of such pieces encoded as they
    come (a long clip never held whole); ``audio``: AUDIO dict, muxed as AAC stereo. An existing ``path`` is
    an error unless ``overwrite``."""
    import av

    path = Path(path)
    pieces = iter([frames] if isinstance(frames, torch.Tensor) else frames)
    first = next(pieces)
    with atomic_output(path, overwrite) as temporary, av.open(str(temporary), mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = first.shape[2], first.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio["sample_rate"], layout="stereo")
        for piece in itertools.chain([first], pieces):
            for image in (piece.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy():  # [t, H, W, 3]
                container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            samples = audio["waveform"][0].float().clamp(-1, 1).cpu().numpy()  # [2, N]
            step = sound.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], step):
                chunk = np.ascontiguousarray(samples[:, start : start + step])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate = audio["sample_rate"]
                frame.pts = start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def write_wav(path: str | Path, audio: dict, overwrite: bool = False) -> Path:
    """An AUDIO dict as a 16-bit PCM wav with its channels and rate (an existing file needs ``overwrite``)."""
    path = Path(path)
    samples = audio["waveform"][0].float().clamp(-1, 1).cpu().numpy()  # [C, N]
    pcm = (samples.T * 32767).round().astype("<i2")  # interleaved [N, C]
    with atomic_output(path, overwrite) as temporary, wave.open(str(temporary), "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(audio["sample_rate"]))
        out.writeframes(pcm.tobytes())
    return path


def read_image(path: str | Path) -> torch.Tensor:
    """A picture file (png, jpg, webp, ...) as IMAGE [1, H, W, 3] in 0..1; at least 16x16 pixels."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            pixels = frame.to_ndarray(format="rgb24")  # [H, W, 3]
    except (av.error.FFmpegError, StopIteration, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read this image ({e})") from None
    check_image_size(pixels.shape[0], pixels.shape[1], f"{path}: the reference image")
    return torch.from_numpy(pixels).float().div(255).unsqueeze(0)


def read_audio(path: str | Path, seconds: float | None = None) -> dict:
    """A sound file (wav, mp3, flac, m4a, ...) as AUDIO {"waveform": [1, C, N], "sample_rate": rate}. With
    ``seconds``, decoding stops once that much is read (a long file is never decoded whole) and the unused
    rest is reported."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path}: this file has no audio stream")
            stream = container.streams.audio[0]
            rate, channels = stream.rate, stream.channels
            to_float = av.AudioResampler(
                format="fltp", layout="stereo" if channels > 1 else "mono", rate=rate
            )
            wanted = None if seconds is None else math.ceil(seconds * rate)
            chunks, read = [], 0
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    chunks.append(converted.to_ndarray())  # [C, n] float32
                    read += chunks[-1].shape[1]
                if wanted is not None and read >= wanted:
                    break
            total = None if container.duration is None else container.duration / av.time_base
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: cannot read audio from this file ({e})") from None
    if not chunks or read == 0:
        raise InputError(f"{path}: the audio stream is empty")
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1))
    if wanted is not None and read >= wanted:
        waveform = waveform[:, :wanted]
        if total is not None and total > seconds + 0.05:
            log.warning(
                "%s is %.1f s long; the clip uses its first %.2f s, the rest (%.1f s) is unused",
                path, total, seconds, total - seconds,
            )  # fmt: skip
    return {"waveform": waveform.unsqueeze(0), "sample_rate": rate}
