// One decoder block of a Llama-flavour model (RMSNorm, RoPE, grouped-query attention, SwiGLU, no
// biases) for a decode step, as one op: B rows, each ONE new token at its own position in its
// own cache slot.
//
//   h = rmsnorm(x) ; q, k, v = qkv(h) ; rotate q, k ; store k, v at (slot, position)
//   x = x + o(attention of q over the slot's keys 0..position)
//   x = x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))
//
// Why: at batch 1 the four matmuls of a block take about a third of a token's time in PyTorch's
// eager mode; the rest is some 45 small ops per block (norms, rotations, the cache's indexed
// writes, masks, views, adds), each a few microseconds of dispatch for a few hundred floats of
// work. Here they are plain loops between the matmuls, which are memlm's int4 / int8 kernels
// (quant_linear.cpp) or its float32 one (float_linear.cpp), called directly. The result is what
// memlm.model.layers.Block computes, to float rounding (tests/test_decode_block.py checks it
// against the module).
//
// The caller (memlm/infer/fused.py) hands in the fused projections (qkv, gate_up) of one format
// each, float32 activations and a float32 cache, and keeps every position inside the cache.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "float_linear.h"
#include "quant_linear.h"

namespace memlm {
namespace {

// How a linear layer's tensors are to be read (the op's `kinds`, three ints per layer): the kind,
// then for int4 / int8 dequant_rows and amx_rows as for int4_linear / int8_linear; for float32
// two zeros.
enum Kind : int64_t { kFloat = 0, kInt4 = 1, kInt8 = 2 };

at::Tensor linear(const at::Tensor& x, at::TensorList w, at::IntArrayRef kinds, int layer) {
  const int64_t kind = kinds[3 * layer], dequant_rows = kinds[3 * layer + 1], amx_rows = kinds[3 * layer + 2];
  if (kind == kFloat) {
    TORCH_CHECK(w.size() == 1, "memlm::decode_block: a float32 layer is (weight)");
    return float_linear(x, w[0]);
  }
  if (kind == kInt4) {
    TORCH_CHECK(w.size() == 3, "memlm::decode_block: an int4 layer is (packed, scales, mins)");
    const int64_t group = w[0].size(1) * 2 / w[1].size(1);
    return int4_linear(x, w[0], w[1], w[2], group, dequant_rows, amx_rows);
  }
  TORCH_CHECK(kind == kInt8 && w.size() == 2, "memlm::decode_block: layer ", layer,
              " must be float32 (weight), int4 (packed, scales, mins) or int8 (codes, scales), got kind ", kind);
  return int8_linear(x, w[0], w[1], dequant_rows, amx_rows);
}

// y = x / sqrt(mean(x^2) + eps) * weight, per row of d floats (nn.RMSNorm's formula).
void rms_norm(const float* x, const float* weight, float eps, int64_t rows, int64_t d, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    float* yr = y + r * d;
    for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * weight[i];
  }
}

// Rotates each head of v (heads x hd) in place by cos/sin (hd): pairs (i, i + hd/2), the
// "rotate half" layout of memlm.model.layers.apply_rope.
void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out (hd) = softmax(q . keys[j] * scale for j <= last) weighted sum of values[j]; keys and values
// are rows `stride` floats apart. scores: room for last + 1 floats.
void attend(const float* q, const float* keys, const float* values, int64_t stride, int64_t last, int64_t hd,
            float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j <= last; ++j) {
    scores[j] = dot(q, keys + j * stride, hd) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j <= last; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + hd, 0.f);
  for (int64_t j = 0; j <= last; ++j) {
    const float w = scores[j] / total;
    const float* v = values + j * stride;
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += w * v[i];
  }
}

