// CPU kernels for the decode hot path, where the ATen/oneDNN defaults are weakest:
//
//  * paged_decode_attention: one query token per sequence attends to its context read
//    straight from the paged KV pool through its block table: no gather, no copy.
//    paged_verify_attention: the same for several query rows per sequence (a speculative
//    step's last token and drafts), causal among themselves.
//  * packed_bf16_linear / amx_linear: y = x W^T (+ b) for decode-sized batches over weights
//    packed once into the VNNI layout, streaming each weight from memory once per step for
//    all rows of x (AVX512-BF16 dot products, or AMX tiles where the CPU has them).
//    Decode is memory bound: the weights must be read once per step, at full bandwidth.
//
// Both parallelise with at::parallel_for over independent output tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif
#include "avx2.h"  // defines XLLM_AVX2 where the CPU has AVX2 and FMA
#include "elementwise.h"  // fused bf16 SiLU-mul, RMSNorm + RoPE (AVX-512F)

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
// 16 consecutive elements as floats.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// Dot product of a float row with a row of the cache.
template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    if (D % 32 == 0) {  // two accumulators: half the FMA dependency chain
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), load16(b + d + 16), a1);
      }
      return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16(b + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(XLLM_AVX2)
  if constexpr (avx2::vectorised<scalar_t>()) {
    if (D % 8 == 0) return avx2::dot(a, b, D);
  }
#endif
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * to_float(b[d]);
  return s;
}

#if defined(__AVX512BF16__)
// Dot product of two bf16 rows, 32 pairs per instruction, float accumulation.
inline float dot_bf16(const at::BFloat16* a, const at::BFloat16* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
  return _mm512_reduce_add_ps(acc);
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: a transposing tree of shuffles
// and adds (45 instructions where 16 horizontal sums take ~130, each a serial chain).
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // lanes: [a0+a2, b0+b2, a1+a3, b1+b3] per 128 bits
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // [v4i, v4i+1, v4i+2, v4i+3] partial sums per 128 bits
    const __m512d c = _mm512_castps_pd(t[2 * i]), d = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                  _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                  _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// out[s] = scale * q . k_s for the n <= 16 keys of one head starting at `k` (`stride` apart),
// all 16 dot products' sums reduced together. Keys past n are read (they lie in the same
// block) but their scores not stored.
inline void scores16_bf16(const at::BFloat16* q, const at::BFloat16* k, int64_t stride,
                          int64_t D, int64_t n, float scale, float* out) {
  __m512 acc[16];
  for (int s = 0; s < 16; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d);
    for (int s = 0; s < 16; ++s)
      acc[s] = _mm512_dpbf16_ps(acc[s], qv, (__m512bh)_mm512_loadu_si512(k + s * stride + d));
  }
  const __mmask16 keep = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  _mm512_mask_storeu_ps(out, keep, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
}
#endif
template <typename scalar_t>
inline void to_floats(float* dst, const scalar_t* src, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
    return;
  }
#elif defined(XLLM_AVX2)
  if constexpr (avx2::vectorised<scalar_t>()) return avx2::to_floats(dst, src, D);
#endif
  for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
}

// The next block's runs (`slots` of them, `run_bytes` each, `stride` bytes apart: the task's
// heads in each slot), prefetched into L2 in `parts` equal slices, slice `part` now: blocks
// sit at random places in the pool, so the hardware prefetchers lose the stream at every
// block boundary. Spread over the current block's work (one slice per step of it), the
// misses overlap the arithmetic; all at once into L1, they queued behind each other and
// evicted the block being read (1.5x slower at 16 rows x 576 tokens, one thread).
inline void prefetch_slice(const void* first_run, int64_t slots, int64_t run_bytes,
                           int64_t stride, int64_t part, int64_t parts) {
  if (first_run == nullptr) return;
  const int64_t lines_per_run = (run_bytes + 63) / 64, lines = slots * lines_per_run;
  const auto* base = static_cast<const char*>(first_run);
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l)
    __builtin_prefetch(base + l / lines_per_run * stride + l % lines_per_run * 64, 0, 2);
}

