// Graph mode on CPU: a decode-only step of a Llama-family model (Llama, Qwen2, Qwen3) as ONE
// native call, over weights and KV pool views bound once at start-up (the CPU's "captured
// graph", engine/graph_runner.py).
//
// The eager step is ~40 ATen ops and ~12 nn.Module calls per decoder layer, each paying
// Python and dispatcher overhead that, at batch 1, adds several ms to a step whose big
// linears take ~35 ms. Here the same ops run in the same order, with the same kernels as
// eager (our native linears, RMSNorm and paged attention, and in bf16 eager's fused passes
// of elementwise.h: q/k norm + RoPE, SiLU x up; ATen elsewhere), so the result is bit-for-bit
// the eager one, at any batch size and dtype, with no Python in between. What eager cannot
// fuse across its modules is fused here, rounding where eager rounds: RoPE writes k straight
// into the KV pool (no index_copy_), and each residual add is one pass with the norm after it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "elementwise.h"

// From cpu_kernels.cpp.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor packed_bf16_linear(at::Tensor x, at::Tensor packed, int64_t N,
                              c10::optional<at::Tensor> bias);
at::Tensor amx_linear(at::Tensor x, at::Tensor packed, int64_t N, c10::optional<at::Tensor> bias);
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, int64_t block_size,
                            double scale);

namespace {

// Which native linear xllm.ops.fast_linear would pick (0: none, ATen's linear).
enum NativeLinear : int64_t { kAtenLinear = 0, kPackedBf16 = 1, kAmx = 2 };

struct Linear {
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  c10::optional<at::Tensor> packed;  // the VNNI-packed weight, when a native linear applies
};

// A norm's weight, and as floats for the fused passes (which take it so; eager converts it
// per call, exactly).
struct Norm {
  at::Tensor weight, floats;
};

Norm norm_of(const at::Tensor& weight) { return Norm{weight, weight.to(at::kFloat).contiguous()}; }

struct Layer {
  Norm input_norm, post_norm;
  c10::optional<Norm> q_norm, k_norm;  // Qwen3's per-head norms
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;  // this layer's [slots, Hkv, D] pool views
};

// Rows per chunk of a row-wise pass: at least ~64K elements (eager's grain; smaller parallel
// regions cost more than they save).
int64_t rows_grain(int64_t row_elems) { return std::max<int64_t>(1, 65536 / row_elems); }

// Elementwise passes split finer than eager's rows (16 rows of SiLU x up are one 49K-element
// chunk there, so one thread): units of `unit_elems` elements, >= 16K of them a chunk.
constexpr int64_t kUnitElems = 256;
int64_t units_grain(int64_t unit_elems) { return std::max<int64_t>(1, 16384 / unit_elems); }

// The fused bf16 passes xllm.ops applies in eager mode, by its rules (fast_rms_norm's
// vector row, fast_norm_rotary, fast_silu_mul): the stack must run exactly eager's kernels.
bool fused_passes_compiled() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// Rotate-half RoPE of one head's `d` values, rounded as eager's x * cos + cat(-x2, x1) * sin
// rounds (models/layers.apply_rotary): each product to scalar_t, then their sum.
template <typename scalar_t>
inline void rotate_head(const scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t d,
                        scalar_t* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float r = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    float a = static_cast<float>(static_cast<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(cos[i])));
    float b = static_cast<float>(static_cast<scalar_t>(r * static_cast<float>(sin[i])));
    asm volatile("" : "+x"(a), "+x"(b));  // no fused multiply-add: eager multiplies, then adds
    out[i] = static_cast<scalar_t>(a + b);
  }
}

