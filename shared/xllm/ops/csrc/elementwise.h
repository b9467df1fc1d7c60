// Fused bf16 elementwise passes (AVX-512F), each one read and one write of its tensors where
// ATen makes several: SiLU(gate) * up, Qwen3's per-head RMSNorm followed by RoPE, and
// RMSNorm (after the residual add, for graph mode's decode_stack.cpp).
//
// Each kernel rounds to bf16 where the torch ops it replaces round (after silu, after each
// product of RoPE, ...), so its result equals theirs to the bit, but for the few values
// whose exp lands within a float ulp of a bf16 rounding tie, and for RMSNorm's sum of
// squares, which is added in vector order here.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cmath>
#include <limits>

namespace elementwise {

// 16 bf16 -> 16 floats, and back with round-to-nearest-even (at::BFloat16's rounding; NaN
// payloads aside).
inline __m512 widen(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512i rounded_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
}
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(rounded_bits(v), _mm512_set1_epi32(0xFFFF0000)));
}
inline void narrow(uint16_t* p, __m512 v) {
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded_bits(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

// exp(y) = 2^k * 2^f, k = round(y log2 e), |f| <= 1/2, 2^f by its degree-7 Taylor series.
inline __m512 exp16(__m512 y) {
  const float c[8] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f,
                      0.00961812911f, 0.00133335581f, 0.000154035304f, 1.52527339e-05f};
  y = _mm512_mul_ps(_mm512_max_ps(y, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f));
  const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, k);
  __m512 p = _mm512_set1_ps(c[7]);
  for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, k);  // overflows to +inf past exp(88.7), as expf does
}

// y[i] = bf16(bf16(silu(g[i])) * u[i]) for i < len (len % 16 == 0): F.silu(gate) * up.
inline void silu_mul_span(const uint16_t* g, const uint16_t* u, int64_t len, uint16_t* y) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < len; i += 16) {
    const __m512 gv = widen(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
    narrow(y + i, _mm512_mul_ps(s, widen(u + i)));
  }
}

// Rows [r0, r1) of y [N, I] = F.silu(gate) * up for x = gate | up (rows ldx apart).
inline void silu_mul_rows(const uint16_t* x, int64_t ldx, uint16_t* y, int64_t I, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) silu_mul_span(x + r * ldx, x + r * ldx + I, I, y + r * I);
}

// One head of D (D % 32 == 0): out = rope(rms_norm(x) * w) with the rounding of
// `apply_rotary(RMSNorm(x))`: the norm rounded once, then x*cos and rotate(x)*sin each
// rounded, then their sum. No norm when w is null. `xn` is D floats of scratch.
inline void norm_rope_head(const uint16_t* x, const float* w, float eps, const uint16_t* cos,
                           const uint16_t* sin, int64_t D, float* xn, uint16_t* out) {
  if (w != nullptr) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = widen(x + d);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(xn + d, round_bf16(_mm512_mul_ps(_mm512_mul_ps(widen(x + d), vinv),
                                                        _mm512_loadu_ps(w + d))));
  } else {
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(xn + d, widen(x + d));
  }
  const int64_t half = D / 2;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x80000000));
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 rot = d < half ? _mm512_xor_ps(_mm512_loadu_ps(xn + d + half), sign)
                                : _mm512_loadu_ps(xn + d - half);
    const __m512 a = round_bf16(_mm512_mul_ps(_mm512_loadu_ps(xn + d), widen(cos + d)));
    const __m512 b = round_bf16(_mm512_mul_ps(rot, widen(sin + d)));
    narrow(out + d, _mm512_add_ps(a, b));
  }
}

// y = x / sqrt(mean(x^2) + eps) * w for one row of N (N % 16 == 0), rounded once.
inline void rms_norm_row(const uint16_t* x, const float* w, int64_t N, float eps, uint16_t* y) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= N; i += 32) {
    const __m512 a = widen(x + i), b = widen(x + i + 16);
    s0 = _mm512_fmadd_ps(a, a, s0);
    s1 = _mm512_fmadd_ps(b, b, s1);
  }
  for (; i < N; i += 16) {
    const __m512 a = widen(x + i);
    s0 = _mm512_fmadd_ps(a, a, s0);
  }
  const float ss = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(ss / static_cast<float>(N) + eps));
  for (i = 0; i < N; i += 16)
    narrow(y + i, _mm512_mul_ps(_mm512_mul_ps(widen(x + i), inv), _mm512_loadu_ps(w + i)));
}

// x <- bf16(x + y), then y_norm = rms_norm_row(x): a decoder layer's residual add and the
// next norm in one pass over the row (eager: `x = x + y`, then the norm reads x again).
inline void add_rms_norm_row(uint16_t* x, const uint16_t* y, const float* w, int64_t N, float eps,
                             uint16_t* y_norm) {
  for (int64_t i = 0; i < N; i += 16) narrow(x + i, _mm512_add_ps(widen(x + i), widen(y + i)));
  rms_norm_row(x, w, N, eps, y_norm);
}

// p[t] = bf16(softmax(x * scale)[t]) for t < valid, 0 for valid <= t < padded (a multiple
// of 16); x is overwritten with the exponentials.
inline void softmax_to_bf16(float* x, int64_t valid, int64_t padded, float scale, uint16_t* p) {
  auto mask = [&](int64_t t) -> __mmask16 {
    return valid - t >= 16 ? 0xFFFF : t >= valid ? 0 : static_cast<__mmask16>((1u << (valid - t)) - 1);
  };
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  for (int64_t t = 0; t < valid; t += 16)
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, mask(t), x + t));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), vscale = _mm512_set1_ps(scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < valid; t += 16) {
    const __mmask16 m = mask(t);
    const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + t), mx), vscale));
    const __m512 em = _mm512_maskz_mov_ps(m, e);
    _mm512_storeu_ps(x + t, em);
    vsum = _mm512_add_ps(vsum, em);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  for (int64_t t = 0; t < padded; t += 16) {
    const __m512 e = t < valid ? _mm512_loadu_ps(x + t) : _mm512_setzero_ps();  // 0 past valid
    narrow(p + t, _mm512_mul_ps(e, inv));
  }
}

// Rows t and t + 1 of one head (16 * nd wide, rows `ld` apart) -> their 16 x 2 VNNI pairs in
// each of nd column blocks (`block` elements apart): the transposed value layout.
inline void pack_value_pair(const uint16_t* v0, const uint16_t* v1, int64_t nd, int64_t block,
                            uint16_t* dst) {
  for (int64_t b = 0; b < nd; ++b) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + 16 * b)));
    const __m512i c = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + 16 * b)));
    _mm512_storeu_si512(dst + b * block, _mm512_or_si512(a, _mm512_slli_epi32(c, 16)));
  }
}

}  // namespace elementwise
#endif
