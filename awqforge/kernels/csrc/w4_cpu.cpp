// W4 linear on CPU: y[M, N] = x[M, K] . W[N, K]^T straight from packed 4-bit weights.
//
// Weight layout (awqforge.packing.pack_cpu_w4): blocks of 32 output channels.
//   qdata  uint32 [NB, K/8, 32]: word [b, c, j] holds the codes q[32b+j, 8c..8c+7]:
//          q[., 8c+2i] in bits 4i..4i+3, q[., 8c+2i+1] in bits 16+4i..19+4i (i = 0..3).
//   params fp32   [NB, G, 2, 32]: per group s' = 16 s and o' = -(z + 16) s.
//
// Small M ("tile" path, integer): x is rounded to int16 per (row, group) (step max|x|/32767, finer
// than bf16) and each packed word gives, with one shift and one AND, the code pairs (q[k], q[k+1])
// of its channels in the two 16-bit halves of a 32-bit lane; vpmaddwd (AVX2) / vpdpwssd (AVX512-VNNI)
// multiplies them by the broadcast pair (xq[k], xq[k+1]) and sums into int32. Per group, with
// s' = 16 s and o' = -(z + 16) s: y += (s'/16) * step * acc + (o' + s') * X, X = sum_k x. Each
// decoded register serves MT rows; the whole FP weight never exists. The scalar path does the same
// in fp32 from the float decoding below.
//
// Decoding to floats ("mantissa trick", panel and scalar paths): shifting a word so that a code lands
// in bits 19..22 and OR-ing in the bits of 1.0f gives the float 1 + q/16 exactly, with no int->float
// conversion; then W = (1 + q/16) s' + o'.
//
// Large M ("panel" path): each thread decodes a panel of its output channels, W^T [K, Nc] fp32
// (a few MB, lives in cache), and lets the BLAS sgemm that F.linear uses multiply it; then decodes
// its next panel. Decoding costs O(N*K) against the GEMM's O(M*N*K), so at large M this is as fast
// as the FP GEMM while reading 1/8 of the weight bytes from memory.
//
// The SIMD code is compiled with function-level target attributes (no global -mavx2), so one build
// holds every path; the caller picks one at run time and w4_linear re-checks it against the CPU
// (__builtin_cpu_supports). Non-x86 builds compile the SIMD code out and keep the scalar path.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

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
  const float* x;       // [M, K] fp32 (fp32 paths)
  const float* xsum;    // [M, G]: per-row, per-group sums of x
  const uint32_t* qd;   // [NB, K/8, 32]
  const float* prm;     // [NB, G, 2, 32]
  float* y;             // [M, N]
  const float* bias;    // [N] or nullptr
  int64_t M, N, K, g, G, NB;
  int64_t prefetch = 0;  // bytes ahead in the weight stream to prefetch (0: leave it to the hardware)
  const int16_t* xq = nullptr;  // [M, K]: x quantized to int16 per (row, group) (integer tile paths)
  const float* xa = nullptr;    // [M, G]: that group's step / 16 (x ~ xq * 16 * xa)
};

// Bit position of code kk (k = 8c + kk) in its word.
constexpr int code_pos(int kk) { return (kk & 1) ? 16 + 4 * (kk >> 1) : 4 * (kk >> 1); }

// ---------------------------------------------------------------------------------- scalar

inline float decode_scalar(uint32_t w, int kk) {
  return 1.f + static_cast<float>((w >> code_pos(kk)) & 15u) * 0.0625f;
}