#if defined(__AVX512F__)
// out_a += sum_s pa[s] v_s and out_b += sum_s pb[s] v_s over n rows v_s of one KV head in
// one block (rows `stride` apart), NV * 16 wide, both accumulators held in registers: each
// row is loaded and converted once for two query heads.
template <int NV, typename scalar_t>
inline void weighted_block_x2(const float* pa, const float* pb, const scalar_t* v, int64_t stride,
                              int64_t n, float* out_a, float* out_b) {
  __m512 a[NV], b[NV];
  for (int i = 0; i < NV; ++i) {
    a[i] = _mm512_loadu_ps(out_a + 16 * i);
    b[i] = _mm512_loadu_ps(out_b + 16 * i);
  }
  for (int64_t s = 0; s < n; ++s, v += stride) {
    const __m512 wa = _mm512_set1_ps(pa[s]), wb = _mm512_set1_ps(pb[s]);
    for (int i = 0; i < NV; ++i) {
      const __m512 row = load16(v + 16 * i);
      a[i] = _mm512_fmadd_ps(wa, row, a[i]);
      b[i] = _mm512_fmadd_ps(wb, row, b[i]);
    }
  }
  for (int i = 0; i < NV; ++i) {
    _mm512_storeu_ps(out_a + 16 * i, a[i]);
    _mm512_storeu_ps(out_b + 16 * i, b[i]);
  }
}
#endif

// out[j] += sum_s p[j][s] v_s over the n rows of one block, for the G query heads j sharing
// one KV head (p rows `T` apart).
template <typename scalar_t>
void weighted_block(const float* p, int64_t T, int64_t G, const scalar_t* v, int64_t stride,
                    int64_t n, int64_t D, float* out) {
#if defined(__AVX512F__)
  if (D == 128 || D == 64) {
    auto run = D == 128 ? weighted_block_x2<8, scalar_t> : weighted_block_x2<4, scalar_t>;
    for (int64_t g = 0; g < G; g += 2) {
      // Odd G: the last head pairs with itself; both halves load the same sums, add the
      // same rows and store the same result, so its output is right.
      const int64_t g2 = std::min(g + 1, G - 1);
      run(p + g * T, p + g2 * T, v, stride, n, out + g * D, out + g2 * D);
    }
    return;
  }
#elif defined(XLLM_AVX2)
  if constexpr (avx2::vectorised<scalar_t>()) {
    if (D % 32 == 0) return avx2::weighted_block(p, T, G, v, stride, n, D, out);
  }
#endif
  for (int64_t s = 0; s < n; ++s, v += stride)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p[g * T + s] * to_float(v[d]);
}