// Every head of rows [N, heads, d] (`x` with row stride `ld`, heads d apart) rotated by its
// row's position, into dst (row r's head h at dst_row(r) + h * d).
template <typename scalar_t, typename Dst>
void rotate_rows(const scalar_t* x, int64_t ld, int64_t n, int64_t heads, int64_t d,
                 const scalar_t* cos, const scalar_t* sin, const int64_t* positions, Dst dst_row) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t h = 0; h < heads; ++h)
      rotate_head(x + r * ld + h * d, cos + positions[r] * d, sin + positions[r] * d, d,
                  dst_row(r) + h * d);
}

// RoPE on q and k and the KV pool write of one layer, in one pass (eager: ~14 ops), where
// eager's fused bf16 pass does not apply: rotated q into q_out [N, H, D] (contiguous); k
// rotated and v to slot_mapping's slots of the pools.
void rotate_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, at::Tensor& q_out) {
  const int64_t n = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1
                  && q.stride(1) == d && k.stride(1) == d && v.stride(1) == d,
              "q, k, v rows must be contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "rope tables must be contiguous");
  const auto* pos = positions.data_ptr<int64_t>();
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t slot_size = hkv * d;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* c = cos.data_ptr<scalar_t>();
    const auto* s = sin.data_ptr<scalar_t>();
    auto* qo = q_out.data_ptr<scalar_t>();
    auto* kc = k_cache.data_ptr<scalar_t>();
    auto* vc = v_cache.data_ptr<scalar_t>();
    rotate_rows(q.data_ptr<scalar_t>(), q.stride(0), n, hq, d, c, s, pos,
                [&](int64_t r) { return qo + r * hq * d; });
    rotate_rows(k.data_ptr<scalar_t>(), k.stride(0), n, hkv, d, c, s, pos,
                [&](int64_t r) { return kc + slots[r] * slot_size; });
    const auto* vp = v.data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r)
      std::copy(vp + r * v.stride(0), vp + r * v.stride(0) + slot_size, vc + slots[r] * slot_size);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "rotate_and_cache: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

