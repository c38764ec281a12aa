"""Benchmark the W4 kernels against torch's own paths.

CPU: ours (fp32 and bf16 activations) vs torch fp32 F.linear vs torch's int4 CPU op
(aten._weight_int4pack_mm_for_cpu, bf16 activations), side by side as speed-ups, plus the weight
bytes ours reads per second beside the memory bandwidth measured here. Every implementation cycles
through enough weight copies to exceed twice the last-level cache, so each call reads its weight
from DRAM, as in a real model. Timings alternate between implementations (round-robin) and keep the
best round, which makes them comparable on a shared machine.

By default the CPU part runs once per configuration in a child process: each ISA this CPU has
(AVX-512, then AVX2 with AWQFORGE_CPU_ISA=avx2 and torch/oneDNN/MKL capped to AVX2 as well, so
that the baselines run their AVX2 code too, as on an AVX2-only CPU) x (one thread, all threads).
It prints `lscpu`'s model name and SIMD flags first.

GPU (when CUDA is available): ours (Triton W4A16, fp16) vs torch fp16 matmul; TFLOP/s and GB/s
(scripts/gpu-check.sh runs it at M = 1, 16, 256 and writes the rows to its JSON summary).

    python bench/bench_kernels.py            # 11008x4096 and 4096x11008, M = 1, 4, 16, 64, 256
    python bench/bench_kernels.py --quick    # 11008x4096, M = 1, 16, 256
    python bench/bench_kernels.py --isa avx2 --threads 1   # one configuration
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from awqforge import packing
from awqforge.quant import QuantizedTensor

SHAPES = [(11008, 4096), (4096, 11008)]  # N x K: a Llama-7B MLP up/gate and down projection
BATCHES = [1, 4, 16, 64, 256]
GROUP = 128


def llc_bytes() -> int:
    """Largest cache the kernel reports (sysfs), 64 MiB when unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or 64 << 20


def n_copies(bytes_each: int, llc: int) -> int:
    return max(2, math.ceil(2 * llc / bytes_each) + 1)