// In place: x <- softmax(x), n elements.
inline void softmax_inplace(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  // exp(y) = 2^k * 2^f with k = round(y log2 e), |f| <= 1/2; 2^f by its Taylor series
  // to degree 7 (relative error < 2e-10, far below float precision).
  const __m512 log2e = _mm512_set1_ps(1.44269504f), vmx = _mm512_set1_ps(mx);
  const float c[8] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f,
                      0.00961812911f, 0.00133335581f, 0.000154035304f, 1.52527339e-05f};
  __m512 vsum = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    __m512 y = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(x + t), vmx), _mm512_set1_ps(-100.f));
    y = _mm512_mul_ps(y, log2e);
    const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, k);
    __m512 p = _mm512_set1_ps(c[7]);
    for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_storeu_ps(x + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#elif defined(XLLM_AVX2)
  sum = avx2::exp_sum(x, n, mx);
  t = n;
#endif
  for (; t < n; ++t) { x[t] = std::exp(x[t] - mx); sum += x[t]; }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// out[r, h, :] = softmax(q[r, h] . K[ctx(b, r)] * scale) V[ctx(b, r)] for the query rows r of
// each sequence b.
//
// Decode (`starts` null): one row per sequence, ctx(b, r) = its T = context_lens[b] slots.
// Verification (`starts` = query_starts, B + 1 row offsets): sequence b has the L rows
// [starts[b], starts[b + 1]), its last token and its drafts, already written to the pool as
// its last L slots; row r sees the first T - L + r + 1 slots (its context, then causally
// the rows before it). Each key is read once per task for all L rows.
//
// A task is one sequence and a run of KV heads [h0, h1). It walks the context block by
// block: a block's slots are contiguous in the pool ([block_size, Hkv, D] per block), so for
// each slot it reads the task's heads as one contiguous run, and each block as one stream,
// for all the query heads (of all its rows) sharing those KV heads. Sequences are split into
// head runs only when there are too few to keep every thread busy.
template <typename scalar_t>
void paged_attention_impl(
    at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& context_lens, const int64_t* starts,
    int64_t block_size, double scale) {
  const int64_t B = context_lens.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1);
  const int64_t G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const auto* qp = q.data_ptr<scalar_t>();
  const auto* kp = k_cache.data_ptr<scalar_t>();
  const auto* vp = v_cache.data_ptr<scalar_t>();
  auto* op = out.data_ptr<scalar_t>();
  const auto* tables = block_tables.data_ptr<int64_t>();
  const auto* lens = context_lens.data_ptr<int64_t>();
  const int64_t slot_stride = Hkv * D;  // elements between consecutive slots
  // q . k * scale: bf16 pairs straight into AVX512-BF16 dot products where possible.
  auto score = [&](const scalar_t* q_raw, const float* q_scaled, const scalar_t* k) -> float {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (D % 32 == 0) return dot_bf16(q_raw, k, D) * static_cast<float>(scale);
    }
#endif
    return dot(q_scaled, k, D);
  };

  int64_t splits = 1;
  while (B * splits < 2 * at::get_num_threads() && splits * 2 <= Hkv && Hkv % (splits * 2) == 0)
    splits *= 2;
  const int64_t heads_per_task = Hkv / splits;
  const int64_t run_bytes = heads_per_task * D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t slot_bytes = slot_stride * static_cast<int64_t>(sizeof(scalar_t));

  at::parallel_for(0, B * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, scores;
    std::vector<scalar_t> qb;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits;
      const int64_t h0 = (task % splits) * heads_per_task;
      const int64_t q0 = h0 * G, nq = heads_per_task * G;  // query heads of this task
      const int64_t r0 = starts ? starts[b] : b, L = starts ? starts[b + 1] - r0 : 1;
      const int64_t T = lens[b], num_blocks = (T + block_size - 1) / block_size;
      const int64_t nj = L * nq;  // query vectors of the task: row-major over (row, head)
      scores.resize(nj * T);
      qf.resize(nj * D);
      qb.resize(nj * D);
      acc.assign(nj * D, 0.f);
      for (int64_t r = 0; r < L; ++r)
        for (int64_t i = 0; i < nq * D; ++i) {
          const scalar_t v = qp[((r0 + r) * H + q0) * D + i];
          qf[r * nq * D + i] = to_float(v) * static_cast<float>(scale);
          qb[r * nq * D + i] = v;
        }
      const int64_t* table = tables + b * max_blocks;
      // The task's first head in slot s of block i of this sequence, in `cache`.
      auto run_of = [&](const scalar_t* cache, int64_t i, int64_t s) -> const scalar_t* {
        if (i >= num_blocks) return nullptr;
        return cache + (table[i] * block_size + s) * slot_stride + h0 * D;
      };
      auto slots_in = [&](int64_t i) {  // slots of block i holding context
        return std::max<int64_t>(0, std::min(block_size, T - i * block_size));
      };
#if defined(__AVX512BF16__)
      // bf16: 16 keys of a head at a time, their sums reduced together (blocks of whole
      // groups of 16 slots, so a group never leaves its block).
      constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
      if (bf16 && D % 32 == 0 && block_size % 16 == 0) {
        for (int64_t i = 0; i < num_blocks; ++i) {
          const int64_t t0 = i * block_size, n = std::min(block_size, T - t0);
          const int64_t steps = (n + 15) / 16 * nj;  // prefetch slices: one per scores16 call
          for (int64_t s = 0; s < n; s += 16) {
            const scalar_t* k = run_of(kp, i, s);
            for (int64_t j = 0; j < nj; ++j) {
              prefetch_slice(run_of(kp, i + 1, 0), slots_in(i + 1), run_bytes, slot_bytes,
                             s / 16 * nj + j, steps);
              scores16_bf16(reinterpret_cast<const at::BFloat16*>(qb.data() + j * D),
                            reinterpret_cast<const at::BFloat16*>(k + j % nq / G * D),
                            slot_stride, D, n - s, static_cast<float>(scale),
                            scores.data() + j * T + t0 + s);
            }
          }
        }
      } else
#endif
      for (int64_t i = 0; i < num_blocks; ++i) {
        const int64_t t0 = i * block_size, n = std::min(block_size, T - t0);
        for (int64_t s = 0; s < n; ++s) {
          prefetch_slice(run_of(kp, i + 1, 0), slots_in(i + 1), run_bytes, slot_bytes, s, n);
          const scalar_t* k = run_of(kp, i, s);
          for (int64_t j = 0; j < nj; ++j)
            scores[j * T + t0 + s] = score(qb.data() + j * D, qf.data() + j * D, k + j % nq / G * D);
        }
      }
      for (int64_t j = 0; j < nj; ++j) {
        const int64_t seen = T - L + j / nq + 1;  // the row's causal limit (T when L = 1)
        softmax_inplace(scores.data() + j * T, seen);
        std::fill(scores.begin() + j * T + seen, scores.begin() + (j + 1) * T, 0.f);
      }
      for (int64_t i = 0; i < num_blocks; ++i) {
        const int64_t t0 = i * block_size, n = std::min(block_size, T - t0);
        for (int64_t r = 0; r < L; ++r)
          for (int64_t h = 0; h < heads_per_task; ++h) {
            prefetch_slice(run_of(vp, i + 1, 0), slots_in(i + 1), run_bytes, slot_bytes,
                           r * heads_per_task + h, L * heads_per_task);
            weighted_block(scores.data() + (r * nq + h * G) * T + t0, T, G,
                           run_of(vp, i, 0) + h * D, slot_stride, n, D,
                           acc.data() + (r * nq + h * G) * D);
          }
      }
      for (int64_t r = 0; r < L; ++r)
        for (int64_t i = 0; i < nq * D; ++i)
          op[((r0 + r) * H + q0) * D + i] = static_cast<scalar_t>(acc[r * nq * D + i]);
    }
  });
}

