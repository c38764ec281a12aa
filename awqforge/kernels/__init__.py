"""AWQForge W4 kernels.

- `cpu`: C++ (AVX2+FMA, OpenMP) kernel, JIT-built and cached on first use (see kernels/cpu.py).
- `triton_w4a16`: Triton W4A16 kernel for CUDA, reading the AWQ gemm layout.
- `reference`: the pure-torch dequantize-then-matmul every kernel is tested against.

Submodules import lazily so that importing awqforge.kernels costs nothing.
"""
