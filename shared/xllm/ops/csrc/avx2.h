// AVX2 + FMA paths of the CPU kernels, for the many CPUs without AVX512 (Zen 1-3, most
// client Intel parts): there torch's bf16 matmuls have no native bf16 units to use and run
// at a few GFLOP/s, while a bf16 weight is just the high half of a float, so widening it in
// registers (a 16-bit shift) and multiplying in fp32 FMAs costs two cheap ALU ops per
// 8 weights. Included by cpu_kernels.cpp, which picks these paths at compile time where
// the AVX512 ones are not built (-march=native decides).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define XLLM_AVX2 1
#include <immintrin.h>

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace avx2 {

// 8 consecutive elements as floats.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#if defined(__F16C__)
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Whether load8 exists for this element type (Half needs F16C).
template <typename T>
constexpr bool vectorised() {
#if defined(__F16C__)
  return std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
#else
  return std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
#endif
}

// 8 floats -> 8 bf16, rounded to nearest even as at::BFloat16(float) does (NaNs aside).
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather the two halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot product of a float row with a row of the cache, D % 8 == 0.
template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {  // two accumulators: half the FMA dependency chain
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(b + d + 8), a1);
  }
  if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), a0);
  return hsum(_mm256_add_ps(a0, a1));
}

template <typename T>
inline void to_floats(float* dst, const T* src, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, load8(src + d));
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

// out_a += sum_s pa[s] v_s and out_b += sum_s pb[s] v_s over n rows v_s (rows `stride`
// apart), 32 wide: 8 accumulators in registers, each row loaded once for two query heads.
template <typename T>
inline void weighted32_x2(const float* pa, const float* pb, const T* v, int64_t stride, int64_t n,
                          float* out_a, float* out_b) {
  __m256 a[4], b[4];
  for (int i = 0; i < 4; ++i) { a[i] = _mm256_loadu_ps(out_a + 8 * i); b[i] = _mm256_loadu_ps(out_b + 8 * i); }
  for (int64_t s = 0; s < n; ++s, v += stride) {
    const __m256 wa = _mm256_set1_ps(pa[s]), wb = _mm256_set1_ps(pb[s]);
    for (int i = 0; i < 4; ++i) {
      const __m256 row = load8(v + 8 * i);
      a[i] = _mm256_fmadd_ps(wa, row, a[i]);
      b[i] = _mm256_fmadd_ps(wb, row, b[i]);
    }
  }
  for (int i = 0; i < 4; ++i) { _mm256_storeu_ps(out_a + 8 * i, a[i]); _mm256_storeu_ps(out_b + 8 * i, b[i]); }
}

// out[j] += sum_s p[j][s] v_s for the G query heads j sharing one KV head (p rows `T`
// apart), D % 32 == 0: 32 dimensions at a time (16 registers hold no more for two heads);
// the block's rows stay in L1 between the passes.
template <typename T>
inline void weighted_block(const float* p, int64_t T_, int64_t G, const T* v, int64_t stride,
                           int64_t n, int64_t D, float* out) {
  for (int64_t d = 0; d < D; d += 32)
    for (int64_t g = 0; g < G; g += 2) {
      // Odd G: the last head pairs with itself (both halves compute the same result).
      const int64_t g2 = std::min(g + 1, G - 1);
      weighted32_x2(p + g * T_, p + g2 * T_, v + d, stride, n, out + g * D + d, out + g2 * D + d);
    }
}

// exp(x - mx) in place for n elements; returns their sum. exp(y) = 2^k 2^f with
// k = round(y log2 e), |f| <= 1/2, 2^f by its Taylor series to degree 7; y clamped so that
// 2^k stays a normal float (exp(-87) ~ 1e-38 is zero next to the max's 1).
inline float exp_sum(float* x, int64_t n, float mx) {
  const __m256 log2e = _mm256_set1_ps(1.44269504f), vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-126.f);
  const float c[8] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f,
                      0.00961812911f, 0.00133335581f, 0.000154035304f, 1.52527339e-05f};
  __m256 vsum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 y = _mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + t), vmx), log2e), lo);
    const __m256 k = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, k);
    __m256 p = _mm256_set1_ps(c[7]);
    for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    _mm256_storeu_ps(x + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < n; ++t) { x[t] = std::exp(x[t] - mx); sum += x[t]; }
  return sum;
}