void check_paged_attention_args(const at::Tensor& out, const at::Tensor& q,
                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [N, H, D]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "out must be like q");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.stride(2) == 1 && k_cache.stride(1) == k_cache.size(2)
                  && k_cache.stride(0) == k_cache.size(1) * k_cache.size(2),
              "k_cache must be a contiguous [slots, Hkv, D] view");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "v_cache must be laid out like k_cache");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(block_tables.size(0) == context_lens.size(0), "one block table per sequence");
}

void run_paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const int64_t* starts,
                         int64_t block_size, double scale) {
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    paged_attention_impl<scalar_t>(out, q, k_cache, v_cache, block_tables.contiguous(),
                                   context_lens.contiguous(), starts, block_size, scale);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "paged attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

void paged_decode_attention(
    at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
    at::Tensor context_lens, int64_t block_size, double scale) {
  check_paged_attention_args(out, q, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(q.size(0) == context_lens.size(0), "one query row per sequence");
  run_paged_attention(out, q, k_cache, v_cache, block_tables, context_lens, nullptr, block_size,
                      scale);
}

// Speculative verification: several query rows per sequence (see paged_attention_impl).
void paged_verify_attention(
    at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
    at::Tensor context_lens, at::Tensor query_starts, int64_t block_size, double scale) {
  check_paged_attention_args(out, q, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(query_starts.scalar_type() == at::kLong && query_starts.dim() == 1
                  && query_starts.size(0) == context_lens.size(0) + 1,
              "query_starts must be int64 [B + 1]");
  const auto starts = query_starts.contiguous();
  const auto* sp = starts.data_ptr<int64_t>();
  const auto* lp = context_lens.contiguous().data_ptr<int64_t>();
  TORCH_CHECK(sp[0] == 0 && sp[context_lens.size(0)] == q.size(0), "query_starts must span q");
  for (int64_t b = 0; b < context_lens.size(0); ++b)
    TORCH_CHECK(sp[b + 1] > sp[b] && sp[b + 1] - sp[b] <= lp[b],
                "each sequence needs 1 to context_len query rows");
  run_paged_attention(out, q, k_cache, v_cache, block_tables, context_lens, sp, block_size, scale);
}

// y = x / sqrt(mean(x^2) + eps) * w over the last dimension, in float32, rounded once.
// ATen's composite rms_norm costs ~10 small ops per call; decode calls it ~4x per layer.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "weight must match the last dimension");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight dtypes differ");
  x = x.contiguous();
  weight = weight.contiguous();
  auto y = at::empty_like(x);
  const int64_t N = x.size(-1), rows = x.numel() / N;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // Chunks of at least ~64K elements: smaller parallel regions cost more than they save.
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / N), [&](int64_t begin, int64_t end) {
      std::vector<float> row(N), w(N);
      to_floats(w.data(), wp, N);
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (N % 16 == 0) {
          const auto* x16 = reinterpret_cast<const uint16_t*>(xp);
          auto* y16 = reinterpret_cast<uint16_t*>(yp);
          for (int64_t r = begin; r < end; ++r)
            elementwise::rms_norm_row(x16 + r * N, w.data(), N, static_cast<float>(eps), y16 + r * N);
          return;
        }
      }
#endif
#if defined(XLLM_AVX2) && !defined(__AVX512F__)
      if constexpr (avx2::vectorised<scalar_t>()) {
        if (N % 8 == 0) {
          for (int64_t r = begin; r < end; ++r)
            avx2::rms_norm_row(xp + r * N, w.data(), N, static_cast<float>(eps), yp + r * N);
          return;
        }
      }
#endif
      for (int64_t r = begin; r < end; ++r) {
        to_floats(row.data(), xp + r * N, N);
        float ss = 0.f;
        for (int64_t i = 0; i < N; ++i) ss += row[i] * row[i];
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + static_cast<float>(eps));
        for (int64_t i = 0; i < N; ++i) yp[r * N + i] = static_cast<scalar_t>(row[i] * inv * w[i]);
      }
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
  return y;
}

