// Block-quantized linear layers for the CPU: y = x @ W^T with W held as int4 (scale + min per
// group) or int8 (scale per row or per group), in memlm's portable layouts (see
// memlm/compress/quantize.py). Nothing is repacked and no float copy of W is made.
//
// The method is the one llama.cpp uses for its q4_1 / q8_0 formats: each activation row is
// quantized to int8 in blocks of 32 (d = max|x| / 127, q = round(x / d)), every block's dot
// product with the weight codes is done in integers, and only the 32-wide block results are
// scaled and summed in float:
//
//   int4:  sum_j x_j (q_j s + m) ~= sum_blocks s d isum + sum_groups m (sum of d sum(qx) in the group)
//   int8:  sum_j x_j q_j s       ~= sum_blocks s d isum
//
// memlm packs int4 codes with the LOW nibble = EVEN input column. So that a 16-byte load of
// packed codes meets the activations without shuffles, the activations of every two blocks
// (64 columns) are stored in the order [even columns of block 0, even of block 1, odd of block 0,
// odd of block 1]: a 32-byte weight load gives the low nibbles (the even columns of both blocks)
// and, shifted by 4, the high nibbles (the odd columns). The many-row and AMX kernels read their
// own layouts of the same codes (Layout, see quant_kernels.cpp), written as x is quantized.
//
// The kernels, by row count: one row, tiles of 4 weight rows; more, one weight row against up to
// 8 activation rows (simd_kernels.h); or, from amx_rows rows on where the CPU has AMX, tiles of 16
// x 16 (amx_kernels.cpp). They compute exactly the same integer sums, on paths chosen at run time
// from the CPU: AMX, AVX2 (+FMA, F16C), the same with AVX-VNNI's byte dot product (simd_kernels.h
// is compiled once for each), and plain C++. The SIMD functions carry target attributes instead
// of the file being compiled with -mavx2, so the compiler cannot slip AVX2 instructions into the
// portable path.
//
// Asked to (dequant_rows), the ops instead dequantize the weights a slice at a time and use
// torch's float matmul (see dequant_matmul). Which is fastest for how many rows is measured per
// machine, in Python (memlm/kernels/choose.py).
//
// Files: this one is the torch side (argument checks, threads, the ops' registration);
// quant_kernels.cpp/.h the compute, without torch headers; simd_kernels.h its SIMD kernels,
// amx_kernels.cpp the AMX ones.

// Nothing here is hot (the loops are in quant_kernels.cpp): -O2 instead of the build's -O3
// saves a third of this file's compile time, which torch's headers and templates dominate.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O2")
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "quant_kernels.h"
#include "quant_linear.h"

namespace memlm {
namespace {

using namespace memlm::kernels;

// Below this many weight bytes per thread, waking a second thread costs more than it saves
// (an OpenMP fork/join is a few microseconds; 32 KB of int4 codes take about that long).
constexpr int64_t kMinBytesPerTask = 32 * 1024;

// The path in use: the best the CPU has, unless set_isa (tests, benchmarks) chose a lower one.
std::atomic<int> g_isa{best_isa()};

// The layout (and so the kernel) for rows activation rows: AMX's tiles from amx_rows rows on
// (0: never) where the CPU has them, else the one-row tiles or the many-row kernels.
Layout layout_for(int64_t rows, Isa isa, int64_t amx_rows) {
  if (isa == kAmx && amx_rows > 0 && rows >= amx_rows) return Layout::kTiles;
  return rows >= kQuadRows ? Layout::kQuads : Layout::kRow;
}

Acts quantize_acts(const float* x, int64_t rows, int64_t in, bool int4, int64_t group, Isa isa, Layout layout) {
  Acts a;
  prepare_acts(a, rows, in, int4, group, layout);
  // Prefill: rows are independent; a decode step (one row) stays on this thread.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / in),
                   [&](int64_t r0, int64_t r1) { quantize_rows(x, r0, r1, int4, group, a, isa); });
  if (layout == Layout::kTiles) finish_tiles(a, int4, group);
  return a;
}

// Runs kernel(o0, o1) over the output rows, split across torch's threads in runs of whole
// `unit`s (the one-row kernels' tiles, AMX's 16 rows), none with less than kMinBytesPerTask of
// weights per activation row behind it.
template <typename Kernel>
void split_outputs(int64_t rows, int64_t out, int64_t row_bytes, int64_t unit, Kernel kernel) {
  const int64_t units = (out + unit - 1) / unit;
  const int64_t unit_work = std::max<int64_t>(1, row_bytes * unit * rows);
  at::parallel_for(0, units, std::max<int64_t>(1, kMinBytesPerTask / unit_work), [&](int64_t u0, int64_t u1) {
    kernel(u0 * unit, std::min(out, u1 * unit));
  });
}

// y (rows x out) from the kernel a's layout is for: one activation row in tiles of tile_rows
// (<= kTile) weight rows, more one weight row at a time (see simd_kernels.h), or AMX's tiles of 16.
template <typename Tile, typename Rows, typename Tiles>
at::Tensor run_kernels(const at::Tensor& x, const Acts& a, int64_t out, int64_t row_bytes, int tile_rows, Tile tile,
                       Rows rows, Tiles tiles) {
  at::Tensor y = at::empty({a.rows, out}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (a.layout == Layout::kTiles) {
    // AMX's work per weight row hardly grows with the rows: count it as 4 rows' worth.
    split_outputs(std::min<int64_t>(a.rows, 4), out, row_bytes, kTileRows,
                  [&](int64_t o0, int64_t o1) { tiles(o0, o1, yp); });
  } else if (a.layout == Layout::kQuads) {
    split_outputs(a.rows, out, row_bytes, 1, [&](int64_t o0, int64_t o1) { rows(o0, o1, yp); });
  } else {
    split_outputs(a.rows, out, row_bytes, tile_rows, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; o += tile_rows) tile(o, static_cast<int>(std::min<int64_t>(tile_rows, o1 - o)), yp);
    });
  }
  return y;
}