void tile_scalar(const Problem& p, int64_t b, int64_t m0, int64_t mt) {
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  for (int64_t m = m0; m < m0 + mt; ++m) {
    const float* xm = p.x + m * p.K;
    float out[kBlockN] = {0.f};
    for (int64_t gi = 0; gi < p.G; ++gi) {
      float acc[kBlockN] = {0.f};
      for (int64_t c = gi * p.g / 8; c < (gi + 1) * p.g / 8; ++c) {
        const uint32_t* row = qb + c * kBlockN;
        const float* xk = xm + 8 * c;
        for (int j = 0; j < kBlockN; ++j) {
          float a = 0.f;
          for (int kk = 0; kk < 8; ++kk) a += decode_scalar(row[j], kk) * xk[kk];
          acc[j] += a;
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
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  for (int64_t c = 0; c < p.K / 8; ++c) {
    const uint32_t* row = qb + c * kBlockN;
    const float* s = pb + (8 * c / p.g) * 2 * kBlockN;
    const float* o = s + kBlockN;
    for (int kk = 0; kk < 8; ++kk) {
      float* w = wt + (8 * c + kk) * ldw + col0;
      for (int j = 0; j < kBlockN; ++j) w[j] = decode_scalar(row[j], kk) * s[j] + o[j];
    }
  }
}

#if AWQF_HAVE_X86

// Compile-time unrolled loops are folds over std::integer_sequence into always_inline helpers
// that carry the same target attribute (a lambda would not inherit it).
#define AWQF_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------- AVX2
#define AWQF_AVX2 __attribute__((target("avx2,fma")))

// fp32 1 + q/16 of code kk in each word
template <int KK>
AWQF_AVX2 AWQF_INLINE __m256 decode8(__m256i w) {
  constexpr int pos = code_pos(KK);
  __m256i t;
  if constexpr (pos <= 19) t = _mm256_slli_epi32(w, 19 - pos);
  else t = _mm256_srli_epi32(w, pos - 19);
  t = _mm256_and_si256(t, _mm256_set1_epi32(0x00780000));
  return _mm256_castsi256_ps(_mm256_or_si256(t, _mm256_set1_epi32(0x3F800000)));
}

template <int KK>
AWQF_AVX2 AWQF_INLINE void store_decoded8(__m256i w, float* wt, int64_t ldw, __m256 s, __m256 o) {
  _mm256_storeu_ps(wt + KK * ldw, _mm256_fmadd_ps(decode8<KK>(w), s, o));
}

template <int... KK>
AWQF_AVX2 AWQF_INLINE void decode_octet_avx2(std::integer_sequence<int, KK...>, __m256i w, float* wt, int64_t ldw,
                                              __m256 s, __m256 o) {
  (store_decoded8<KK>(w, wt, ldw, s, o), ...);
}

AWQF_AVX2 void decode_block_avx2(const Problem& p, int64_t b, float* wt, int64_t ldw, int64_t col0) {
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    __m256 sv[4], ov[4];
    for (int v = 0; v < 4; ++v) {
      sv[v] = _mm256_loadu_ps(s + v * 8);
      ov[v] = _mm256_loadu_ps(s + kBlockN + v * 8);
    }
    for (int64_t c = gi * p.g / 8; c < (gi + 1) * p.g / 8; ++c) {
      const uint32_t* q = qb + c * kBlockN;
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v * 8));
        decode_octet_avx2(std::make_integer_sequence<int, 8>{}, w, wt + 8 * c * ldw + col0 + v * 8, ldw, sv[v], ov[v]);
      }
    }
  }
}

// Integer tile path (the default at small M): x is quantized per (row, group) to int16 (step
// max|x|/32767: finer than bf16), and vpmaddwd multiplies a register of eight channels' code pairs
// (q[k], q[k+1]) in the two 16-bit halves of each 32-bit lane, which one shift and one AND extract
// from the packed word, with the broadcast pair (xq[k], xq[k+1]) and sums each pair into int32:
// 16 products per vpmaddwd. Per 64 weights: 3 shifts + 4 ANDs + 4 vpmaddwd + 4 adds = 15 uops,
// against 32 for the fp32 decode (shift, AND, OR, FMA per 8). Codes are 0..15, so a group of up to
// 4096 inputs sums within int32. Per group: y += s' * xa * acc + (o' + s') * X, since
// s q x - z s X = (s'/16) q x + (o' + s') X with s' = 16 s and o' = -(z + 16) s.
template <int I>
AWQF_AVX2 AWQF_INLINE __m256i pair_codes8(__m256i w) {
  const __m256i mask = _mm256_set1_epi32(0x000F000F);
  if constexpr (I == 0) return _mm256_and_si256(w, mask);
  else return _mm256_and_si256(_mm256_srli_epi32(w, 4 * I), mask);
}

template <int MT, int NS, int... I>
AWQF_AVX2 AWQF_INLINE void octet_int_avx2(std::integer_sequence<int, I...>, __m256i w, const int16_t* xk, int64_t K,
                                           int v, __m256i (&acc)[MT][NS]) {
  const __m256i t[4] = {pair_codes8<I>(w)...};
  for (int m = 0; m < MT; ++m) {
    const int32_t* xp = reinterpret_cast<const int32_t*>(xk + m * K);
    __m256i s0 = _mm256_madd_epi16(t[0], _mm256_set1_epi32(xp[0]));
    __m256i s1 = _mm256_madd_epi16(t[1], _mm256_set1_epi32(xp[1]));
    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(t[2], _mm256_set1_epi32(xp[2])));
    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(t[3], _mm256_set1_epi32(xp[3])));
    acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_add_epi32(s0, s1));
  }
}

