// y = x @ W^T in float32 for the few rows of decoding (one row a step; a server's batch of up to
// 64), on W as nn.Linear holds it (out x in, row-major): W is streamed from memory once a call, in
// order, and each load of it feeds every activation row of the pass.
//
// Why memlm's own: a decode step is bound by how fast the weights stream. On the 2-core AMD EPYC
// of bench/results (SmolLM2's 30 blocks, 425 MB of float32 weights, 2 threads, 2026-12-04) one row
// took 33-35 ms in oneDNN's matmul on its packed layout and 36-38 on the plain one, against 19-24
// ms here (18-23 GB/s): oneDNN's one-row path is a GEMM's, not a GEMV's. At 16 rows 57 ms against
// packed oneDNN's 69, at 64 rows 137 against 149; from about 128 rows on torch's matmul (MKL) is as
// fast or faster, so longer inputs (prefill) go there (memlm/infer/engine.py: FloatLinear).
//
// The kernels, by row count (the fastest of several tried, same machine):
//   1 row:     one weight row at a time with 8 independent accumulators (the FMA latency, not the
//              memory, limits a single chain; 8 measured 5% faster than 4), reading the weights
//              strictly in order (software prefetching measured slower);
//   2-7 rows:  one weight row against up to 4 activation rows, 2 accumulators each;
//   8+ rows:   tiles of 4 weight rows x 3 activation rows (12 accumulators, 7 loads per 12 FMAs):
//              the 4 weight rows stay in L1 while the activation rows, in L2, pass under them.
// AVX2 + FMA where the CPU has them (a target attribute, chosen at run time as in
// quant_linear.cpp), plain C++ otherwise. Sums run in a different order from torch's matmul, so
// results agree to float rounding, not bit for bit.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "float_linear.h"
#include "quant_kernels.h"
#include "quant_linear.h"

namespace memlm {
namespace {

using namespace memlm::kernels;

constexpr int64_t kRowChunk = 64;               // activation rows per pass (64 x 4 KB stays in L2)
constexpr int64_t kMinBytesPerTask = 64 * 1024;  // weight bytes below which a second thread costs more
constexpr int kUnit = 4;                        // weight rows per unit of work split across threads

#define MEMLM_AVX2 __attribute__((target("avx2,fma")))

MEMLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m * ldy + n] = x row m . w row n, for NR weight rows (ldw = in apart) and MR activation rows
// (ldx = in apart), U accumulators per pair to hide the FMA latency. in % 8 tail: scalar.
template <int NR, int MR, int U>
MEMLM_AVX2 void tile_avx2(const float* w, const float* x, int64_t in, float* y, int64_t ldy) {
  __m256 acc[MR][NR][U];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n)
      for (int u = 0; u < U; ++u) acc[m][n][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= in; k += 8 * U)
    for (int u = 0; u < U; ++u) {
      __m256 wv[NR];
      for (int n = 0; n < NR; ++n) wv[n] = _mm256_loadu_ps(w + n * in + k + 8 * u);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * in + k + 8 * u);
        for (int n = 0; n < NR; ++n) acc[m][n][u] = _mm256_fmadd_ps(xv, wv[n], acc[m][n][u]);
      }
    }
  for (; k + 8 <= in; k += 8)
    for (int n = 0; n < NR; ++n) {
      const __m256 wv = _mm256_loadu_ps(w + n * in + k);
      for (int m = 0; m < MR; ++m) acc[m][n][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * in + k), wv, acc[m][n][0]);
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      __m256 s = acc[m][n][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][n][u]);
      float total = hsum(s);
      for (int64_t j = k; j < in; ++j) total += x[m * in + j] * w[n * in + j];
      y[m * ldy + n] = total;
    }
}

// Weight rows [o0, o1) against activation rows [0, rows) (at most kRowChunk), the tile shape
// chosen by the row count as the header says.
MEMLM_AVX2 void rows_avx2(const float* w, const float* x, int64_t rows, int64_t in, int64_t o0, int64_t o1,
                          float* y, int64_t out) {
  if (rows == 1) {
    for (int64_t o = o0; o < o1; ++o) tile_avx2<1, 1, 8>(w + o * in, x, in, y + o, out);
    return;
  }
  if (rows < 8) {
    for (int64_t o = o0; o < o1; ++o) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) tile_avx2<1, 4, 2>(w + o * in, x + r * in, in, y + r * out + o, out);
      for (; r + 2 <= rows; r += 2) tile_avx2<1, 2, 2>(w + o * in, x + r * in, in, y + r * out + o, out);
      for (; r < rows; ++r) tile_avx2<1, 1, 2>(w + o * in, x + r * in, in, y + r * out + o, out);
    }
    return;
  }
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    int64_t r = 0;
    for (; r + 3 <= rows; r += 3) tile_avx2<4, 3, 1>(w + o * in, x + r * in, in, y + r * out + o, out);
    for (; r < rows; ++r) tile_avx2<4, 1, 2>(w + o * in, x + r * in, in, y + r * out + o, out);
  }
  for (; o < o1; ++o)  // a layer whose width is not a multiple of 4
    for (int64_t r = 0; r < rows; ++r) tile_avx2<1, 1, 2>(w + o * in, x + r * in, in, y + r * out + o, out);
}

void rows_portable(const float* w, const float* x, int64_t rows, int64_t in, int64_t o0, int64_t o1, float* y,
                   int64_t out) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = w + o * in;
      const float* xr = x + r * in;
      float total = 0.f;
      for (int64_t j = 0; j < in; ++j) total += xr[j] * wr[j];
      y[r * out + o] = total;
    }
}

}  // namespace

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "memlm::float_linear";
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu() &&
                  weight.is_contiguous(),
              op, ": weight must be a contiguous float32 CPU tensor (out, in), got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x's last dimension must be in_features = ", in,
              ", got shape ", x.sizes());
  const at::Tensor xf = x.contiguous().view({-1, in});
  const int64_t rows = xf.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* wp = weight.data_ptr<float>();
  const bool avx2 = isa_in_use() >= kAvx2;
  const int64_t units = (out + kUnit - 1) / kUnit;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / (kUnit * in * 4));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, rows - r0);
    const float* xp = xf.data_ptr<float>() + r0 * in;
    float* yp = y.data_ptr<float>() + r0 * out;
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      const int64_t o0 = u0 * kUnit, o1 = std::min(out, u1 * kUnit);
      if (avx2)
        rows_avx2(wp, xp, n, in, o0, o1, yp, out);
      else
        rows_portable(wp, xp, n, in, o0, o1, yp, out);
    });
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape);
}

}  // namespace memlm

TORCH_LIBRARY_FRAGMENT(memlm, m) { m.def("float_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(memlm, CPU, m) { m.impl("float_linear", &memlm::float_linear); }
