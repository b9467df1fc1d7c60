// Graph mode on CPU: a decode-only step of a Llama-family model (Llama, Qwen2, Qwen3) as ONE
// native call, over weights and KV pool views bound once at start-up (the CPU's "captured
// graph", engine/graph_runner.py).
//
// The eager step is ~40 ATen ops and ~12 nn.Module calls per decoder layer, each paying
// Python and dispatcher overhead that, at batch 1, adds several ms to a step whose big
// linears take ~35 ms. Here the same ops run in the same order, with the same kernels (our
// native linears, RMSNorm and paged attention where eager uses them, ATen elsewhere), and
// RoPE + the KV pool write fused into one pass that rounds as eager's ops do, so the result
// is bit-for-bit the eager one, at any batch size and dtype, with no Python in between.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

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

struct Layer {
  at::Tensor input_norm, post_norm;
  c10::optional<at::Tensor> q_norm, k_norm;  // Qwen3's per-head norms
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;  // this layer's [slots, Hkv, D] pool views
};

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

// RoPE on q and k and the KV pool write of one layer, in one pass (eager: ~14 ops): returns
// rotated q [N, H, D] (contiguous); k rotated and v go to slot_mapping's slots of the pools.
at::Tensor rope_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, const at::Tensor& slot_mapping,
                          at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t n = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1
                  && q.stride(1) == d && k.stride(1) == d && v.stride(1) == d,
              "q, k, v rows must be contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && k_cache.is_contiguous()
                  && v_cache.is_contiguous(), "rope tables and pool views must be contiguous");
  auto q_out = at::empty({n, hq, d}, q.options());
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
    default: TORCH_CHECK(false, "rope_and_cache: unsupported dtype ", q.scalar_type());
  }
  return q_out;
}

}  // namespace

class DecodeStack {
 public:
  DecodeStack(at::Tensor embed, at::Tensor cos, at::Tensor sin, at::Tensor final_norm, double eps,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
              int64_t block_size, int64_t native_linear, int64_t native_max_rows)
      : embed_(embed), cos_(cos), sin_(sin), final_norm_(final_norm), eps_(eps),
        num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
        scale_(scale), block_size_(block_size), native_linear_(native_linear),
        native_max_rows_(native_max_rows) {}

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> weights,
                 std::vector<c10::optional<at::Tensor>> biases,
                 std::vector<c10::optional<at::Tensor>> packed, at::Tensor k_cache,
                 at::Tensor v_cache) {
    TORCH_CHECK(weights.size() == 4 && biases.size() == 4 && packed.size() == 4,
                "a layer has 4 linears: qkv, o, gate_up, down");
    auto linear = [&](int i) { return Linear{weights[i], biases[i], packed[i]}; };
    layers_.push_back(Layer{input_norm, post_norm, q_norm, k_norm, linear(0), linear(1),
                            linear(2), linear(3), k_cache, v_cache});
  }

  // input_ids, positions, slot_mapping [B]; block_tables [B, max_blocks]; context_lens [B]
  // -> final hidden states [B, hidden] (normed), the KV pool written at slot_mapping.
  at::Tensor run(at::Tensor input_ids, at::Tensor positions, at::Tensor slot_mapping,
                 at::Tensor block_tables, at::Tensor context_lens) {
    c10::InferenceMode guard;
    const int64_t n = input_ids.size(0), d = head_dim_;
    const int64_t q_size = num_heads_ * d, kv_size = num_kv_heads_ * d;
    TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong
                    && positions.is_contiguous() && slot_mapping.is_contiguous(),
                "positions and slot_mapping must be contiguous int64");
    auto x = at::embedding(embed_, input_ids);
    for (auto& layer : layers_) {
      auto qkv = linear(rms_norm(x, layer.input_norm, eps_), layer.qkv)
                     .split_with_sizes({q_size, kv_size, kv_size}, -1);
      auto q = qkv[0].view({n, -1, d}), k = qkv[1].view({n, -1, d}), v = qkv[2].view({n, -1, d});
      if (layer.q_norm) {
        q = rms_norm(q, *layer.q_norm, eps_);
        k = rms_norm(k, *layer.k_norm, eps_);
      }
      q = rope_and_cache(q, k, v, cos_, sin_, positions, slot_mapping, layer.k_cache,
                         layer.v_cache);
      auto attn = at::empty_like(q);
      paged_decode_attention(attn, q, layer.k_cache, layer.v_cache, block_tables,
                             context_lens, block_size_, scale_);
      x = x + linear(attn.view({n, -1}), layer.o);
      auto gate_up = linear(rms_norm(x, layer.post_norm, eps_), layer.gate_up).chunk(2, -1);
      x = x + linear(at::silu(gate_up[0]) * gate_up[1], layer.down);
    }
    return rms_norm(x, final_norm_, eps_);
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

  at::Tensor embed_, cos_, sin_, final_norm_;
  double eps_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double scale_;  // the attention's own (head_dim ** -0.5 in Python: the same double)
  int64_t block_size_, native_linear_, native_max_rows_;
  std::vector<Layer> layers_;
};

void register_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack",
                                "a decode-only step of a Llama-family model as one native call")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t,
                          int64_t, int64_t, double, int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("run", &DecodeStack::run)
      .def("num_layers", &DecodeStack::num_layers);
}