template <int MT, int NS>
AWQF_AVX2 void tile_int_avx2(const Problem& p, int64_t b, int64_t m0) {
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  alignas(32) float out[MT][kBlockN];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kBlockN; ++j) out[m][j] = 0.f;

  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    const float* o = s + kBlockN;
    const int64_t c0 = gi * p.g / 8, c1 = (gi + 1) * p.g / 8;
    for (int v0 = 0; v0 < kBlockN / 8; v0 += NS) {
      __m256i acc[MT][NS];
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < NS; ++v) acc[m][v] = _mm256_setzero_si256();
      for (int64_t c = c0; c < c1; ++c) {
        const uint32_t* q = qb + c * kBlockN + v0 * 8;
        if (p.prefetch) _mm_prefetch(reinterpret_cast<const char*>(q) + p.prefetch, _MM_HINT_T0);
        const int16_t* xk = p.xq + m0 * p.K + 8 * c;
#pragma GCC unroll 4
        for (int v = 0; v < NS; ++v) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v * 8));
          octet_int_avx2<MT, NS>(std::make_integer_sequence<int, 4>{}, w, xk, p.K, v, acc);
        }
      }
      for (int v = 0; v < NS; ++v) {
        const int j = (v0 + v) * 8;
        const __m256 sv = _mm256_loadu_ps(s + j);
        const __m256 osv = _mm256_add_ps(_mm256_loadu_ps(o + j), sv);
        for (int m = 0; m < MT; ++m) {
          const __m256 xa = _mm256_set1_ps(p.xa[(m0 + m) * p.G + gi]);
          const __m256 xs = _mm256_set1_ps(p.xsum[(m0 + m) * p.G + gi]);
          __m256 r = _mm256_load_ps(&out[m][j]);
          r = _mm256_fmadd_ps(_mm256_mul_ps(sv, xa), _mm256_cvtepi32_ps(acc[m][v]), r);
          r = _mm256_fmadd_ps(osv, xs, r);
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

// ---------------------------------------------------------------------------------- AVX-512
// 16 channels per register (two per block) and 32 registers.
#define AWQF_AVX512 __attribute__((target("avx512f,avx2,fma")))
constexpr int kTernAndOr = 0xEA;  // vpternlogd: (a & b) | c

template <int KK>
AWQF_AVX512 AWQF_INLINE __m512 decode16(__m512i w) {
  constexpr int pos = code_pos(KK);
  __m512i t;
  if constexpr (pos <= 19) t = _mm512_slli_epi32(w, 19 - pos);
  else t = _mm512_srli_epi32(w, pos - 19);
  return _mm512_castsi512_ps(
      _mm512_ternarylogic_epi32(t, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3F800000), kTernAndOr));
}

template <int MT>
AWQF_AVX512 AWQF_INLINE void store_tile(const Problem& p, int64_t b, int64_t m0,
                                                                 __m512 (&out)[MT][2]) {
  const int64_t n0 = b * kBlockN;
  const int64_t nvalid = std::min<int64_t>(kBlockN, p.N - n0);
  const __mmask16 k0 = nvalid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nvalid) - 1);
  const __mmask16 k1 = nvalid >= 32 ? 0xFFFF : nvalid <= 16 ? 0 : static_cast<__mmask16>((1u << (nvalid - 16)) - 1);
  const __m512 b0 = p.bias ? _mm512_maskz_loadu_ps(k0, p.bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = p.bias ? _mm512_maskz_loadu_ps(k1, p.bias + n0 + 16) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) {
    float* yr = p.y + (m0 + m) * p.N + n0;
    _mm512_mask_storeu_ps(yr, k0, _mm512_add_ps(out[m][0], b0));
    _mm512_mask_storeu_ps(yr + 16, k1, _mm512_add_ps(out[m][1], b1));
  }
}

