// W4 x fp32 linear on CPU: y[M, N] = x[M, K] . W[N, K]^T straight from packed 4-bit weights.
//
// Weight layout (awqforge.packing.pack_cpu_w4): blocks of 32 output channels.
//   qdata  uint8 [NB, K/2, 32]: byte [b, p, j] = q[32b+j, 2p] | q[32b+j, 2p+1] << 4
//   params fp32  [NB, G, 2, 32]: per group, scale s and offset o = -z*s, so W = q*s + o.
//
// Small M ("tile" path): for a tile of MT rows and one group of one block, accumulate
// acc = sum_k q[n,k] * x[m,k] in fp32 registers, then y += s * acc + o * sum_k x[m,k].
// Each decoded weight vector is used for MT rows; the whole FP weight never exists.
//
// Large M ("panel" path): each thread decodes a panel of its output channels, W^T [K, Nc] fp32
// (a few MB, lives in cache), and lets the BLAS sgemm that F.linear uses multiply it; then decodes
// its next panel.
// Decoding costs O(N*K) against the GEMM's O(M*N*K), so at large M this is as fast as the FP
// GEMM while reading 1/8 of the weight bytes from memory.
//
// The AVX2+FMA and AVX-512 code is compiled with function-level target attributes (no global
// -mavx2), so one build holds them and the portable scalar path; the caller picks one at run time
// and w4_linear re-checks it against the CPU (__builtin_cpu_supports). Non-x86 builds compile the
// SIMD code out and keep the scalar path.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define AWQF_HAVE_X86 1
#include <immintrin.h>
#else
#define AWQF_HAVE_X86 0
#endif

namespace {

constexpr int64_t kBlockN = 32;

struct Problem {
  const float* x;      // [M, K]
  const float* xsum;   // [M, G]: per-row, per-group sums of x
  const uint8_t* qd;   // [NB, K/2, 32]
  const float* prm;    // [NB, G, 2, 32]
  float* y;            // [M, N]
  const float* bias;   // [N] or nullptr
  int64_t M, N, K, g, G, NB;
  int64_t prefetch = 0;  // bytes ahead in the weight stream to prefetch (0: leave it to the hardware)
};

// ---------------------------------------------------------------------------------- scalar

void tile_scalar(const Problem& p, int64_t b, int64_t m0, int64_t mt) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  for (int64_t m = m0; m < m0 + mt; ++m) {
    const float* xm = p.x + m * p.K;
    float out[kBlockN] = {0.f};
    for (int64_t gi = 0; gi < p.G; ++gi) {
      float acc[kBlockN] = {0.f};
      for (int64_t k = gi * p.g; k < (gi + 1) * p.g; k += 2) {
        const uint8_t* row = qb + (k / 2) * kBlockN;
        const float x0 = xm[k], x1 = xm[k + 1];
        for (int j = 0; j < kBlockN; ++j) {
          acc[j] += static_cast<float>(row[j] & 15) * x0 + static_cast<float>(row[j] >> 4) * x1;
        }
      }
      const float* s = pb + gi * 2 * kBlockN;
      const float* o = s + kBlockN;
      const float xs = p.xsum[m * p.G + gi];
      for (int j = 0; j < kBlockN; ++j) out[j] += s[j] * acc[j] + o[j] * xs;
    }
    if (p.bias)
      for (int j = 0; j < nvalid; ++j) out[j] += p.bias[n0 + j];
    std::memcpy(p.y + m * p.N + n0, out, nvalid * sizeof(float));
  }
}

// W^T[k, col0 + j] for the 32 channels of block b, all k.
void decode_block_scalar(const Problem& p, int64_t b, float* wt, int64_t ldw, int64_t col0) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  for (int64_t k = 0; k < p.K; k += 2) {
    const uint8_t* row = qb + (k / 2) * kBlockN;
    const float* s = pb + (k / p.g) * 2 * kBlockN;
    const float* o = s + kBlockN;
    float* w0 = wt + k * ldw + col0;
    float* w1 = w0 + ldw;
    for (int j = 0; j < kBlockN; ++j) {
      w0[j] = static_cast<float>(row[j] & 15) * s[j] + o[j];
      w1[j] = static_cast<float>(row[j] >> 4) * s[j] + o[j];
    }
  }
}