// Weight rows per one-row tile. int4 does enough arithmetic per byte that one activation load
// feeding 4 rows pays (SmolLM2's 49152 x 576 head at 2 threads on the 2-core EPYC of
// bench/results: 0.60 ms in tiles of 4, 1.06 one row at a time). int8 has little arithmetic per
// byte and is bound by how the weights stream: 4 rows read side by side, 576+ bytes apart, defeat
// the hardware prefetcher, and the same head took 2.3 ms in tiles of 4, 1.2 (24-30 GB/s, the
// machine's read bandwidth) one row at a time, reading the weights in order.
constexpr int kInt4TileRows = kTile, kInt8TileRows = 1;

// Dequantize + matmul: the float weights and torch's matmul (MKL / oneDNN) give y = x @ W^T. The weights
// are converted kDequantChunk at a time, so no float copy of a whole large layer (a vocabulary
// head) exists. dequant(o, n, dst) writes rows o..o+n-1 of W as float32 into dst.
constexpr int64_t kDequantChunk = 1 << 20;  // 4 MB of float weights

template <typename Dequant>
at::Tensor dequant_matmul(const at::Tensor& xf, int64_t out, int64_t in, Dequant dequant) {
  const int64_t chunk_rows = std::max<int64_t>(1, std::min(out, kDequantChunk / in));
  at::Tensor w = at::empty({chunk_rows, in}, xf.options());
  auto fill = [&](int64_t o, int64_t n) {
    float* dst = w.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / in),
                     [&](int64_t r0, int64_t r1) { dequant(o + r0, r1 - r0, dst + r0 * in); });
  };
  if (chunk_rows == out) {
    fill(0, out);
    return at::mm(xf, w.t());
  }
  at::Tensor y = at::empty({xf.size(0), out}, xf.options());
  for (int64_t o = 0; o < out; o += chunk_rows) {
    const int64_t n = std::min(chunk_rows, out - o);
    fill(o, n);
    y.narrow(1, o, n).copy_(at::mm(xf, w.narrow(0, 0, n).t()));
  }
  return y;
}

// x (..., in) float32 / bfloat16 -> (rows, in) contiguous float32, after the shared checks.
at::Tensor flat_input(const char* op, const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x's last dimension must be in_features = ", in,
              ", got shape ", x.sizes());
  TORCH_CHECK(in > 0 && in % kBlock == 0, op, ": in_features must be a positive multiple of ", kBlock, ", got ", in);
  return x.to(at::kFloat).contiguous().view({-1, in});
}

at::Tensor shaped_output(const at::Tensor& x, const at::Tensor& y, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape).to(x.scalar_type());
}

void check_weight(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Chooses the code path ("portable", "avx2", "avx_vnni", "amx" or "best"), capped at what the CPU
// has (tests and benchmarks use this to reach every path); returns the one now in use.
std::string set_isa(const std::string& name) {
  int wanted = name == "best" ? best_isa() : -1;
  for (int i = kPortable; i <= kAmx; ++i)
    if (name == kIsaNames[i]) wanted = i;
  TORCH_CHECK(wanted >= 0, "memlm::set_isa: unknown path '", name, "'; use portable, avx2, avx_vnni, amx or best");
  g_isa.store(std::min<int>(wanted, best_isa()));
  return kIsaNames[g_isa.load()];
}

std::string current_isa() { return kIsaNames[g_isa.load()]; }

}  // namespace

using namespace memlm::kernels;