template <int KK>
AWQF_AVX512 AWQF_INLINE void store_decoded16(__m512i w0, __m512i w1, float* wt, int64_t ldw, __m512 s0, __m512 s1,
                                             __m512 o0, __m512 o1) {
  _mm512_storeu_ps(wt + KK * ldw, _mm512_fmadd_ps(decode16<KK>(w0), s0, o0));
  _mm512_storeu_ps(wt + KK * ldw + 16, _mm512_fmadd_ps(decode16<KK>(w1), s1, o1));
}

template <int... KK>
AWQF_AVX512 AWQF_INLINE void decode_octet_avx512(std::integer_sequence<int, KK...>, __m512i w0, __m512i w1, float* wt,
                                                 int64_t ldw, __m512 s0, __m512 s1, __m512 o0, __m512 o1) {
  (store_decoded16<KK>(w0, w1, wt, ldw, s0, s1, o0, o1), ...);
}

AWQF_AVX512 void decode_block_avx512(const Problem& p, int64_t b, float* wt, int64_t ldw, int64_t col0) {
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN;
  const float* pb = p.prm + b * p.G * 2 * kBlockN;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const float* s = pb + gi * 2 * kBlockN;
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    const __m512 o0 = _mm512_loadu_ps(s + 32), o1 = _mm512_loadu_ps(s + 48);
    for (int64_t c = gi * p.g / 8; c < (gi + 1) * p.g / 8; ++c) {
      const uint32_t* q = qb + c * kBlockN;
      const __m512i w0 = _mm512_loadu_si512(q);
      const __m512i w1 = _mm512_loadu_si512(q + 16);
      decode_octet_avx512(std::make_integer_sequence<int, 8>{}, w0, w1, wt + 8 * c * ldw + col0, ldw, s0, s1, o0, o1);
    }
  }
}

// Integer tile path on AVX-512 (see the AVX2 one): 16 channels per register, two per block; with
// AVX512-VNNI vpdpwssd fuses multiply, pair-sum and accumulate (per 128 weights: 3 shifts, 8 ANDs,
// 8 vpdpwssd).
#define AWQF_AVX512BW __attribute__((target("avx512f,avx512bw,avx2,fma")))
#define AWQF_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))

// The body of both AVX-512 integer tiles; DOT(acc, a, b) accumulates the pair-products a * b.
#define AWQF_TILE_INT_AVX512_BODY(DOT) \
  do { \
  const uint32_t* qb = p.qd + b * (p.K / 8) * kBlockN; \
  const float* pb = p.prm + b * p.G * 2 * kBlockN; \
  const __m512i mask = _mm512_set1_epi32(0x000F000F); \
  __m512 out[MT][2]; \
  for (int m = 0; m < MT; ++m) out[m][0] = out[m][1] = _mm512_setzero_ps(); \
  for (int64_t gi = 0; gi < p.G; ++gi) { \
    /* two accumulators per (row, vector): pairs i = 0, 2 and i = 1, 3 */ \
    __m512i acc[MT][2][2]; \
    for (int m = 0; m < MT; ++m) \
      for (int v = 0; v < 2; ++v) acc[m][v][0] = acc[m][v][1] = _mm512_setzero_si512(); \
    for (int64_t c = gi * p.g / 8; c < (gi + 1) * p.g / 8; ++c) { \
      const uint32_t* q = qb + c * kBlockN; \
      if (p.prefetch) { \
        _mm_prefetch(reinterpret_cast<const char*>(q) + p.prefetch, _MM_HINT_T0); \
        _mm_prefetch(reinterpret_cast<const char*>(q) + p.prefetch + 64, _MM_HINT_T0); \
      } \
      const __m512i w[2] = {_mm512_loadu_si512(q), _mm512_loadu_si512(q + 16)}; \
_Pragma("GCC unroll 4") \
      for (int i = 0; i < 4; ++i) { \
        const __m512i t0 = _mm512_and_si512(_mm512_srli_epi32(w[0], 4 * i), mask); \
        const __m512i t1 = _mm512_and_si512(_mm512_srli_epi32(w[1], 4 * i), mask); \
        for (int m = 0; m < MT; ++m) { \
          const __m512i xv = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(p.xq + (m0 + m) * p.K + 8 * c)[i]); \
          acc[m][0][i & 1] = DOT(acc[m][0][i & 1], t0, xv); \
          acc[m][1][i & 1] = DOT(acc[m][1][i & 1], t1, xv); \
        } \
      } \
    } \
    const float* s = pb + gi * 2 * kBlockN; \
    for (int v = 0; v < 2; ++v) { \
      const __m512 sv = _mm512_loadu_ps(s + v * 16); \
      const __m512 osv = _mm512_add_ps(_mm512_loadu_ps(s + kBlockN + v * 16), sv); \
      for (int m = 0; m < MT; ++m) { \
        const __m512 a = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][v][0], acc[m][v][1])); \
        const __m512 xa = _mm512_set1_ps(p.xa[(m0 + m) * p.G + gi]); \
        out[m][v] = _mm512_fmadd_ps(_mm512_mul_ps(sv, xa), a, out[m][v]); \
        out[m][v] = _mm512_fmadd_ps(osv, _mm512_set1_ps(p.xsum[(m0 + m) * p.G + gi]), out[m][v]); \
      } \
    } \
  } \
  store_tile<MT>(p, b, m0, out); \
  } while (0)