// ---------------------------------------------------------------------------------- AVX2

#if AWQF_HAVE_X86
#define AWQF_AVX2 __attribute__((target("avx2,fma")))

// MT rows x 32 channels of block b; NS = how many 8-channel vectors are in flight at once
// (MT * NS * 2 independent accumulators hide the FMA latency).
template <int MT, int NS>
AWQF_AVX2 void tile_avx2(const Problem& p, int64_t b, int64_t m0) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  const __m256i low4 = _mm256_set1_epi32(15);
  alignas(32) float out[MT][kBlockN];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kBlockN; ++j) out[m][j] = 0.f;

  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    const float* o = s + kBlockN;
    const uint8_t* qg = qb + gi * (p.g / 2) * kBlockN;
    const float* xg = p.x + m0 * p.K + gi * p.g;
    for (int v0 = 0; v0 < kBlockN / 8; v0 += NS) {
      __m256 acc[MT][NS][2];
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NS; ++v) acc[m][v][0] = acc[m][v][1] = _mm256_setzero_ps();
      const uint8_t* q = qg + v0 * 8;
      for (int64_t kp = 0; kp < p.g / 2; ++kp, q += kBlockN) {
        if (p.prefetch) _mm_prefetch(reinterpret_cast<const char*>(q + p.prefetch), _MM_HINT_T0);
        // Decode one 8-channel vector and use it at once: keeps the live registers to the
        // 2*MT*NS accumulators plus a handful (AVX2 has 16).
#pragma GCC unroll 4
        for (int v = 0; v < NS; ++v) {
          const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + v * 8)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, low4));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
#pragma GCC unroll 4
          for (int m = 0; m < MT; ++m) {
            acc[m][v][0] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(xg + m * p.K + 2 * kp), acc[m][v][0]);
            acc[m][v][1] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(xg + m * p.K + 2 * kp + 1), acc[m][v][1]);
          }
        }
      }
      for (int v = 0; v < NS; ++v) {
        const int j = (v0 + v) * 8;
        const __m256 sv = _mm256_loadu_ps(s + j);
        const __m256 ov = _mm256_loadu_ps(o + j);
        for (int m = 0; m < MT; ++m) {
          const __m256 xs = _mm256_set1_ps(p.xsum[(m0 + m) * p.G + gi]);
          __m256 r = _mm256_load_ps(&out[m][j]);
          r = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[m][v][0], acc[m][v][1]), r);
          r = _mm256_fmadd_ps(ov, xs, r);
          _mm256_store_ps(&out[m][j], r);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    if (p.bias)
      for (int j = 0; j < nvalid; ++j) out[m][j] += p.bias[n0 + j];
    std::memcpy(p.y + (m0 + m) * p.N + n0, out[m], nvalid * sizeof(float));
  }
}

AWQF_AVX2 void decode_block_avx2(const Problem& p, int64_t b, float* wt, int64_t ldw, int64_t col0) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    __m256 sv[4], ov[4];
    for (int v = 0; v < 4; ++v) {
      sv[v] = _mm256_loadu_ps(s + v * 8);
      ov[v] = _mm256_loadu_ps(s + kBlockN + v * 8);
    }
    for (int64_t k = gi * p.g; k < (gi + 1) * p.g; k += 2) {
      const uint8_t* q = qb + (k / 2) * kBlockN;
      float* w0 = wt + k * ldw + col0;
      float* w1 = w0 + ldw;
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + v * 8)));
        _mm256_storeu_ps(w0 + v * 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, low4)), sv[v], ov[v]));
        _mm256_storeu_ps(w1 + v * 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), sv[v], ov[v]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------- AVX-512
// Same scheme with 16 channels per register (two per block) and 32 registers, which lets each
// row keep 2 (vectors) x 2 (lo/hi nibble) x U (k-pair unroll) accumulators in flight.
#define AWQF_AVX512 __attribute__((target("avx512f,avx2,fma")))