def random_qt(n: int, k: int, group: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.01
    return QuantizedTensor(q, s, z, 4, group)


def memory_bandwidth_gbs(size_bytes: int = 1 << 29) -> dict[str, float]:
    """Read (sum) and copy bandwidth of a large fp32 tensor, with torch's threads."""
    a = torch.ones(size_bytes // 4)
    b = torch.empty_like(a)
    read = copy = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        read = max(read, size_bytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copy = max(copy, 2 * size_bytes / (time.perf_counter() - t) / 1e9)
    return {"read": read, "copy": copy}


def time_round_robin(
    fns: dict[str, Callable[[int], object]], rounds: int, budget_s: float
) -> dict[str, float]:
    """Seconds per call of each fn(i) (i: call index, used to pick a weight copy), best round."""
    calls = {}
    for name, fn in fns.items():
        fn(0)
        t = time.perf_counter()
        fn(1)
        calls[name] = max(2, min(200, int(budget_s / max(time.perf_counter() - t, 1e-6))))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            best[name] = min(best[name], (time.perf_counter() - t) / n)
    return best


def bench_cpu(shapes, batches, rounds: int, budget_s: float) -> None:
    from awqforge.kernels import cpu

    cpu.load_extension(allow_build=True)
    llc = llc_bytes()
    bw = memory_bandwidth_gbs()
    print(
        f"CPU: {torch.get_num_threads()} threads, ISA {cpu.best_isa()}, LLC {llc >> 20} MiB; "
        f"memory bandwidth {bw['read']:.1f} GB/s read (sum), {bw['copy']:.1f} GB/s copy (r+w)"
    )
    header = (
        f"{'N x K':>12} {'M':>4} | {'ours f32':>9} {'ours bf16':>9} {'F.linear':>9} {'int4 op':>9} | "
        f"{'vs fp32':>7} {'vs int4':>7} | {'ours GB/s':>9} {'%bw':>5} {'int4 GB/s':>9}"
    )
    print("times in ms; 'vs fp32' = F.linear fp32 / ours fp32, 'vs int4' = torch int4 op / ours bf16")
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        for line in cpu_rows(n, k, batches, llc, bw["read"], rounds, budget_s):
            print(line, flush=True)


def cpu_rows(n: int, k: int, batches, llc: int, read_bw: float, rounds: int, budget_s: float):
    """One table row per batch size for weight N x K (weight copies live for this call only)."""
    from awqforge.kernels import cpu

    qt = random_qt(n, k, GROUP)
    ours = packing.pack_cpu_w4(qt)
    ours_bytes = ours["qdata"].nbytes + ours["params"].nbytes
    ours_w = [(ours["qdata"].clone(), ours["params"].clone()) for _ in range(n_copies(ours_bytes, llc))]
    fp32_w = [torch.randn(n, k) for _ in range(n_copies(n * k * 4, llc))]
    t4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.qweight.to(torch.int32), 1)
    s, z = qt.scales.float(), qt.zeros.float()
    # torch's int4 op dequantizes (q - 8) * scale + zero: zero = (8 - z) * s in our convention
    t4_sz = torch.stack([s.t(), ((8 - z) * s).t()], -1).to(torch.bfloat16).contiguous()
    t4_bytes = t4.nbytes + t4_sz.nbytes
    t4_w = [(t4.clone(), t4_sz.clone()) for _ in range(n_copies(t4_bytes, llc))]

    def ours_call(x):
        return lambda i: cpu.w4_linear_cpu(x, *ours_w[i % len(ours_w)], n, GROUP)

    def fp32_call(x):
        return lambda i: F.linear(x, fp32_w[i % len(fp32_w)])

    def int4_call(x):
        return lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, t4_w[i % len(t4_w)][0], GROUP, t4_w[i % len(t4_w)][1]
        )

    for m in batches:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        fns = {"ours": ours_call(x), "ours_bf16": ours_call(xb), "fp32": fp32_call(x), "int4": int4_call(xb)}
        t = time_round_robin(fns, rounds, budget_s)
        gbs = ours_bytes / t["ours"] / 1e9
        yield (
            f"{f'{n}x{k}':>12} {m:>4} | {t['ours'] * 1e3:9.3f} {t['ours_bf16'] * 1e3:9.3f} "
            f"{t['fp32'] * 1e3:9.3f} {t['int4'] * 1e3:9.3f} | {t['fp32'] / t['ours']:6.2f}x "
            f"{t['int4'] / t['ours_bf16']:6.2f}x | {gbs:9.1f} {100 * gbs / read_bw:4.0f}% "
            f"{t4_bytes / t['int4'] / 1e9:9.1f}"
        )


def bench_gpu(shapes, batches, rounds: int) -> list[dict]:
    """Print the GPU table; returns its rows as dicts (scripts/gpu_check.py writes them to JSON)."""
    dev = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}; ours = Triton W4A16 (AWQ gemm layout), fp16")
    header = (
        f"{'N x K':>12} {'M':>4} | {'ours ms':>8} {'fp16 ms':>8} {'speedup':>7} | "
        f"{'ours TFLOP/s':>12} {'fp16 TFLOP/s':>12} {'ours GB/s':>9} {'fp16 GB/s':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n, k in shapes:
        for r in gpu_rows(n, k, batches, rounds):
            rows.append(r)
            print(
                f"{f'{n}x{k}':>12} {r['m']:>4} | {r['ours_ms']:8.4f} {r['fp16_ms']:8.4f} {r['speedup']:6.2f}x | "
                f"{r['ours_tflops']:12.2f} {r['fp16_tflops']:12.2f} {r['ours_gbs']:9.0f} {r['fp16_gbs']:9.0f}",
                flush=True,
            )
    return rows


def gpu_rows(n: int, k: int, batches, rounds: int):
    from awqforge.kernels import triton_w4a16

    dev = torch.device("cuda")
    l2 = 128 << 20  # more than any current GPU's L2
    qt = random_qt(n, k, GROUP)
    awq = {key: v.to(dev) for key, v in packing.pack_awq_gemm(qt).items()}
    w_bytes = sum(v.nbytes for v in awq.values())
    ours_w = [{key: v.clone() for key, v in awq.items()} for _ in range(n_copies(w_bytes, l2))]
    fp16_w = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(n_copies(n * k * 2, l2))]

    def ours_call(x):
        def call(i):
            w = ours_w[i % len(ours_w)]
            return triton_w4a16.w4a16_linear(x, w["qweight"], w["qzeros"], w["scales"], GROUP)

        return call

    def fp16_call(x):
        return lambda i: torch.matmul(x, fp16_w[i % len(fp16_w)].t())

    for m in batches:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        fns = {"ours": ours_call(x), "fp16": fp16_call(x)}
        best = dict.fromkeys(fns, math.inf)
        for _ in range(rounds):
            for name, fn in fns.items():
                fn(0)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(50):
                    fn(i)
                end.record()
                torch.cuda.synchronize()
                best[name] = min(best[name], start.elapsed_time(end) / 1e3 / 50)
        flops = 2 * m * n * k
        yield {
            "shape": f"{n}x{k}",
            "m": m,
            "config": triton_w4a16.pick_config(m).name,
            "ours_ms": best["ours"] * 1e3,
            "fp16_ms": best["fp16"] * 1e3,
            "speedup": best["fp16"] / best["ours"],
            "ours_tflops": flops / best["ours"] / 1e12,
            "fp16_tflops": flops / best["fp16"] / 1e12,
            "ours_gbs": w_bytes / best["ours"] / 1e9,
            "fp16_gbs": n * k * 2 / best["fp16"] / 1e9,
        }


