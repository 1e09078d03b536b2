"""The one FP8-aware MagiHuman DiT: its config and variants, the packed token stream, RoPE, attention
kernels, the block linears, the model, block swap, and loading a checkpoint into it in one strict call.

May import ``..media``, ``..weights`` and ``...fp8``; never ``..sampling``, ``..codecs`` or the runner.
"""
