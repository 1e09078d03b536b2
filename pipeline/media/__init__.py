"""Pictures and sound in the shapes users hand over and get back: reading images and audio files, writing
mp4 and wav, and converting decoded video to ComfyUI IMAGE batches and reference images to VAE input.

May import ``...fp8`` only; nothing else of ``pipeline/``.
"""