#if defined(__AVX512F__)
// Rows at least ~64K elements a chunk: smaller parallel regions cost more than they save.
static int64_t rows_grain(int64_t row_elems) { return std::max<int64_t>(1, 65536 / row_elems); }
#endif

// x [N, 2I] (gate | up, rows may be strided) -> F.silu(gate) * up [N, I], bf16.
at::Tensor silu_mul(at::Tensor x) {
#if defined(__AVX512F__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "silu_mul takes bf16 [N, 2I] with contiguous rows");
  const int64_t N = x.size(0), I = x.size(1) / 2;
  TORCH_CHECK(x.size(1) == 2 * I && I % 16 == 0, "silu_mul needs I % 16 == 0");
  auto y = at::empty({N, I}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, N, rows_grain(I), [&](int64_t begin, int64_t end) {
    elementwise::silu_mul_rows(xp, ldx, yp, I, begin, end);
  });
  return y;
#else
  TORCH_CHECK(false, "silu_mul needs AVX-512F");
#endif
}

// x [N, H, D] (heads contiguous, rows may be strided) -> rope(rms_norm(x) * weight) per head,
// contiguous [N, H, D], bf16; no norm when weight is absent. cos/sin [N, 1, D] or [N, D].
at::Tensor norm_rope(at::Tensor x, c10::optional<at::Tensor> weight, double eps, at::Tensor cos,
                     at::Tensor sin) {
#if defined(__AVX512F__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16, "norm_rope takes bf16 tensors");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "norm_rope takes [N, H, D] with contiguous heads");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 32 == 0, "norm_rope needs D % 32 == 0");
  cos = cos.reshape({N, D}).contiguous();
  sin = sin.reshape({N, D}).contiguous();
  std::vector<float> w;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == D && weight->scalar_type() == at::kBFloat16, "weight must be bf16 [D]");
    const auto wc = weight->contiguous();
    w.resize(D);
    to_floats(w.data(), wc.data_ptr<at::BFloat16>(), D);
  }
  auto out = at::empty({N, H, D}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr<at::BFloat16>());
  const auto* sp = reinterpret_cast<const uint16_t*>(sin.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t ldx = x.stride(0);
  const float* wp = w.empty() ? nullptr : w.data();
  at::parallel_for(0, N, rows_grain(H * D), [&](int64_t begin, int64_t end) {
    std::vector<float> xn(D);
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < H; ++h)
        elementwise::norm_rope_head(xp + r * ldx + h * D, wp, static_cast<float>(eps), cp + r * D,
                                    sp + r * D, D, xn.data(), op + (r * H + h) * D);
  });
  return out;
#else
  TORCH_CHECK(false, "norm_rope needs AVX-512F");
#endif
}

// silu_mul and norm_rope are compiled for this CPU.
bool has_fused_elementwise() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool has_bf16_linear() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// packed_bf16_linear runs the AVX2 + FMA kernel (avx2.h): N padded to 16 and K to 2 in the
// packed weight, any row count.
bool has_avx2_linear() {
#if !defined(__AVX512BF16__) && defined(XLLM_AVX2)
  return true;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------
// AVX512-BF16 linear over pre-packed weights.
//
// The packed layout (see amx_linear below) stores, for each block of 16 output columns and
// each pair of input features, the 16 columns' pairs side by side: one 64-byte vector. So
// a dot-product instruction multiplies 16 columns at once by one broadcast pair of x, and
// accumulates into a vector of 16 outputs: no horizontal sums, and each block of a weight
// is one contiguous stream the prefetchers follow. A micro-kernel keeps MR rows x NB
// column blocks of outputs in registers, loading NB weight vectors per pair for MR rows.
// ---------------------------------------------------------------------------------------
#if defined(__AVX512BF16__)
namespace {

// out[i][j*16 + c] = sum_k x[i][k] W[k][col c of block j], for `rows` <= MR rows of x (rows
// `ldx` apart) and NB packed column blocks (`block` elements apart), over the first K
// input features (K even).
template <int MR, int NB>
inline void packed_micro(const uint16_t* w, int64_t block, int64_t K, const uint16_t* x,
                         int64_t ldx, int64_t rows, float* out) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const auto* x32 = reinterpret_cast<const uint32_t*>(x);  // pairs of x, as one 32-bit word
  for (int64_t p = 0; p < K / 2; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j)
      wv[j] = (__m512bh)_mm512_loadu_si512(w + j * block + p * 32);
    for (int i = 0; i < MR && i < rows; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x32[i * (ldx / 2) + p]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
    }
  }
  for (int i = 0; i < MR && i < rows; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + (i * NB + j) * 16, acc[i][j]);
}

