"""FP8 (float8_e4m3fn) weights: quantization, every on-disk convention, the FP8 linear and the converter.

``checkpoint`` reads safetensors lazily; ``quantize`` makes and holds FP8 weights (:class:`Fp8Weight`);
``formats`` reads any FP8 convention into ``Fp8Weight``s (:class:`Fp8Reader`); ``capability`` decides where
``torch._scaled_mm`` runs; ``linear`` is :class:`Fp8Linear`; ``convert`` and ``writer`` make FP8 checkpoints.
``errors`` holds the pack's exception types (this is the lowest package, so every layer can raise them).
Imports only torch, safetensors, numpy and the standard library.
"""
