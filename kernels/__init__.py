"""KV-cache kernels: Triton on CUDA, pure-torch references elsewhere.

``kernels.ops`` is the entry point the engine uses; it picks the implementation by device.
"""