// y[:, cols of blocks nb0 .. nb0+NB) for every row of x, MR rows at a time.
template <int MR, int NB>
inline void packed_columns(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K,
                           int64_t N, int64_t nb0, const at::BFloat16* bias, at::BFloat16* y) {
  alignas(64) float out[MR * NB * 16];
  for (int64_t m = 0; m < M; m += MR) {
    const int64_t rows = std::min<int64_t>(MR, M - m);
    packed_micro<MR, NB>(w + nb0 * K * 16, K * 16, K, x + m * K, K, rows, out);
    for (int64_t i = 0; i < rows; ++i)
      for (int j = 0; j < NB; ++j) {
        const int64_t col = (nb0 + j) * 16;
        __m512 v = _mm512_load_ps(out + (i * NB + j) * 16);
        if (bias) v = _mm512_add_ps(v, load16(bias + col));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m + i) * N + col),
                            (__m256i)_mm512_cvtneps_pbh(v));
      }
  }
}

// Few rows are memory bound: many column streams per row. More rows are compute bound:
// many rows per weight vector loaded (12 x 2 accumulators fill the 32 vector registers).
template <int MR, int NB>
void packed_linear_impl(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t N,
                        const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t blocks = N / 16, groups = blocks / NB;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      packed_columns<MR, NB>(w, x, M, K, N, g * NB, bias, y);
  });
  for (int64_t nb = groups * NB; nb < blocks; ++nb)  // N not a multiple of 16 * NB
    packed_columns<MR, 1>(w, x, M, K, N, nb, bias, y);
}

}  // namespace
#endif

at::Tensor packed_bf16_linear(at::Tensor x, at::Tensor packed, int64_t N,
                              c10::optional<at::Tensor> bias) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "packed_bf16_linear takes bfloat16 tensors");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0 && packed.numel() == N * K, "packed weight shape mismatch");
  auto y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::Tensor b;
  const at::BFloat16* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->contiguous(); bp = b.data_ptr<at::BFloat16>(); }
  auto* yp = y.data_ptr<at::BFloat16>();
  if (M <= 2) packed_linear_impl<2, 8>(wp, xp, M, K, N, bp, yp);
  else packed_linear_impl<12, 2>(wp, xp, M, K, N, bp, yp);
  return y;
#elif defined(XLLM_AVX2)
  return avx2::packed_linear(x, packed, N, bias);
#else
  TORCH_CHECK(false, "packed_bf16_linear needs a CPU with AVX512-BF16 or AVX2 + FMA");
#endif
}

// ---------------------------------------------------------------------------------------
// Prefill attention (bf16, AVX512-BF16): the L query rows of one chunk against its T keys
// (the T - L cached before it, then its own), causal. Per KV head, the keys are packed once
// into the linear's layout (16 keys per vector), and the values transposed into it, so
// q.K^T and P.V are both the packed micro-kernel: 12 query rows at a time, scores in
// float32, softmax in float32, P rounded to bf16 for P.V (as torch's flash kernel does).
// Each block of query rows reads only the keys its last row may see.
// ---------------------------------------------------------------------------------------
#if defined(__AVX512BF16__)
namespace {

constexpr int64_t kQueryRows = 12;

// Rows [T, D] of one head (rows `ld` apart) -> [Tp/16][D/2][16][2], zero past T: pairs of
// features moved as one 32-bit word.
void pack_keys(const uint16_t* k, int64_t ld, int64_t T, int64_t Tp, int64_t D, uint16_t* dst) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  const int64_t pairs = D / 2;
  for (int64_t t = 0; t < Tp; ++t) {
    uint32_t* col = out + t / 16 * pairs * 16 + t % 16;
    if (t >= T) {
      for (int64_t d2 = 0; d2 < pairs; ++d2) col[d2 * 16] = 0;
      continue;
    }
    const auto* row = reinterpret_cast<const uint32_t*>(k + t * ld);
    for (int64_t d2 = 0; d2 < pairs; ++d2) col[d2 * 16] = row[d2];
  }
}

