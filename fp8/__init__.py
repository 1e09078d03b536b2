"""FP8 (float8_e4m3fn) weights: quantization, every on-disk convention, the FP8 linear and the converter.

Imports only torch, safetensors, numpy and the standard library.
"""