template <int MT, int U>
AWQF_AVX512 void tile_avx512(const Problem& p, int64_t b, int64_t m0) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 out[MT][2];
  for (int m = 0; m < MT; ++m) out[m][0] = out[m][1] = _mm512_setzero_ps();

  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    const float* o = s + kBlockN;
    const uint8_t* q = qb + gi * (p.g / 2) * kBlockN;
    const float* xg = p.x + m0 * p.K + gi * p.g;
    __m512 acc[MT][2][2][U];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < 2; ++v)
        for (int u = 0; u < U; ++u) acc[m][v][0][u] = acc[m][v][1][u] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < p.g / 2; kp += U) {
      if (p.prefetch) _mm_prefetch(reinterpret_cast<const char*>(q + kp * kBlockN + p.prefetch), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        const uint8_t* qk = q + (kp + u) * kBlockN;
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) {
          const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + v * 16)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, low4));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
#pragma GCC unroll 4
          for (int m = 0; m < MT; ++m) {
            const float* xk = xg + m * p.K + 2 * (kp + u);
            acc[m][v][0][u] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xk[0]), acc[m][v][0][u]);
            acc[m][v][1][u] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xk[1]), acc[m][v][1][u]);
          }
        }
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m512 sv = _mm512_loadu_ps(s + v * 16);
      const __m512 ov = _mm512_loadu_ps(o + v * 16);
      for (int m = 0; m < MT; ++m) {
        __m512 a = _mm512_add_ps(acc[m][v][0][0], acc[m][v][1][0]);
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, _mm512_add_ps(acc[m][v][0][u], acc[m][v][1][u]));
        out[m][v] = _mm512_fmadd_ps(sv, a, out[m][v]);
        out[m][v] = _mm512_fmadd_ps(ov, _mm512_set1_ps(p.xsum[(m0 + m) * p.G + gi]), out[m][v]);
      }
    }
  }
  const __mmask16 k0 = nvalid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nvalid) - 1);
  const __mmask16 k1 = nvalid >= 32 ? 0xFFFF : nvalid <= 16 ? 0 : static_cast<__mmask16>((1u << (nvalid - 16)) - 1);
  const __m512 b0 = p.bias ? _mm512_maskz_loadu_ps(k0, p.bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = p.bias ? _mm512_maskz_loadu_ps(k1, p.bias + n0 + 16) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) {
    float* yr = p.y + (m0 + m) * p.N + n0;
    out[m][0] = _mm512_add_ps(out[m][0], b0);
    out[m][1] = _mm512_add_ps(out[m][1], b1);
    _mm512_mask_storeu_ps(yr, k0, out[m][0]);
    _mm512_mask_storeu_ps(yr + 16, k1, out[m][1]);
  }
}

AWQF_AVX512 void decode_block_avx512(const Problem& p, int64_t b, float* wt, int64_t ldw, int64_t col0) {
  const uint8_t* qb = p.qd + b * (p.K / 2) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    const __m512 o0 = _mm512_loadu_ps(s + 32), o1 = _mm512_loadu_ps(s + 48);
    for (int64_t k = gi * p.g; k < (gi + 1) * p.g; k += 2) {
      const uint8_t* q = qb + (k / 2) * kBlockN;
      float* w0 = wt + k * ldw + col0;
      float* w1 = w0 + ldw;
      const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      _mm512_storeu_ps(w0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(a, low4)), s0, o0));
      _mm512_storeu_ps(w0 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, low4)), s1, o1));
      _mm512_storeu_ps(w1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4)), s0, o0));
      _mm512_storeu_ps(w1 + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), s1, o1));
    }
  }
}
#endif  // AWQF_HAVE_X86

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has_avx512() {
#if AWQF_HAVE_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if AWQF_HAVE_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void run_tiles(const Problem& p, Isa isa, int nthreads) {
  // Rows in tiles of 4 (then 2, 1); blocks of 32 channels spread over the threads.
  const bool even_pairs = (p.g / 2) % 2 == 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < p.NB; ++b) {
    int64_t m = 0;
#if AWQF_HAVE_X86
    if (isa == kAvx512) {
      for (; m + 4 <= p.M; m += 4) tile_avx512<4, 1>(p, b, m);
      for (; m + 2 <= p.M; m += 2) even_pairs ? tile_avx512<2, 2>(p, b, m) : tile_avx512<2, 1>(p, b, m);
      for (; m < p.M; ++m) even_pairs ? tile_avx512<1, 2>(p, b, m) : tile_avx512<1, 1>(p, b, m);
      continue;
    }
    if (isa == kAvx2) {
      for (; m + 4 <= p.M; m += 4) tile_avx2<4, 1>(p, b, m);
      for (; m + 2 <= p.M; m += 2) tile_avx2<2, 2>(p, b, m);
      for (; m < p.M; ++m) tile_avx2<1, 4>(p, b, m);
      continue;
    }
#endif
    for (; m < p.M; m += 4) tile_scalar(p, b, m, std::min<int64_t>(4, p.M - m));
  }
}

