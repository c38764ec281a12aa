"""Triton W4A16 kernel: y = x . W^T for fp16/bf16 x, reading the AWQ gemm layout directly.

Weights as awqforge.packing.pack_awq_gemm writes them (and as AutoAWQ/vLLM checkpoints hold them):
qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N]; column n of the weight is nibble
AWQ_REVERSE_ORDER[n % 8] of word n // 8. A tile loads each word once per column that needs it
(eight neighbouring columns read the same word, which the memory system merges) and shifts it by
that column's nibble offset, then dequantizes (q - z) * s in the activation dtype and feeds tl.dot
with fp32 accumulation.

Launch configurations (`LAUNCH_CONFIGS`, picked by M in `pick_config`); every one of them is
compiled ahead of time for sm_80 and sm_90 with fp16 and bf16 by tests/test_kernels_triton_aot.py,
which fails on any register spill (ptxas -v):
- gemv, M <= 4: no tensor cores: a [BLOCK_M, BLOCK_K, BLOCK_N] broadcast product reduced over K
  (CUDA-core FMAs), so a decode step does not pad its one row to a 16-row MMA; split-K: the K range
  is cut into slices, each program reduces one and atomically adds into an fp32 output, so that
  M = 1 still spreads the weight read over every SM;
- decode, 5 <= M <= 16: tl.dot on 16 x 64 tiles, split-K as above;
- mid, 17 <= M < 128: tl.dot on 32 x 128 tiles, no split;
- prefill, M >= 128: 64 x 128 tiles with 8 warps (4 warps need 255 registers and spill on sm_80),
  grouped program order for L2 reuse.
The table is reasoned, not measured (no GPU was available when it was written); split-K aims at two
programs per SM. scripts/gpu-check.sh measures it against torch's fp16 matmul on a real GPU.

Tested on CPU tensors under TRITON_INTERPRET=1 (tests/test_kernels_triton.py); tolerance vs the
fp32 reference: the weight is rounded to the activation dtype before the dot, so ~1e-2 relative
(bf16) / ~2e-3 (fp16) of the output's max magnitude.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class LaunchConfig:
    name: str
    max_m: int  # used for M <= max_m (the first that fits)
    block_m: int
    block_n: int
    block_k: int  # at most; smaller when the group size needs it (_block_k)
    num_warps: int
    use_dot: bool
    split_k: bool  # split K over programs, fp32 atomic accumulation


LAUNCH_CONFIGS = (
    LaunchConfig("gemv", 4, 4, 64, 32, 4, use_dot=False, split_k=True),
    LaunchConfig("decode", 16, 16, 64, 64, 4, use_dot=True, split_k=True),
    LaunchConfig("mid", 127, 32, 128, 64, 4, use_dot=True, split_k=False),
    LaunchConfig("prefill", 1 << 62, 64, 128, 64, 8, use_dot=True, split_k=False),
)
NUM_STAGES = 3


def pick_config(m: int) -> LaunchConfig:
    return next(c for c in LAUNCH_CONFIGS if m <= c.max_m)


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_ym,
    SPLIT_K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_DOT: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # plain arithmetic and tl.full instead of tl.cdiv and tl.zeros (@jit helpers): keeps the kernel runnable by the CPU
    # interpreter even when triton was imported before TRITON_INTERPRET was set
    n_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    n_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    # grouped ordering: GROUP_M row-tiles share the same weight columns while they are hot in L2
    width = GROUP_M * n_pid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # column n lives in nibble AWQ_REVERSE_ORDER[n % 8] = (n % 8) // 2 + 4 * (n % 2) of word n // 8
    c = offs_n % 8
    shifts = ((c // 2) + 4 * (c % 2)) * 4
    word_n = offs_n // 8

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_per_split = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        qw = tl.load(
            qw_ptr + offs_k[:, None] * (N // 8) + word_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )
        g = k0 // group_size  # BLOCK_K divides group_size: one group per tile
        qz = tl.load(qz_ptr + g * (N // 8) + word_n, mask=mask_n, other=0)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        q = (qw >> shifts[None, :]) & 0xF
        z = (qz >> shifts) & 0xF
        w = ((q - z[None, :]).to(tl.float32) * s[None, :].to(tl.float32)).to(x.dtype)
        if not USE_DOT:  # CUDA-core FMAs over [BLOCK_M, BLOCK_K, BLOCK_N]
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    # Triton 3.x's CPU interpreter computes tl.dot on bf16 operands wrongly (it treats their bits as
    # another type); there the operands are widened to fp32. Compiled kernels never take this path.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_k(group_size: int, most: int = 64) -> int:
    for bk in (64, 32, 16):
        if bk <= most and group_size % bk == 0:
            return bk
    raise ValueError(f"the Triton kernel needs a group size divisible by 16, got {group_size}")


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x . W^T (+ bias) for x [..., K] fp16/bf16 and AWQ gemm tensors; returns x.dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"W4A16 takes fp16 or bf16 activations, got {x.dtype}")
    K, n8 = qweight.shape
    N = n8 * 8
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]}, the weight has K={K}")
    g = K if group_size == -1 else group_size
    if K % g or qzeros.shape != (K // g, n8) or scales.shape != (K // g, N):
        raise ValueError(
            f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, group size {group_size}"
        )
    if x.device != qweight.device or qzeros.device != qweight.device or scales.device != qweight.device:
        raise ValueError(
            f"x ({x.device}) and the weight tensors ({qweight.device}, {qzeros.device}, {scales.device}) "
            "must be on one device"
        )
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scales must be a float tensor, got {scales.dtype}")
    # the kernel indexes the weight tensors as dense row-major arrays
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = pick_config(M)
    block_k = _block_k(g, cfg.block_k)
    n_tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if not cfg.split_k:
        split_k = 1
    elif split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        split_k = max(1, min(K // (block_k * 4), triton.cdiv(2 * sms, n_tiles)))
    y = (
        torch.zeros(M, N, device=x.device, dtype=torch.float32)
        if cfg.split_k
        else torch.empty(M, N, device=x.device, dtype=x.dtype)
    )
    grid = (n_tiles, split_k)
    # launch on x's device (cuda:N), whichever device is current
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _w4a16_kernel[grid](
            x2,
            qweight,
            qzeros,
            scales,
            y,
            M,
            N,
            K,
            g,
            x2.stride(0),
            y.stride(0),
            split_k,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            USE_DOT=cfg.use_dot,
            ATOMIC=cfg.split_k,
            DOT_F32=_interpreting() and x.dtype == torch.bfloat16,
            num_warps=cfg.num_warps,
            num_stages=NUM_STAGES,
        )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