void check_float(const char* name, const at::Tensor& t, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "memlm::decode_block: ", name, " must be a contiguous float32 CPU tensor of ", numel,
              " elements, got ", t.scalar_type(), " ", t.sizes());
}

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
                        at::TensorList qkv, at::TensorList o, at::TensorList gate_up, at::TensorList down,
                        at::IntArrayRef kinds, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                        const std::optional<at::Tensor>& slots, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t n_head, int64_t n_kv_heads) {
  const char* op = "memlm::decode_block";
  TORCH_CHECK(x.dim() == 2, op, ": x must be (rows, d), got ", x.sizes());
  TORCH_CHECK(kinds.size() == 12, op, ": kinds must hold 3 ints for each of qkv, o, gate_up, down");
  const int64_t B = x.size(0), d = x.size(1);
  check_float("x", x, B * d);
  check_float("attn_norm", attn_norm, d);
  check_float("mlp_norm", mlp_norm, d);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              op, ": k_cache and v_cache must be (slots, n_kv_heads, max_len, head_dim) alike");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.stride(3) == 1,
              op, ": the cache must be float32 with contiguous head_dim rows");
  const int64_t pool = k_cache.size(0), max_len = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == n_kv_heads && n_head % n_kv_heads == 0 && hd % 2 == 0, op,
              ": heads do not match the cache: ", n_head, " query heads, ", n_kv_heads, " kv heads, cache ",
              k_cache.sizes());
  check_float("cos", cos, B * hd);
  check_float("sin", sin, B * hd);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B && positions.is_contiguous(), op,
              ": positions must be B int64");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = nullptr;
  if (slots.has_value()) {
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->numel() == B && slots->is_contiguous(), op,
                ": slots must be B int64");
    slot = slots->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(B <= pool, op, ": ", B, " rows without slots need a pool of as many, got ", pool);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = slot ? slot[b] : b;
    TORCH_CHECK(pos[b] >= 0 && pos[b] < max_len && s >= 0 && s < pool, op, ": row ", b, " at position ", pos[b],
                " of slot ", s, " is outside the cache ", k_cache.sizes());
  }

  const int64_t q_width = n_head * hd, kv_width = n_kv_heads * hd;
  const float* xp = x.data_ptr<float>();

  // Attention half.
  at::Tensor h = at::empty({B, d}, x.options());
  rms_norm(xp, attn_norm.data_ptr<float>(), static_cast<float>(eps), B, d, h.data_ptr<float>());
  at::Tensor projected = linear(h, qkv, kinds, 0);  // (B, q_width + 2 kv_width)
  TORCH_CHECK(projected.size(1) == q_width + 2 * kv_width, op, ": qkv gives ", projected.size(1), " features, the",
              " heads need ", q_width + 2 * kv_width);
  float* qkv_p = projected.data_ptr<float>();
  const int64_t row = projected.size(1);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t s0 = k_cache.stride(0), s1 = k_cache.stride(1), s2 = k_cache.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    float* r = qkv_p + b * row;
    const float* c = cos.data_ptr<float>() + b * hd;
    const float* sn = sin.data_ptr<float>() + b * hd;
    rope(r, n_head, hd, c, sn);
    rope(r + q_width, n_kv_heads, hd, c, sn);
    const int64_t s = slot ? slot[b] : b;
    for (int64_t g = 0; g < n_kv_heads; ++g) {
      std::copy_n(r + q_width + g * hd, hd, kc + s * s0 + g * s1 + pos[b] * s2);
      std::copy_n(r + q_width + kv_width + g * hd, hd, vc + s * s0 + g * s1 + pos[b] * s2);
    }
  }
  at::Tensor attended = at::empty({B, q_width}, x.options());
  float* att = attended.data_ptr<float>();
  const int64_t group = n_head / n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  // One task per (row, head): a second thread only when there is a few tens of microseconds' work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, longest * hd));
  at::parallel_for(0, B * n_head, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(longest);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_head, head = t % n_head, g = head / group;
      const int64_t base = (slot ? slot[b] : b) * s0 + g * s1;
      attend(qkv_p + b * row + head * hd, kc + base, vc + base, s2, pos[b], hd, scale, scores.data(),
             att + b * q_width + head * hd);
    }
  });
  // The block's output is built in o's result: x + o(...) now, + down(...) below.
  at::Tensor out = linear(attended, o, kinds, 1);  // (B, d)
  TORCH_CHECK(out.size(1) == d, op, ": o gives ", out.size(1), " features, x has ", d);
  float* y = out.data_ptr<float>();
  for (int64_t i = 0; i < B * d; ++i) y[i] += xp[i];

  // Feed-forward half.
  rms_norm(y, mlp_norm.data_ptr<float>(), static_cast<float>(eps), B, d, h.data_ptr<float>());
  at::Tensor gu = linear(h, gate_up, kinds, 2);  // (B, 2 F): gate then up
  const int64_t F = gu.size(1) / 2;
  at::Tensor act = at::empty({B, F}, x.options());
  float* a = act.data_ptr<float>();
  const float* g = gu.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < F; ++i) {
      const float gate = g[b * 2 * F + i];
      a[b * F + i] = gate / (1.f + std::exp(-gate)) * g[b * 2 * F + F + i];
    }
  at::Tensor mlp = linear(act, down, kinds, 3);
  TORCH_CHECK(mlp.size(1) == d, op, ": down gives ", mlp.size(1), " features, x has ", d);
  const float* m = mlp.data_ptr<float>();
  for (int64_t i = 0; i < B * d; ++i) y[i] += m[i];
  return out;
}

}  // namespace
}  // namespace memlm

TORCH_LIBRARY_FRAGMENT(memlm, m) {
  m.def("decode_block(Tensor x, Tensor attn_norm, Tensor mlp_norm, float eps, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, int[] kinds, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
        "Tensor? slots, Tensor cos, Tensor sin, int n_head, int n_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(memlm, CPU, m) { m.impl("decode_block", &memlm::decode_block); }