// y = x / sqrt(mean(x^2) + eps) * w for one row of N (N % 8 == 0), in float, rounded once.
template <typename T>
inline void rms_norm_row(const T* x, const float* w, int64_t N, float eps, T* y) {
  __m256 ss = _mm256_setzero_ps();
  for (int64_t i = 0; i < N; i += 8) { const __m256 v = load8(x + i); ss = _mm256_fmadd_ps(v, v, ss); }
  const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum(ss) / static_cast<float>(N) + eps));
  for (int64_t i = 0; i < N; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(load8(x + i), inv), _mm256_loadu_ps(w + i));
    if constexpr (std::is_same_v<T, at::Half>) {
#if defined(__F16C__)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#endif
    } else {
      store8(y + i, v);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Linear y = x W^T (+ b) over weights packed once at load, the same layout the AVX512-BF16
// and AMX kernels use: [Np/16][Kp/2][16][2], for each block of 16 output columns and each
// pair of input features the 16 columns' pairs side by side (N padded to 16, K to 2, with
// zeros). One 32-byte load holds 8 columns x 2 features: the even feature's weights are the
// words shifted left 16, the odd one's the words with the low half masked off, so each
// load feeds 2 FMAs per row of x, with no shuffles. x is widened to float once per call.
//
// A micro-kernel keeps MR rows x NV vectors of 8 columns in registers (at most 12 of the 16
// ymm registers). Batch 1-2 is memory bound: many weight streams per row (NV 8 or 4). More
// rows are compute bound: 6 rows x 2 vectors, one broadcast of x per 2 FMAs (measured on
// Zen 3, one thread: ~85 GFLOP/s for 6..512 rows, against 42 for 2 x 4 and 38 for 3 x 4;
// torch's bf16 matmul there: ~10).
// ---------------------------------------------------------------------------------------

// out[i][v*8 + c] over `pairs` feature pairs, for MR rows of x (rows `ldx` apart) and the
// NV vectors starting at vector v0 (vector v: block v/2, half v%2; blocks `block` apart).
template <int MR, int NV>
inline void linear_micro(const uint16_t* w, int64_t block, int64_t pairs, const float* x,
                         int64_t ldx, float* out) {
  __m256 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  auto raw = [&](int64_t p, int v) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (v / 2) * block + p * 32 + (v % 2) * 16));
  };
  // Per pair: the even feature's weights for all NV vectors, then the odd one's, each
  // broadcast of x feeding NV FMAs (the 32-byte weight loads are cheap L1 re-reads).
  for (int64_t p = 0; p < pairs; ++p) {
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_castsi256_ps(_mm256_slli_epi32(raw(p, v), 16));
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * ldx + 2 * p);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(wv[v], xb, acc[i][v]);
    }
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_castsi256_ps(_mm256_and_si256(raw(p, v), high));
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * ldx + 2 * p + 1);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(wv[v], xb, acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + (i * NV + v) * 8, acc[i][v]);
}

// Rows [m, m + rows) x vectors [v0, v0 + NV) of y, bias added, rounded to bf16; columns
// past N (the padding of the last block) are not written.
template <int NV>
inline void linear_store(const float* out, int64_t m, int64_t rows, int64_t v0, int64_t N,
                         const at::BFloat16* bias, at::BFloat16* y) {
  for (int64_t i = 0; i < rows; ++i)
    for (int v = 0; v < NV; ++v) {
      const int64_t col = (v0 + v) * 8;
      const float* o = out + (i * NV + v) * 8;
      at::BFloat16* dst = y + (m + i) * N + col;
      if (col + 8 <= N) {
        __m256 r = _mm256_loadu_ps(o);
        if (bias) r = _mm256_add_ps(r, load8(bias + col));
        store8(dst, r);
      } else {
        for (int64_t c = 0; c < N - col; ++c)
          dst[c] = at::BFloat16(o[c] + (bias ? static_cast<float>(bias[col + c]) : 0.f));
      }
    }
}