def lscpu_summary() -> str:
    """lscpu's model name and the SIMD flags that matter here."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "lscpu unavailable"
    model, flags = "?", []
    for line in text.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("Flags:"):
            wanted = ("avx", "fma", "f16c", "amx")
            flags = [f for f in line.split(":", 1)[1].split() if f.startswith(wanted)]
    return f"{model}; flags: {' '.join(flags)}; {os.cpu_count()} logical CPUs"


def cpu_configs(isas: list[str] | None, threads: list[int] | None) -> list[tuple[str, int]]:
    from awqforge.kernels import cpu

    best = cpu.best_isa()
    isas = isas or [isa for isa in ("avx512", "avx2") if cpu.ISAS[isa] <= cpu.ISAS[best]] or ["scalar"]
    threads = threads or sorted({1, torch.get_num_threads()})
    return [(isa, t) for isa in isas for t in threads]


def child_env(isa: str) -> dict[str, str]:
    env = {**os.environ, "AWQFORGE_CPU_ISA": isa}
    if isa == "avx2":  # the baselines as an AVX2-only CPU runs them
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M = 1, 16, 256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per timed batch of calls")
    ap.add_argument("--isa", action="append", choices=["avx512", "avx2", "scalar"], help="repeatable")
    ap.add_argument("--threads", type=int, action="append", help="repeatable (default: 1 and all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    batches = [1, 16, 256] if args.quick else BATCHES
    if args.child:
        torch.set_num_threads(args.threads[0])
        bench_cpu(shapes, batches, args.rounds, args.budget)
        return
    if not args.no_cpu:
        print(f"CPU: {lscpu_summary()}; torch {torch.__version__}", flush=True)
        for isa, threads in cpu_configs(args.isa, args.threads):
            print(f"\n== AWQFORGE_CPU_ISA={isa}, {threads} thread(s)", flush=True)
            cmd = [sys.executable, __file__, "--child", "--isa", isa, "--threads", str(threads)]
            cmd += ["--rounds", str(args.rounds), "--budget", str(args.budget)] + (
                ["--quick"] if args.quick else []
            )
            subprocess.run(cmd, env=child_env(isa), check=True)
    if not args.no_gpu and torch.cuda.is_available():
        bench_gpu(shapes, [1, 16, 256] if args.quick else BATCHES, args.rounds)


if __name__ == "__main__":
    main()