Isa isa_in_use() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t dequant_rows, int64_t amx_rows) {
  const char* op = "memlm::int4_linear";
  TORCH_CHECK(packed.dim() == 2, op, ": packed must be (out, in/2), got shape ", packed.sizes());
  const int64_t out = packed.size(0), in = packed.size(1) * 2;
  TORCH_CHECK(group_size == kBlock || (group_size > 0 && group_size % 64 == 0), op,
              ": group_size must be 32 or a multiple of 64, got ", group_size);
  TORCH_CHECK(in % group_size == 0, op, ": group_size ", group_size, " does not divide in_features ", in);
  check_weight(op, "packed", packed, at::kByte, {out, in / 2});
  check_weight(op, "scales", scales, at::kHalf, {out, in / group_size});
  check_weight(op, "mins", mins, at::kHalf, {out, in / group_size});
  const at::Tensor xf = flat_input(op, x, in);
  const int64_t rows = xf.size(0);
  const Int4Weights w{packed.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(),
                      in, out, in / group_size, group_size};
  const Isa isa = isa_in_use();
  if (dequant_rows > 0 && rows >= dequant_rows) {
    auto dequant = [&](int64_t o, int64_t n, float* dst) { dequant_int4(w, o, n, dst, isa); };
    return shaped_output(x, dequant_matmul(xf, out, in, dequant), out);
  }
  const Acts a = quantize_acts(xf.data_ptr<float>(), rows, in, /*int4=*/true, group_size, isa,
                               layout_for(rows, isa, amx_rows));
  const at::Tensor y = run_kernels(
      x, a, out, in / 2, kInt4TileRows, [&](int64_t o, int nr, float* yp) { int4_tile(w, o, nr, a, yp, isa); },
      [&](int64_t o0, int64_t o1, float* yp) { int4_rows(w, o0, o1, a, yp, isa); },
      [&](int64_t o0, int64_t o1, float* yp) { int4_tiles(w, o0, o1, a, yp); });
  return shaped_output(x, y, out);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t dequant_rows,
                       int64_t amx_rows) {
  const char* op = "memlm::int8_linear";
  TORCH_CHECK(codes.dim() == 2, op, ": w_int8 must be (out, in), got shape ", codes.sizes());
  const int64_t out = codes.size(0), in = codes.size(1);
  check_weight(op, "w_int8", codes, at::kChar, {out, in});
  int64_t groups = 0, group = 0;
  if (scales.dim() == 2) {
    TORCH_CHECK(scales.size(0) == out && scales.size(1) > 0 && in % scales.size(1) == 0, op,
                ": grouped scales must be (out, in/group), got shape ", scales.sizes());
    groups = scales.size(1);
    group = in / groups;
    TORCH_CHECK(group % kBlock == 0, op, ": the scale group (", group, " inputs) must be a multiple of ", kBlock);
    check_weight(op, "scales", scales, at::kFloat, {out, groups});
  } else {
    check_weight(op, "scales", scales, at::kFloat, {out});
  }
  const at::Tensor xf = flat_input(op, x, in);
  const int64_t rows = xf.size(0);
  const Int8Weights w{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), in, out, groups, group};
  const Isa isa = isa_in_use();
  if (dequant_rows > 0 && rows >= dequant_rows) {
    auto dequant = [&](int64_t o, int64_t n, float* dst) { dequant_int8(w, o, n, dst, isa); };
    return shaped_output(x, dequant_matmul(xf, out, in, dequant), out);
  }
  const Acts a = quantize_acts(xf.data_ptr<float>(), rows, in, /*int4=*/false, kBlock, isa,
                               layout_for(rows, isa, amx_rows));
  const at::Tensor y = run_kernels(
      x, a, out, in, kInt8TileRows, [&](int64_t o, int nr, float* yp) { int8_tile(w, o, nr, a, yp, isa); },
      [&](int64_t o0, int64_t o1, float* yp) { int8_rows(w, o0, o1, a, yp, isa); },
      [&](int64_t o0, int64_t o1, float* yp) { int8_tiles(w, o0, o1, a, yp); });
  return shaped_output(x, y, out);
}

}  // namespace memlm

// A fragment, not TORCH_LIBRARY: other parts of memlm may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(memlm, m) {
  // dequant_rows: from this many activation rows on, dequantize-then-matmul (0: never);
  // amx_rows: from this many on, AMX's tiles where the path in use is "amx" (0: never).
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size, int dequant_rows=0, "
        "int amx_rows=0) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_int8, Tensor scales, int dequant_rows=0, int amx_rows=0) -> Tensor");
  m.def("set_isa(str isa) -> str", &memlm::set_isa);  // no tensors: one kernel for all
  m.def("isa() -> str", &memlm::current_isa);
}

TORCH_LIBRARY_IMPL(memlm, CPU, m) {
  m.impl("int4_linear", &memlm::int4_linear);
  m.impl("int8_linear", &memlm::int8_linear);
}