// y[m0:M, vectors v0 .. v0+NV) of x, MR rows at a time, fewer for the tail.
template <int MR, int NV>
inline void linear_columns(const uint16_t* w, int64_t Kp, const float* x, int64_t m0, int64_t M,
                           int64_t N, int64_t v0, const at::BFloat16* bias, at::BFloat16* y) {
  alignas(32) float out[MR * NV * 8];
  const uint16_t* wv = w + (v0 / 2) * Kp * 16;
  const int64_t block = Kp * 16, pairs = Kp / 2;
  int64_t m = m0;
  for (; m + MR <= M; m += MR) {
    linear_micro<MR, NV>(wv, block, pairs, x + m * Kp, Kp, out);
    linear_store<NV>(out, m, MR, v0, N, bias, y);
  }
  if constexpr (MR > 1) {
    const int64_t rows = M - m;
    if (rows == 0) return;
    const float* xm = x + m * Kp;
    switch (rows) {  // compile-time row counts: accumulators stay in registers
      case 1: linear_micro<1, NV>(wv, block, pairs, xm, Kp, out); break;
      case 2: linear_micro<MR >= 3 ? 2 : 1, NV>(wv, block, pairs, xm, Kp, out); break;
      case 3: linear_micro<MR >= 4 ? 3 : 1, NV>(wv, block, pairs, xm, Kp, out); break;
      case 4: linear_micro<MR >= 5 ? 4 : 1, NV>(wv, block, pairs, xm, Kp, out); break;
      default: linear_micro<MR >= 6 ? 5 : 1, NV>(wv, block, pairs, xm, Kp, out); break;
    }
    linear_store<NV>(out, m, rows, v0, N, bias, y);
  }
}

// All column groups of NV vectors over the threads; the few vectors past the last whole
// group (N not a multiple of 8 * NV) one 16-column block at a time. Each thread walks its
// columns once per chunk of rows small enough for its x to stay in L2 (~256 KiB): the
// broadcasts then hit cache, and each weight block is re-read from L3 once per chunk.
template <int MR, int NV>
void linear_impl(const uint16_t* w, int64_t Kp, int64_t Np, const float* x, int64_t M, int64_t N,
                 const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t vectors = Np / 8, groups = vectors / NV;
  const int64_t chunk = std::max<int64_t>(1, (65536 / Kp) / MR) * MR;
  auto run = [&](int64_t g0, int64_t g1, auto nv) {
    constexpr int V = decltype(nv)::value;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t m1 = std::min(M, m0 + chunk);
      for (int64_t g = g0; g < g1; ++g) linear_columns<MR, V>(w, Kp, x, m0, m1, N, g * V, bias, y);
    }
  };
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    run(begin, end, std::integral_constant<int, NV>{});
  });
  run(groups * NV / 2, vectors / 2, std::integral_constant<int, 2>{});
}

inline at::Tensor packed_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t N,
                                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "packed_bf16_linear takes bfloat16 tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be [rows, features]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 1) / 2 * 2, Np = (N + 15) / 16 * 16;
  TORCH_CHECK(packed.numel() == Np * Kp, "packed weight shape mismatch");
  // x widened to float once (zero past K, to meet the weights' zero padding).
  std::vector<float> xf(M * Kp, 0.f);
  const auto* xp = x.data_ptr<at::BFloat16>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) to_floats(xf.data() + r * Kp, xp + r * K, K);
  });
  auto y = at::empty({M, N}, x.options());
  at::Tensor b;
  const at::BFloat16* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->contiguous(); bp = b.data_ptr<at::BFloat16>(); }
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<at::BFloat16>();
  if (M == 1) linear_impl<1, 8>(wp, Kp, Np, xf.data(), M, N, bp, yp);
  else if (M == 2) linear_impl<2, 4>(wp, Kp, Np, xf.data(), M, N, bp, yp);
  else linear_impl<6, 2>(wp, Kp, Np, xf.data(), M, N, bp, yp);
  return y;
}

// ---------------------------------------------------------------------------------------
// Prefill attention (bf16): the L query rows of one chunk against its T keys (the T - L
// cached before it, then its own), causal. As on AVX512-BF16 (cpu_kernels.cpp), per KV head
// the keys are packed once into the linear's layout (16 keys per block) and the values
// transposed into it, so q.K^T and P.V are both the linear's micro-kernel; here q and P stay
// float (the micro-kernel multiplies float rows), so P is not rounded to bf16.
// ---------------------------------------------------------------------------------------

