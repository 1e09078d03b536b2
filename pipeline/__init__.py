"""The MagiHuman inference stack, in five subpackages and the few modules that tie them together.

Imports go one way, top to bottom, and never back up (``tests/test_layout.py`` enforces it):

    runner, preflight, failures, demo, precision
                              (this folder: the headless runner, its checks before loading, one-line CLI
                               errors, the demo stack, dtype choices)
        -> sampling           (schedulers, sampling loops, super-resolution, the stage functions, clip sizes)
        -> dit, codecs        (the DiT and its loading; the VAEs, audio conversions and the text encoder)
        -> media, weights     (image/audio/mp4 I/O, frames; safe torch files, the model catalogue, download)
        -> ..fp8              (the FP8 format, quantization and linear)

Subpackages on the same level never import each other. Never imports ComfyUI.

Shape legend used in comments throughout:
    B batch · F latent frames · h, w latent height/width · C latent channels (48 video, 64 audio)
    A audio latent frames · L text tokens · S stream tokens (video + audio + text) · D model width
    H attention heads · Dh head dim · E experts (per-modality weight sets) · T pixel frames
"""
