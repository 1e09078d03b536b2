"""The MagiHuman inference stack: DiT, schedulers, samplers, super-resolution, VAEs and text encoder.

Never imports ComfyUI; may import ``..fp8``.

Shape legend used in comments throughout:
    B batch · F latent frames · h, w latent height/width · C latent channels (48 video, 64 audio)
    A audio latent frames · L text tokens · S stream tokens (video + audio + text) · D model width
    H attention heads · Dh head dim · E experts (per-modality weight sets) · T pixel frames
"""
