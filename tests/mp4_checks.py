"""Comparing two mp4 writes without comparing their bytes: libx264 as PyAV 18 ships it encodes the same
pictures to different bytes from run to run (seen here on 64x64 clips, with identical encoder input), so
tests compare what the encoder was given, and what the files hold besides the compressed pictures."""

import av
import numpy as np


def record_pictures(monkeypatch) -> list[np.ndarray]:
    """From now on, every picture handed to PyAV (``av.VideoFrame.from_ndarray``) is also kept, as a copy,
    in the returned list."""
    pictures, real = [], av.VideoFrame

    class Recording:
        @staticmethod
        def from_ndarray(array, format):
            pictures.append(array.copy())
            return real.from_ndarray(array, format=format)

    monkeypatch.setattr(av, "VideoFrame", Recording)
    return pictures


def streams(path) -> dict:
    """The one video and one audio stream of an mp4: codecs, rate, frame count, size, channels, durations."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video, container.streams.audio
        assert len(video) == 1 and len(audio) == 1
        frames = sum(1 for _ in container.decode(video=0))
        v, a = video[0], audio[0]
        return dict(
            codec=v.codec_context.name, fps=v.average_rate, frames=frames, size=(v.width, v.height),
            audio_codec=a.codec_context.name,
            rate=a.rate, channels=a.channels, video_seconds=float(v.duration * v.time_base),
            audio_seconds=float(a.duration * a.time_base),
        )  # fmt: skip


def contents(path) -> dict:
    """What an mp4 holds apart from the H.264 bytes: :func:`streams` and the decoded sound."""
    with av.open(str(path)) as container:
        sound = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    return streams(path) | dict(sound=sound.tobytes())


def assert_same_clip(pictures_a: list, path_a, pictures_b: list, path_b) -> None:
    """Two writes got the same pictures, in the same order, and hold the same video stream and sound."""
    assert len(pictures_a) == len(pictures_b) > 0
    assert all(np.array_equal(a, b) for a, b in zip(pictures_a, pictures_b, strict=True))
    assert contents(path_a) == contents(path_b)