void decode_block(const Problem& p, Isa isa, int64_t b, float* wt, int64_t ldw, int64_t col0) {
#if AWQF_HAVE_X86
  if (isa == kAvx512) return decode_block_avx512(p, b, wt, ldw, col0);
  if (isa == kAvx2) return decode_block_avx2(p, b, wt, ldw, col0);
#endif
  decode_block_scalar(p, b, wt, ldw, col0);
}

// One parallel region: each thread owns a contiguous range of blocks, decodes them panel by panel
// into its own buffer (still warm in its caches) and multiplies with a single-threaded sgemm (BLAS
// calls inside an OpenMP region do not spawn threads of their own). One fork/join per call instead
// of two per panel matters on a shared, oversubscribed machine.
void run_panels(const Problem& p, const torch::Tensor& x, torch::Tensor& y, Isa isa, int nthreads,
                int64_t panel_blocks) {
  const int64_t ldw = panel_blocks * kBlockN;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, p.NB));
  auto panels = torch::empty({nt, p.K, ldw}, x.options());
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num();
#else
    const int64_t t = 0;
#endif
    const int64_t b_begin = p.NB * t / nt, b_end = p.NB * (t + 1) / nt;
    auto panel = panels[t];
    float* wt = panel.data_ptr<float>();
    for (int64_t b0 = b_begin; b0 < b_end; b0 += panel_blocks) {
      const int64_t nb = std::min(panel_blocks, b_end - b0);
      for (int64_t i = 0; i < nb; ++i) decode_block(p, isa, b0 + i, wt, ldw, i * kBlockN);
      const int64_t n0 = b0 * kBlockN;
      const int64_t ncols = std::min(nb * kBlockN, p.N - n0);
      auto out = y.narrow(1, n0, ncols);
      at::mm_out(out, x, panel.narrow(1, 0, ncols));
      if (p.bias)
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t j = 0; j < ncols; ++j) p.y[m * p.N + n0 + j] += p.bias[n0 + j];
    }
  }
}

}  // namespace

// x fp32 [M, K] -> y fp32 [M, N]. panel_min_m: M from which the panel path is used (<=0: never).
// Activations to fp32 and per-group row sums, serially: for the small M this kernel is for, a few
// extra parallel torch ops cost more in fork/join than the work they do.
template <typename T>
void prepare_rows(const T* x, float* xf, float* xsum, int64_t M, int64_t K, int64_t g) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += g) {
      float s = 0.f;
      for (int64_t k = k0; k < k0 + g; ++k) {
        const float v = static_cast<float>(x[m * K + k]);
        if (xf) xf[m * K + k] = v;
        s += v;
      }
      xsum[m * (K / g) + k0 / g] = s;
    }
}