// Rows [T, D] of one head -> their transpose [D, T] packed: [D/16][Tp/2][16][2], zero past T.
void pack_values_transposed(const uint16_t* v, int64_t ld, int64_t T, int64_t Tp, int64_t D,
                            uint16_t* dst) {
  std::vector<uint16_t> zeros(D, 0);
  for (int64_t t = 0; t < Tp; t += 2) {
    const uint16_t* v0 = t < T ? v + t * ld : zeros.data();
    const uint16_t* v1 = t + 1 < T ? v + (t + 1) * ld : zeros.data();
    elementwise::pack_value_pair(v0, v1, D / 16, Tp * 16, dst + t * 16);
  }
}

// y[i][cols] for `rows` rows of x over packed blocks [0, blocks) (blocks even), in float.
void micro_rows(const uint16_t* w, int64_t block, int64_t K, const uint16_t* x, int64_t ldx,
                int64_t rows, int64_t blocks, float* y, int64_t ldy) {
  alignas(64) float out[kQueryRows * 2 * 16];
  for (int64_t b = 0; b < blocks; b += 2) {
    packed_micro<kQueryRows, 2>(w + b * block, block, K, x, ldx, rows, out);
    for (int64_t i = 0; i < rows; ++i)
      std::copy(out + i * 32, out + i * 32 + 32, y + i * ldy + b * 16);
  }
}

}  // namespace
#endif

void prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v,
                       int64_t context_len, double scale) {
#if defined(__AVX512BF16__) || defined(XLLM_AVX2)
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "prefill_attention takes bfloat16 tensors");
  for (const auto& t : {out, q, k, v})
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) % 2 == 0,
                "prefill_attention takes [rows, heads, D] tensors with contiguous heads");
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2), T = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(T == context_len + L && v.size(0) == T && out.sizes() == q.sizes(), "shape mismatch");
  TORCH_CHECK(D % 32 == 0 && H % Hkv == 0, "head dim must be a multiple of 32");
#endif
#if defined(__AVX512BF16__)
  const int64_t G = H / Hkv, Tp = (T + 31) / 32 * 32;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t ldq = q.stride(0), ldo = out.stride(0);
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> keys(Tp * D), values(D * Tp), probs(kQueryRows * Tp);
    std::vector<float> scores(kQueryRows * Tp), o(kQueryRows * D);
    for (int64_t h = begin; h < end; ++h) {
      pack_keys(kp + h * D, k.stride(0), T, Tp, D, keys.data());
      pack_values_transposed(vp + h * D, v.stride(0), T, Tp, D, values.data());
      for (int64_t qh = h * G; qh < (h + 1) * G; ++qh)
        for (int64_t i0 = 0; i0 < L; i0 += kQueryRows) {
          const int64_t rows = std::min(kQueryRows, L - i0);
          const int64_t seen = (context_len + i0 + rows + 31) / 32 * 32;  // keys, padded
          const uint16_t* qrows = qp + i0 * ldq + qh * D;
          micro_rows(keys.data(), D * 16, D, qrows, ldq, rows, seen / 16, scores.data(), Tp);
          for (int64_t i = 0; i < rows; ++i)
            elementwise::softmax_to_bf16(scores.data() + i * Tp, context_len + i0 + i + 1, seen,
                                         fscale, probs.data() + i * Tp);
          micro_rows(values.data(), Tp * 16, seen, probs.data(), Tp, rows, D / 16, o.data(), D);
          auto* o16 = reinterpret_cast<uint16_t*>(op);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t d = 0; d < D; d += 16)
              elementwise::narrow(o16 + (i0 + i) * ldo + qh * D + d, _mm512_loadu_ps(o.data() + i * D + d));
        }
    }
  });
#elif defined(XLLM_AVX2)
  avx2::prefill_attention(out, q, k, v, context_len, scale);
#else
  TORCH_CHECK(false, "prefill_attention needs a CPU with AVX512-BF16 or AVX2 + FMA");
#endif
}

