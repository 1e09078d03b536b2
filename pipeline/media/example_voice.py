"""A synthetic example voice for the lip-sync workflow, so it opens with a real file in Load Audio instead of
a missing one: vowel-like syllables (a pitch-gliding harmonic tone shaped by vowel formants) in short
phrases, 4 s of 16 kHz mono (128 kB). Made on the fly, so no audio file ships with the pack."""

import math
from pathlib import Path

import torch

from .files import write_wav

NAME = "magihuman_example_voice.wav"
RATE = 16_000
# First three formants (Hz) of a, e, i, o, u: what makes a harmonic tone sound like a vowel.
VOWELS = ((800, 1200, 2500), (450, 1900, 2600), (300, 2300, 3000), (500, 900, 2400), (350, 800, 2300))
SYLLABLES = (3, 4, 3, 2)  # syllables per phrase, with a short pause after each phrase


def example_voice(seconds: float = 4.0, seed: int = 0) -> dict:
    """AUDIO {"waveform": [1, 1, N], "sample_rate": 16000}: speech-like phrases of vowel syllables."""
    generator = torch.Generator().manual_seed(seed)
    n = int(seconds * RATE)
    t = torch.arange(n) / RATE
    pitch = 210 + 25 * torch.sin(2 * math.pi * 0.4 * t) - 15 * t / seconds  # [N] Hz, a falling intonation
    phase = 2 * math.pi * torch.cumsum(pitch / RATE, 0)  # [N]
    envelope, formants = torch.zeros(n), torch.zeros(n, 3)
    start, length = int(0.15 * RATE), int(0.22 * RATE)
    for count in SYLLABLES:
        for _ in range(count):
            stop = min(start + length, n)
            window = torch.sin(torch.linspace(0, math.pi, stop - start)).clamp_min(0) ** 1.5  # [L] swell
            envelope[start:stop] = window
            vowel = VOWELS[int(torch.randint(len(VOWELS), (1,), generator=generator))]
            formants[start:stop] = torch.tensor(vowel, dtype=torch.float32)
            start = stop + int(0.03 * RATE)
        start += int(0.25 * RATE)
    sound = torch.zeros(n)
    for k in range(1, 24):  # harmonics of the pitch, weighted by how close each is to a formant
        frequency = k * pitch  # [N]
        gain = sum(torch.exp(-(((frequency - formants[:, i]) / 120) ** 2)) for i in range(3))  # [N]
        sound += gain * torch.sin(k * phase) / k**0.5
    sound = sound * envelope
    sound = 0.5 * sound / sound.abs().max().clamp_min(1e-6)
    return {"waveform": sound.view(1, 1, n), "sample_rate": RATE}


def install_example_voice(input_dir: str | Path) -> Path | None:
    """Write the example voice into ComfyUI's input folder unless a file of that name is there; None when
    the folder cannot be written (the workflow then asks for a file, as for any missing input)."""
    path = Path(input_dir) / NAME
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_wav(path, example_voice())
    except OSError:
        return None