// x float32/bfloat16/float16 [M, K] -> y float32 [M, N] (+ bias, float32 [N]).
// panel_min_m: M from which the panel path is used (<= 0: never).
torch::Tensor w4_linear(const torch::Tensor& x, const torch::Tensor& qdata, const torch::Tensor& params,
                        int64_t N, int64_t group_size, int64_t isa, int64_t panel_min_m, int64_t panel_n,
                        int64_t prefetch, const c10::optional<torch::Tensor>& bias) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (xt == torch::kFloat32 || xt == torch::kBFloat16 || xt == torch::kFloat16),
              "x must be a 2-D float32/bfloat16/float16 CPU tensor");
  TORCH_CHECK(qdata.scalar_type() == torch::kUInt8 && qdata.dim() == 3 && qdata.size(2) == kBlockN,
              "qdata must be uint8 [N/32, K/2, 32]");
  TORCH_CHECK(params.scalar_type() == torch::kFloat32 && params.dim() == 4, "params must be float32 [N/32, G, 2, 32]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(qdata.size(1) * 2 == K, "x has K=", K, " but the weight has K=", qdata.size(1) * 2);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "bad group size ", group_size);
  const int64_t NB = qdata.size(0), G = K / group_size;
  TORCH_CHECK(N > (NB - 1) * kBlockN && N <= NB * kBlockN, "N=", N, " does not match ", NB, " blocks");
  TORCH_CHECK(params.size(0) == NB && params.size(1) == G && params.size(2) == 2 && params.size(3) == kBlockN,
              "params shape does not match");
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(bc.dim() == 1 && bc.size(0) == N, "bias must be [N]");
  }
  const float* bias_ptr = bc.defined() ? bc.data_ptr<float>() : nullptr;
  // Never run code the CPU cannot execute, whatever the caller asked for.
  Isa use = kScalar;
  if (isa >= kAvx512 && cpu_has_avx512()) use = kAvx512;
  else if (isa >= kAvx2 && cpu_has_avx2()) use = kAvx2;

  const auto f32 = x.options().dtype(torch::kFloat32);
  auto xin = x.contiguous();
  auto xc = xt == torch::kFloat32 ? xin : torch::empty({M, K}, f32);
  auto xsum = torch::empty({M, G}, f32);
  auto qc = qdata.contiguous();
  auto pc = params.contiguous();
  auto y = torch::empty({M, N}, f32);
  if (M == 0) return y;
  float* xf = xt == torch::kFloat32 ? nullptr : xc.data_ptr<float>();
  if (xt == torch::kFloat32) prepare_rows(xin.data_ptr<float>(), xf, xsum.data_ptr<float>(), M, K, group_size);
  else if (xt == torch::kBFloat16) prepare_rows(xin.data_ptr<c10::BFloat16>(), xf, xsum.data_ptr<float>(), M, K, group_size);
  else prepare_rows(xin.data_ptr<c10::Half>(), xf, xsum.data_ptr<float>(), M, K, group_size);

  Problem p{xc.data_ptr<float>(), xsum.data_ptr<float>(), qc.data_ptr<uint8_t>(), pc.data_ptr<float>(),
            y.data_ptr<float>(), bias_ptr, M, N, K, group_size, G, NB, prefetch};
  const int nthreads = std::max(1, at::get_num_threads());
  if (panel_min_m > 0 && M >= panel_min_m) {
    const int64_t panel_blocks = std::max<int64_t>(1, panel_n / kBlockN);
    run_panels(p, xc, y, use, nthreads, panel_blocks);
  } else {
    run_tiles(p, use, nthreads);
  }
  return y;
}

bool compiled_with_simd() { return AWQF_HAVE_X86 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4_linear", &w4_linear, "y = x . W^T (+ bias) from the packed 4-bit CPU layout, fp32 result",
        py::arg("x"), py::arg("qdata"), py::arg("params"), py::arg("N"), py::arg("group_size"), py::arg("isa"),
        py::arg("panel_min_m"), py::arg("panel_n"), py::arg("prefetch"), py::arg("bias") = py::none());
  m.def("cpu_has_avx2", &cpu_has_avx2, "AVX2+FMA available on this CPU");
  m.def("cpu_has_avx512", &cpu_has_avx512, "AVX-512F available on this CPU");
  m.def("compiled_with_simd", &compiled_with_simd, "the AVX2/AVX-512 paths were compiled into this build");
}