// Rows [T, D] of one head (rows `ld` apart) -> [Tp/16][D/2][16][2], zero past T.
inline void pack_keys(const uint16_t* k, int64_t ld, int64_t T, int64_t Tp, int64_t D, uint16_t* dst) {
  for (int64_t t = 0; t < Tp; ++t)
    for (int64_t d = 0; d < D; ++d)
      dst[((t / 16 * (D / 2) + d / 2) * 16 + t % 16) * 2 + d % 2] = t < T ? k[t * ld + d] : 0;
}

// Rows [T, D] of one head -> their transpose [D, T] packed: [D/16][Tp/2][16][2], zero past T.
inline void pack_values_transposed(const uint16_t* v, int64_t ld, int64_t T, int64_t Tp, int64_t D,
                                   uint16_t* dst) {
  for (int64_t t = 0; t < Tp; ++t)
    for (int64_t d = 0; d < D; ++d)
      dst[((d / 16 * (Tp / 2) + t / 2) * 16 + d % 16) * 2 + t % 2] = t < T ? v[t * ld + d] : 0;
}

// y[i][b*16 ..] = x[i] . (packed block b) for `rows` rows of x and blocks [0, blocks).
inline void micro_rows(const uint16_t* w, int64_t block, int64_t K, const float* x, int64_t ldx,
                       int64_t rows, int64_t blocks, float* y, int64_t ldy) {
  alignas(32) float out[6 * 16];
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i0 = 0; i0 < rows; i0 += 6) {
      const int64_t r = std::min<int64_t>(6, rows - i0);
      const uint16_t* wb = w + b * block;
      const float* xi = x + i0 * ldx;
      switch (r) {
        case 1: linear_micro<1, 2>(wb, block, K / 2, xi, ldx, out); break;
        case 2: linear_micro<2, 2>(wb, block, K / 2, xi, ldx, out); break;
        case 3: linear_micro<3, 2>(wb, block, K / 2, xi, ldx, out); break;
        case 4: linear_micro<4, 2>(wb, block, K / 2, xi, ldx, out); break;
        case 5: linear_micro<5, 2>(wb, block, K / 2, xi, ldx, out); break;
        default: linear_micro<6, 2>(wb, block, K / 2, xi, ldx, out); break;
      }
      for (int64_t i = 0; i < r; ++i) std::copy(out + i * 16, out + i * 16 + 16, y + (i0 + i) * ldy + b * 16);
    }
}

inline void prefill_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, int64_t context_len, double scale) {
  constexpr int64_t kRows = 12;  // query rows per block: two 6-row micro-kernels
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2), T = k.size(0), Hkv = k.size(1);
  const int64_t G = H / Hkv, Tp = (T + 31) / 32 * 32;
  const auto* qp = q.data_ptr<at::BFloat16>();
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t ldq = q.stride(0), ldo = out.stride(0);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> keys(Tp * D), values(D * Tp);
    std::vector<float> qf(kRows * D), scores(kRows * Tp), o(kRows * D);
    for (int64_t h = begin; h < end; ++h) {
      pack_keys(kp + h * D, k.stride(0), T, Tp, D, keys.data());
      pack_values_transposed(vp + h * D, v.stride(0), T, Tp, D, values.data());
      for (int64_t qh = h * G; qh < (h + 1) * G; ++qh)
        for (int64_t i0 = 0; i0 < L; i0 += kRows) {
          const int64_t rows = std::min(kRows, L - i0);
          const int64_t seen = (context_len + i0 + rows + 31) / 32 * 32;  // keys, padded
          for (int64_t i = 0; i < rows; ++i) to_floats(qf.data() + i * D, qp + (i0 + i) * ldq + qh * D, D);
          micro_rows(keys.data(), D * 16, D, qf.data(), D, rows, seen / 16, scores.data(), Tp);
          for (int64_t i = 0; i < rows; ++i) {
            float* row = scores.data() + i * Tp;
            const int64_t valid = context_len + i0 + i + 1;
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < valid; ++t) mx = std::max(mx, row[t] *= fscale);
            const float inv = 1.f / exp_sum(row, valid, mx);
            for (int64_t t = 0; t < valid; ++t) row[t] *= inv;
            std::fill(row + valid, row + seen, 0.f);
          }
          micro_rows(values.data(), Tp * 16, seen, scores.data(), Tp, rows, D / 16, o.data(), D);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t d = 0; d < D; d += 8) store8(op + (i0 + i) * ldo + qh * D + d, _mm256_loadu_ps(o.data() + i * D + d));
        }
    }
  });
}

}  // namespace avx2
#endif
