"""Triton W4A16 kernel: y = x . W^T for fp16/bf16 x, reading the AWQ gemm layout directly.

Weights as awqforge.packing.pack_awq_gemm writes them (and as AutoAWQ/vLLM checkpoints hold them):
qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N]; column n of the weight is nibble
AWQ_REVERSE_ORDER[n % 8] of word n // 8. A tile loads each word once per column that needs it
(eight neighbouring columns read the same word, which the memory system merges) and shifts it by
that column's nibble offset, then dequantizes (q - z) * s in the activation dtype and feeds tl.dot
with fp32 accumulation.

Two launch shapes of one kernel:
- small M (<= SMALL_M): BLOCK_M = 16 and split-K: the K range is cut into SPLIT_K slices, each
  program reduces one slice and atomically adds into an fp32 output, so that a decode step (M = 1)
  still spreads the weight read over every SM;
- large M: a classic tiled GEMM (grouped program order for L2 reuse), no split.

Tested on CPU tensors under TRITON_INTERPRET=1 (tests/test_kernels_triton.py); tolerance vs the
fp32 reference: the weight is rounded to the activation dtype before the dot, so ~1e-2 relative
(bf16) / ~2e-3 (fp16) of the output's max magnitude.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SMALL_M = 32


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


def _interpreting() -> bool:
    # Triton 3.x's CPU interpreter computes tl.dot on bf16 operands wrongly (it treats their bits as
    # another type); there the operands are widened to fp32. Compiled kernels never take this path.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_k(group_size: int) -> int:
    for bk in (64, 32, 16):
        if group_size % bk == 0:
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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    block_k = _block_k(g)
    if M <= SMALL_M:
        block_m, block_n = 16, 64
        if split_k is None:
            n_tiles = triton.cdiv(N, block_n)
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
            split_k = max(1, min(K // (block_k * 4), triton.cdiv(2 * sms, n_tiles)))
    else:
        block_m, block_n = (64, 128) if M >= 128 else (32, 128)
        split_k = split_k or 1
    y = (
        torch.zeros(M, N, device=x.device, dtype=torch.float32)
        if split_k > 1
        else torch.empty(M, N, device=x.device, dtype=x.dtype)
    )
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        GROUP_M=8,
        DOT_F32=_interpreting() and x.dtype == torch.bfloat16,
    )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