class DecodeStack {
 public:
  DecodeStack(at::Tensor embed, at::Tensor cos, at::Tensor sin, at::Tensor final_norm, double eps,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
              int64_t block_size, int64_t native_linear, int64_t native_max_rows)
      : embed_(embed), cos_(cos), sin_(sin), final_norm_(norm_of(final_norm)), eps_(eps),
        num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
        scale_(scale), block_size_(block_size), native_linear_(native_linear),
        native_max_rows_(native_max_rows) {
    const bool bf16 = fused_passes_compiled() && embed.scalar_type() == at::kBFloat16;
    fused_norm_ = bf16 && embed.size(1) % 16 == 0;
    fused_rope_ = bf16 && head_dim % 32 == 0 && cos.scalar_type() == at::kBFloat16
                  && cos.is_contiguous() && sin.is_contiguous();
    fused_silu_ = bf16;  // and I % 16 == 0: per layer (add_layer)
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> weights,
                 std::vector<c10::optional<at::Tensor>> biases,
                 std::vector<c10::optional<at::Tensor>> packed, at::Tensor k_cache,
                 at::Tensor v_cache) {
    TORCH_CHECK(weights.size() == 4 && biases.size() == 4 && packed.size() == 4,
                "a layer has 4 linears: qkv, o, gate_up, down");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
                "KV pool views must be contiguous");
    auto linear = [&](int i) { return Linear{weights[i], biases[i], packed[i]}; };
    auto head_norm = [](const c10::optional<at::Tensor>& w) -> c10::optional<Norm> {
      if (!w) return c10::nullopt;
      return norm_of(*w);
    };
    fused_silu_ = fused_silu_ && weights[2].size(0) % 32 == 0;  // 2I: fast_silu_mul's rule
    layers_.push_back(Layer{norm_of(input_norm), norm_of(post_norm), head_norm(q_norm),
                            head_norm(k_norm), linear(0), linear(1), linear(2), linear(3),
                            k_cache, v_cache});
  }

  // input_ids, positions, slot_mapping [B]; block_tables [B, max_blocks]; context_lens [B]
  // -> final hidden states [B, hidden] (normed), the KV pool written at slot_mapping.
  at::Tensor run(at::Tensor input_ids, at::Tensor positions, at::Tensor slot_mapping,
                 at::Tensor block_tables, at::Tensor context_lens) {
    c10::InferenceMode guard;
    const int64_t n = input_ids.size(0), d = head_dim_;
    TORCH_CHECK(!layers_.empty(), "no layers added");
    TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong
                    && positions.is_contiguous() && slot_mapping.is_contiguous(),
                "positions and slot_mapping must be contiguous int64");
    auto x = at::embedding(embed_, input_ids).contiguous();  // the residual stream, in place
    auto h = rms_norm(x, layers_[0].input_norm.weight, eps_);
    auto q = at::empty({n, num_heads_, d}, x.options());
    auto attn = at::empty_like(q);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      rope_and_cache(linear(h, layer.qkv), layer, positions, slot_mapping, q);
      paged_decode_attention(attn, q, layer.k_cache, layer.v_cache, block_tables,
                             context_lens, block_size_, scale_);
      h = add_and_norm(x, linear(attn.view({n, -1}), layer.o), layer.post_norm);
      const Norm& next = i + 1 < layers_.size() ? layers_[i + 1].input_norm : final_norm_;
      h = add_and_norm(x, linear(silu_mul(linear(h, layer.gate_up)), layer.down), next);
    }
    return h;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // As xllm.ops.fast_linear then F.linear: the native kernel for decode-sized bf16 batches.
  at::Tensor linear(const at::Tensor& x, const Linear& l) const {
    if (native_linear_ != kAtenLinear && l.packed && x.scalar_type() == at::kBFloat16
        && x.size(0) <= native_max_rows_) {
      const int64_t out = l.weight.size(0);
      return native_linear_ == kAmx ? amx_linear(x, *l.packed, out, l.bias)
                                    : packed_bf16_linear(x, *l.packed, out, l.bias);
    }
    return at::linear(x, l.weight, l.bias);
  }

  // x += y (rounded as eager's add), then norm(x), as a new tensor (the next linear's input).
  at::Tensor add_and_norm(at::Tensor& x, const at::Tensor& y, const Norm& norm) const {
#if defined(__AVX512F__)
    if (fused_norm_) {
      const int64_t n = x.size(0), N = x.size(1);
      auto out = at::empty_like(x);
      auto* xp = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
      const auto* yp = reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>());
      auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
      const float* w = norm.floats.data_ptr<float>();
      const float eps = static_cast<float>(eps_);
      at::parallel_for(0, n, rows_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          elementwise::add_rms_norm_row(xp + r * N, yp + r * N, w, N, eps, op + r * N);
      });
      return out;
    }
#endif
    x.add_(y);
    return rms_norm(x, norm.weight, eps_);
  }

  // F.silu(gate) * up of gate_up = gate | up [n, 2I].
  at::Tensor silu_mul(const at::Tensor& gate_up) const {
#if defined(__AVX512F__)
    if (fused_silu_) {
      const int64_t n = gate_up.size(0), I = gate_up.size(1) / 2;
      auto y = at::empty({n, I}, gate_up.options());
      const auto* xp = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
      auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
      const int64_t spans = (I + kUnitElems - 1) / kUnitElems;  // per row
      at::parallel_for(0, n * spans, units_grain(kUnitElems), [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const int64_t r = u / spans, i = u % spans * kUnitElems;
          const uint16_t* g = xp + r * 2 * I + i;
          elementwise::silu_mul_span(g, g + I, std::min(kUnitElems, I - i), yp + r * I + i);
        }
      });
      return y;
    }
