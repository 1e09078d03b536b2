"""Encoders and decoders around the DiT: the Turbo VAE decoder, the Wan2.2 VAE (and its latent statistics),
the Stable Audio Open VAE with the audio conversions it needs, and the T5-Gemma text encoder.

May import ``..media``, ``..weights`` and ``...fp8``; never ``..dit``, ``..sampling`` or the runner.
"""