// ---------------------------------------------------------------------------------------
// AMX bf16 linear over pre-packed weights.
//
// W [N, K] is packed once into 1 KiB tiles, [N/16][K/32][16 k-pairs][16 columns][2], the
// VNNI layout the tile unit multiplies directly (the same bytes as packed_bf16_linear's
// [N/16][K/2][16][2]); then y = x W^T streams each weight tile from memory once per step and
// multiplies it with up to two 16-row blocks of x at a time.
// ---------------------------------------------------------------------------------------
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

namespace {

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  // Linux hands out AMX state only to processes that ask (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);  // tiles 0,1: C fp32 16x16; 2,3: A bf16 16x32; 4: B 16 pairs x 16
}

}  // namespace

at::Tensor amx_linear(at::Tensor x, at::Tensor packed, int64_t N, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(amx_permitted(), "the kernel refused AMX state to this process");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bf16 only");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0 && packed.numel() == N * K, "packed weight shape mismatch");
  const int64_t Mp = (M + 15) / 16 * 16;
  at::Tensor xp = x.contiguous();
  if (Mp != M) xp = at::constant_pad_nd(xp, {0, 0, 0, Mp - M});  // whole 16-row A tiles
  auto y = at::empty({M, N}, x.options());
  const auto* a = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::Tensor b;
  const at::BFloat16* bp = nullptr;
  if (bias.has_value() && bias->defined()) { b = bias->contiguous(); bp = b.data_ptr<at::BFloat16>(); }
  auto* yp = y.data_ptr<at::BFloat16>();
  const int64_t KB = K / 32, NB = N / 16, lda = K * 2;

  at::parallel_for(0, NB, 4, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float c[2][16][16];
    auto emit = [&](int which, int64_t m0, int64_t nb) {
      const __m512 bv = bp ? load16(bp + nb * 16) : _mm512_setzero_ps();
      for (int64_t i = 0; i < 16 && m0 + i < M; ++i) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(c[which][i]), bv);
        // Round to nearest even, as at::BFloat16(float) does.
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (m0 + i) * N + nb * 16),
                            (__m256i)_mm512_cvtneps_pbh(v));
      }
    };
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint16_t* wt = w + nb * KB * 512;
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const bool two = m0 + 16 < Mp;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t kb = 0; kb < KB; ++kb) {
          _tile_loadd(4, wt + kb * 512, 64);
          _tile_loadd(2, a + m0 * K + kb * 32, lda);
          _tile_dpbf16ps(0, 2, 4);
          if (two) {
            _tile_loadd(3, a + (m0 + 16) * K + kb * 32, lda);
            _tile_dpbf16ps(1, 3, 4);
          }
        }
        _tile_stored(0, c[0], 64);
        emit(0, m0, nb);
        if (two) { _tile_stored(1, c[1], 64); emit(1, m0 + 16, nb); }
      }
    }
    _tile_release();
  });
  return y;
}

bool has_amx() { return amx_permitted(); }
#else
at::Tensor amx_linear(at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>) {
  TORCH_CHECK(false, "amx_linear needs a CPU with AMX-BF16");
}
bool has_amx() { return false; }
#endif

void register_decode_stack(pybind11::module& m);  // decode_stack.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels run without the GIL: with --async-scheduling the engine thread builds the
  // next step while they run (held, it waited for each call to return).
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  register_decode_stack(m);
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV pool",
        nogil);
  m.def("paged_verify_attention", &paged_verify_attention, "multi-token (speculative verification) attention over the paged KV pool",
        nogil);
  m.def("packed_bf16_linear", &packed_bf16_linear, "bfloat16 linear over packed weights (AVX512-BF16 or AVX2)",
        nogil);
  m.def("prefill_attention", &prefill_attention, "causal bfloat16 attention of a prefill chunk",
        nogil);
  m.def("amx_linear", &amx_linear, "bfloat16 linear over AMX-packed weights",
        nogil);
  m.def("has_amx", &has_amx, "AMX-BF16 compiled in and permitted");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension",
        nogil);
  m.def("has_bf16_linear", &has_bf16_linear, "was packed_bf16_linear compiled for this CPU");
  m.def("silu_mul", &silu_mul, "F.silu(gate) * up over x = gate | up, bfloat16, one pass",
        nogil);
  m.def("norm_rope", &norm_rope, "per-head RMSNorm (optional) then RoPE, bfloat16, one pass",
        nogil);
  m.def("has_fused_elementwise", &has_fused_elementwise, "silu_mul and norm_rope compiled in");
  m.def("has_avx2_linear", &has_avx2_linear, "packed_bf16_linear is the AVX2 + FMA kernel");
}