#endif
    auto halves = gate_up.chunk(2, -1);
    return at::silu(halves[0]) * halves[1];
  }

  // q/k norms (Qwen3) and RoPE of qkv [n, q | k | v] into q [n, H, D], and k, v to the pool
  // at slot_mapping's slots (eager's rotary then index_copy_).
  void rope_and_cache(const at::Tensor& qkv, const Layer& layer, const at::Tensor& positions,
                      const at::Tensor& slot_mapping, at::Tensor& q) const {
    const int64_t n = qkv.size(0), d = head_dim_;
    const int64_t q_size = num_heads_ * d, kv_size = num_kv_heads_ * d;
#if defined(__AVX512F__)
    if (fused_rope_) {
      const auto* base = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
      const auto* cos = reinterpret_cast<const uint16_t*>(cos_.data_ptr<at::BFloat16>());
      const auto* sin = reinterpret_cast<const uint16_t*>(sin_.data_ptr<at::BFloat16>());
      auto* qo = reinterpret_cast<uint16_t*>(q.data_ptr<at::BFloat16>());
      auto* kc = reinterpret_cast<uint16_t*>(layer.k_cache.data_ptr<at::BFloat16>());
      auto* vc = reinterpret_cast<uint16_t*>(layer.v_cache.data_ptr<at::BFloat16>());
      const float* qw = layer.q_norm ? layer.q_norm->floats.data_ptr<float>() : nullptr;
      const float* kw = layer.k_norm ? layer.k_norm->floats.data_ptr<float>() : nullptr;
      const auto* pos = positions.data_ptr<int64_t>();
      const auto* slots = slot_mapping.data_ptr<int64_t>();
      const int64_t ld = qkv.stride(0);
      const float eps = static_cast<float>(eps_);
      const int64_t heads = num_heads_ + num_kv_heads_;  // per row, q's then k's
      at::parallel_for(0, n * heads, units_grain(d), [&](int64_t begin, int64_t end) {
        std::vector<float> xn(d);
        for (int64_t u = begin; u < end; ++u) {
          const int64_t r = u / heads, h = u % heads;
          const uint16_t* head = base + r * ld + h * d;  // k's heads follow q's in the row
          const uint16_t *c = cos + pos[r] * d, *s = sin + pos[r] * d;
          if (h < num_heads_) {
            elementwise::norm_rope_head(head, qw, eps, c, s, d, xn.data(),
                                        qo + (r * num_heads_ + h) * d);
            continue;
          }
          uint16_t* k_slot = kc + slots[r] * kv_size;
          elementwise::norm_rope_head(head, kw, eps, c, s, d, xn.data(),
                                      k_slot + (h - num_heads_) * d);
          if (h == num_heads_)  // the row's v, once
            std::memcpy(vc + slots[r] * kv_size, base + r * ld + q_size + kv_size,
                        kv_size * sizeof(uint16_t));
        }
      });
      return;
    }
#endif
    auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
    auto qh = parts[0].view({n, -1, d}), kh = parts[1].view({n, -1, d});
    if (layer.q_norm) {
      qh = rms_norm(qh, layer.q_norm->weight, eps_);
      kh = rms_norm(kh, layer.k_norm->weight, eps_);
    }
    rotate_and_cache(qh, kh, parts[2].view({n, -1, d}), cos_, sin_, positions, slot_mapping,
                     layer.k_cache, layer.v_cache, q);
  }

  at::Tensor embed_, cos_, sin_;
  Norm final_norm_;
  double eps_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double scale_;  // the attention's own (head_dim ** -0.5 in Python: the same double)
  int64_t block_size_, native_linear_, native_max_rows_;
  bool fused_norm_, fused_rope_, fused_silu_;  // eager's fused passes apply (see above)
  std::vector<Layer> layers_;
};

void register_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack",
                                "a decode-only step of a Llama-family model as one native call")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t,
                          int64_t, int64_t, double, int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      // No Python in the call: other threads (the async step's scheduler) run meanwhile.
      .def("run", &DecodeStack::run, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("num_layers", &DecodeStack::num_layers);
}
