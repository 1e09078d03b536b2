"""Writing results to files: an mp4 with H.264 video and AAC stereo sound (PyAV), and a 16-bit wav."""

import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def write_mp4(path: str | Path, frames: torch.Tensor, audio: dict | None, fps: int = 25) -> Path:
    """``frames``: IMAGE [T, H, W, 3] in 0..1 (even H and W); ``audio``: AUDIO dict, muxed as AAC stereo."""
    import av

    path = Path(path)
    pixels = (frames.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()  # [T, H, W, 3]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio["sample_rate"], layout="stereo")
        for image in pixels:
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


def write_wav(path: str | Path, audio: dict) -> Path:
    """An AUDIO dict as a 16-bit PCM wav with its channels and rate."""
    path = Path(path)
    samples = audio["waveform"][0].float().clamp(-1, 1).cpu().numpy()  # [C, N]
    pcm = (samples.T * 32767).round().astype("<i2")  # interleaved [N, C]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(audio["sample_rate"]))
        out.writeframes(pcm.tobytes())
    return path


def read_image(path: str | Path) -> torch.Tensor:
    """A picture file (png, jpg, webp, ...) as IMAGE [1, H, W, 3] in 0..1."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration, OSError) as e:
        raise ValueError(f"{path}: cannot read this image ({e})") from None
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).float().div(255).unsqueeze(0)


def read_audio(path: str | Path) -> dict:
    """A sound file (wav, mp3, flac, m4a, ...) as AUDIO {"waveform": [1, C, N], "sample_rate": rate}."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            rate, channels = stream.rate, stream.channels
            to_float = av.AudioResampler(
                format="fltp", layout="stereo" if channels > 1 else "mono", rate=rate
            )
            chunks = [
                converted.to_ndarray()  # [C, n] float32
                for frame in container.decode(stream)
                for converted in to_float.resample(frame)
            ]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise ValueError(f"{path}: cannot read audio from this file ({e})") from None
    if not chunks:
        raise ValueError(f"{path}: the audio stream is empty")
    return {"waveform": torch.from_numpy(np.concatenate(chunks, axis=1)).unsqueeze(0), "sample_rate": rate}