AWQF_AVX512BW AWQF_INLINE __m512i dot_madd(__m512i acc, __m512i a, __m512i b) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
}

AWQF_AVX512VNNI AWQF_INLINE __m512i dot_vnni(__m512i acc, __m512i a, __m512i b) {
  return _mm512_dpwssd_epi32(acc, a, b);
}

template <int MT>
AWQF_AVX512BW void tile_int_avx512(const Problem& p, int64_t b, int64_t m0) {
  AWQF_TILE_INT_AVX512_BODY(dot_madd);
}

template <int MT>
AWQF_AVX512VNNI void tile_int_avx512_vnni(const Problem& p, int64_t b, int64_t m0) {
  AWQF_TILE_INT_AVX512_BODY(dot_vnni);
}
#endif  // AWQF_HAVE_X86

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has_avx2() {
#if AWQF_HAVE_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if AWQF_HAVE_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool cpu_has_avx512vnni() {
#if AWQF_HAVE_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

void run_tiles(const Problem& p, Isa isa, int nthreads) {
  // Rows in tiles of 4 (then 2, 1); blocks of 32 channels spread over the threads.
#if AWQF_HAVE_X86
  const bool vnni = isa == kAvx512 && cpu_has_avx512vnni();
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < p.NB; ++b) {
    int64_t m = 0;
#if AWQF_HAVE_X86
    if (isa == kAvx512) {
      if (vnni) {
        for (; m + 4 <= p.M; m += 4) tile_int_avx512_vnni<4>(p, b, m);
        for (; m + 2 <= p.M; m += 2) tile_int_avx512_vnni<2>(p, b, m);
        for (; m < p.M; ++m) tile_int_avx512_vnni<1>(p, b, m);
      } else {
        for (; m + 4 <= p.M; m += 4) tile_int_avx512<4>(p, b, m);
        for (; m + 2 <= p.M; m += 2) tile_int_avx512<2>(p, b, m);
        for (; m < p.M; ++m) tile_int_avx512<1>(p, b, m);
      }
      continue;
    }
    if (isa == kAvx2) {
      for (; m + 4 <= p.M; m += 4) tile_int_avx2<4, 1>(p, b, m);
      for (; m + 2 <= p.M; m += 2) tile_int_avx2<2, 2>(p, b, m);
      for (; m < p.M; ++m) tile_int_avx2<1, 4>(p, b, m);
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

// Rows of x [M, K] -> fp32 copy (when xf is given), per-group sums and, when xq is given, the rows
// quantized to int16 per group (xq = round(x / step), step = max|x| / 32767; xa = step / 16).
// Serial: for the small M this kernel is for, a few extra parallel torch ops cost more in
// fork/join than the work they do.
template <typename T>
void prepare_rows(const T* x, int64_t M, int64_t K, int64_t g, float* xf, float* xsum, int16_t* xq, float* xa) {
  const int64_t G = K / g;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      float s = 0.f, amax = 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
        const float v = static_cast<float>(x[m * K + k]);
        if (xf) xf[m * K + k] = v;
        s += v;
        amax = std::max(amax, std::abs(v));
      }
      xsum[m * G + gi] = s;
      if (!xq) continue;
      const float step = amax / 32767.f;
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k)
        xq[m * K + k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(x[m * K + k]) * inv));
      xa[m * G + gi] = step / 16.f;
    }
}

}  // namespace

// x float32/bfloat16/float16 [M, K] -> y float32 [M, N] (+ bias, float32 [N]).
// qdata int32 [NB, Kp/8, 32] with Kp = K, or K rounded up to 8 for a per-channel layer
// (group_size == K). panel_min_m: M from which the panel path is used (<= 0: never).
torch::Tensor w4_linear(const torch::Tensor& x, const torch::Tensor& qdata, const torch::Tensor& params,
                        int64_t N, int64_t group_size, int64_t isa, int64_t panel_min_m, int64_t panel_n,
                        int64_t prefetch, const c10::optional<torch::Tensor>& bias) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (xt == torch::kFloat32 || xt == torch::kBFloat16 || xt == torch::kFloat16),
              "x must be a 2-D float32/bfloat16/float16 CPU tensor");
  TORCH_CHECK(qdata.scalar_type() == torch::kInt32 && qdata.dim() == 3 && qdata.size(2) == kBlockN,
              "qdata must be int32 [N/32, K/8, 32] (awqforge.packing.pack_cpu_w4)");
  TORCH_CHECK(params.scalar_type() == torch::kFloat32 && params.dim() == 4, "params must be float32 [N/32, G, 2, 32]");
  const int64_t M = x.size(0), K = x.size(1), Kp = qdata.size(1) * 8;
  TORCH_CHECK(Kp == K || (group_size == K && Kp > K && Kp - K < 8), "x has K=", K, " but the weight has K=", Kp);
  const int64_t g = group_size == K ? Kp : group_size;
  TORCH_CHECK(g > 0 && g % 8 == 0 && Kp % g == 0, "bad group size ", group_size, " for K=", K);
  const int64_t NB = qdata.size(0), G = Kp / g;
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

  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  if (M == 0) return y;
  const bool panels = panel_min_m > 0 && M >= panel_min_m;
  const auto f32 = x.options().dtype(torch::kFloat32);
  auto xin = x.contiguous();
  if (Kp != K) xin = torch::constant_pad_nd(xin, {0, Kp - K}, 0);
  // fp32 copy of x (none when it already is fp32) and the per-group row sums.
  const bool own_xf = xt != torch::kFloat32;
  auto xf = own_xf ? torch::empty({M, Kp}, f32) : xin;
  auto xsum = torch::empty({M, G}, f32);
  float* xf_w = own_xf ? xf.data_ptr<float>() : nullptr;
  // the integer tile paths read x as int16 (K even: g is a multiple of 8)
  const bool int_tiles = !panels && use != kScalar;
  auto xq = torch::empty({int_tiles ? M : 0, Kp}, x.options().dtype(torch::kInt16));
  auto xa = torch::empty({int_tiles ? M : 0, G}, f32);
  int16_t* xq_w = int_tiles ? xq.data_ptr<int16_t>() : nullptr;
  float* xa_w = int_tiles ? xa.data_ptr<float>() : nullptr;
  float* xs_w = xsum.data_ptr<float>();
  if (xt == torch::kFloat32) prepare_rows(xin.data_ptr<float>(), M, Kp, g, xf_w, xs_w, xq_w, xa_w);
  else if (xt == torch::kBFloat16) prepare_rows(xin.data_ptr<c10::BFloat16>(), M, Kp, g, xf_w, xs_w, xq_w, xa_w);
  else prepare_rows(xin.data_ptr<c10::Half>(), M, Kp, g, xf_w, xs_w, xq_w, xa_w);

  auto qc = qdata.contiguous();
  auto pc = params.contiguous();
  Problem p{xf.data_ptr<float>(),
            xsum.data_ptr<float>(),
            reinterpret_cast<const uint32_t*>(qc.data_ptr<int32_t>()),
            pc.data_ptr<float>(),
            y.data_ptr<float>(),
            bias_ptr,
            M, N, Kp, g, G, NB, prefetch, xq_w, xa_w};
  const int nthreads = std::max(1, at::get_num_threads());
  if (panels) {
    const int64_t panel_blocks = std::max<int64_t>(1, panel_n / kBlockN);
    run_panels(p, xf, y, use, nthreads, panel_blocks);
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
  m.def("cpu_has_avx512", &cpu_has_avx512, "AVX-512F and AVX-512BW available on this CPU");
  m.def("cpu_has_avx512vnni", &cpu_has_avx512vnni, "AVX512-VNNI available on this CPU");
  m.def("compiled_with_simd", &compiled_with_simd, "the AVX2/AVX-512 paths were compiled into this build");
}
