// The compute of memlm's quantized linear ops (declared in quant_kernels.h): activation
// quantization, the integer dot-product tiles (portable here, SIMD in simd_kernels.h) and the
// dequantization of the long-prefill path. No torch headers: this file compiles beside
// quant_linear.cpp, in parallel.

#include "quant_kernels.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define MEMLM_X86 1
#include <immintrin.h>
#define MEMLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace memlm::kernels {

Isa best_isa() {
#ifdef MEMLM_X86
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return kPortable;
  if (!__builtin_cpu_supports("avxvnni")) return kAvx2;
  return amx_usable() ? kAmx : kAvxVnni;
#else
  return kPortable;
#endif
}

// ------------------------------------------------------------------ quantized activations

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where element j (0..31) of block b of an activation row goes (see Acts). Quads (blocks 4q..4q+3,
// 128 bytes, only in the many-row layout) hold four 32-byte chunks, each one 8-byte slot per block:
// the operands of four byte dot products that cover the quad. int4, chunks: even columns 0..14,
// even 16..30, odd 1..15, odd 17..31, slots in block order 0 2 1 3 (what unpacking the low and high
// nibbles of 64 packed bytes gives); int8, chunks: bytes 0-7, 16-23, 8-15, 24-31, slots in block
// order. After the quads, int4 goes on in pairs (64 columns: [even of block 0, even of block 1,
// odd of 0, odd of 1]) and a trailing single block [16 even | 16 odd]; int8 in natural order.
// kTiles: the 32 codes of a block in the order of the weight tile's columns (int4: the 16 low
// nibbles, even columns, then the 16 high ones; int8: natural), 4 at a time, in the B operand of
// AMX's dot products: rows of tile_cols x 4 bytes, row (k / 4) holding code k of every column
// at column * 4 + k % 4, a row's column its row in the group (+ 4 x the row offset of row_start).
// Two blocks to a tile (few rows): the pair's 64 codes, block 2u + 1 in rows 8..15 and columns
// np.., zeros elsewhere, so that one dot product of depth 64 keeps the two blocks' sums apart.
inline int64_t tile_position(int64_t b, int64_t k, const Acts& a) {
  const int64_t row_bytes = a.tile_cols * 4;
  if (!a.paired()) return b * kBlock * a.tile_cols + (k / 4) * row_bytes + k % 4;
  const int64_t half = b % 2;
  return (b / 2) * 16 * row_bytes + (8 * half + k / 4) * row_bytes + half * a.np * 4 + k % 4;
}

inline int64_t int4_position(int64_t b, int64_t j, const Acts& a) {
  if (a.layout == Layout::kTiles) return tile_position(b, (j % 2) * 16 + j / 2, a);
  if (b < 4 * a.quads) {
    const int64_t kb = b % 4, t = j / 2, chunk = (j % 2) * 2 + t / 8, slot = (kb % 2) * 2 + kb / 2;
    return (b / 4) * 128 + chunk * 32 + slot * 8 + t % 8;
  }
  const int64_t rest = b - 4 * a.quads, pair = rest / 2, half = rest % 2;
  const bool single = (b == a.blocks - 1) && (a.blocks % 2 == 1);
  const int64_t odd_offset = single ? 16 : 32;
  return a.quads * 128 + pair * 64 + half * 16 + (j % 2) * odd_offset + j / 2;
}

inline int64_t int8_position(int64_t b, int64_t j, const Acts& a) {
  if (a.layout == Layout::kTiles) return tile_position(b, j, a);
  if (b >= 4 * a.quads) return b * kBlock + j;
  const int64_t chunk = (j / 8 == 1) ? 2 : (j / 8 == 2) ? 1 : j / 8;  // 0 2 1 3: its own inverse
  return (b / 4) * 128 + chunk * 32 + (b % 4) * 8 + j % 8;
}

// Where row r's codes start: the positions above are relative to it.
inline int64_t row_start(int64_t r, const Acts& a) {
  if (a.layout != Layout::kTiles) return r * a.in;
  return (r / kTileRows) * a.tile_units() * (a.paired() ? 64 : 32) * a.tile_cols + (r % kTileRows) * 4;
}

// The first of the two d_lanes lanes of block b (int4 quads: slots 0 2 1 3; int8: in order);
// int4 blocks after the quads fill 4 lanes each.
inline int64_t lane_of_block(int64_t b, bool int4, const Acts& a) {
  if (b < 4 * a.quads) {
    const int64_t kb = b % 4;
    return (b / 4) * 8 + 2 * (int4 ? (kb % 2) * 2 + kb / 2 : kb);
  }
  return a.quads * 8 + (b - 4 * a.quads) * 4;
}

// One block, portable: returns d and sets *qsum; writes codes via `place(j, code)`. A block
// holding inf or nan gets codes 0 and d = nan, so every output it meets is nan, as it would be
// (or inf) in the float product, instead of a finite wrong number.
template <typename Place>
float quantize_block_scalar(const float* x, Place place, int* qsum) {
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < kBlock; ++j) {
    const float a = std::fabs(x[j]);
    finite = finite && a <= FLT_MAX;  // false for inf and nan
    amax = std::max(amax, a);
  }
  const float d = finite ? amax / 127.f : NAN;
  const float id = finite && d != 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int j = 0; j < kBlock; ++j) {
    const int v = static_cast<int>(std::nearbyint(x[j] * id));  // ties to even, as torch.round
    place(j, static_cast<int8_t>(finite ? v : 0));
    sum += finite ? v : 0;
  }
  *qsum = sum;
  return d;
}

#ifdef MEMLM_X86
MEMLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MEMLM_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bytes of v (its low half, or its high half if high) at p.
MEMLM_AVX2 inline void store8(int8_t* p, __m128i v, bool high) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), high ? _mm_unpackhi_epi64(v, v) : v);
}

// One block with AVX2: the same arithmetic as quantize_block_scalar, bit for bit. Returns d and
// sets *qsum; writes the codes of block b into the row's q where int4_position / int8_position say.
MEMLM_AVX2 float quantize_block_avx2(const float* x, int8_t* q, int64_t b, const Acts& a, bool int4, int* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.f), largest = _mm256_set1_ps(FLT_MAX);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    const __m256 abs = _mm256_andnot_ps(sign, v[i]);
    amax = _mm256_max_ps(amax, abs);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(abs, largest, _CMP_NLE_UQ));  // inf or nan
  }
  const bool finite = _mm256_movemask_ps(bad) == 0;
  const float d = finite ? hmax(amax) / 127.f : NAN;
  const __m256 id = _mm256_set1_ps(finite && d != 0.f ? 1.f / d : 0.f);
  __m256i c[4];
  for (int i = 0; i < 4; ++i)
    c[i] = finite ? _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
                  : _mm256_setzero_si256();
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  *qsum = static_cast<int>(hsum(_mm256_cvtepi32_ps(total)));  // small integers: exact in float
  // The packs work per 128-bit lane, leaving 4-byte runs in the order 0 2 4 6 1 3 5 7.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  __m256i codes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (!int4 && a.layout != Layout::kTiles && b >= 4 * a.quads) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), codes);
    return d;
  }
  if (int4) {
    // Within each 16-byte lane: 8 even-column codes, then 8 odd; then gather the even halves of
    // both lanes, then the odd halves: [16 even | 16 odd].
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    codes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(codes, split), _MM_SHUFFLE(3, 1, 2, 0));
  }
  if (a.layout == Layout::kTiles) {  // 4 codes at a time, in tile order
    alignas(32) int32_t four[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(four), codes);
    for (int k = 0; k < 8; ++k) std::memcpy(q + tile_position(b, 4 * k, a), four + k, 4);
    return d;
  }
  // Four runs of 8 codes: int4 even 0-7, even 8-15, odd 0-7, odd 8-15; int8 bytes 0-7 ... 24-31.
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  static constexpr int kInt4First[4] = {0, 16, 1, 17};  // the first element of each run
  for (int k = 0; k < 4; ++k) {
    const int64_t at = int4 ? int4_position(b, kInt4First[k], a) : int8_position(b, 8 * k, a);
    store8(q + at, k < 2 ? lo : hi, k % 2 == 1);
  }
  return d;
}
#endif

// Quantizes rows [r0, r1) of x (rows x in, float) into `a`, in the int4 layout (int4 = true,
// with weight groups of `group` inputs) or the int8 one.
void quantize_rows(const float* x, int64_t r0, int64_t r1, bool int4, int64_t group, Acts& a, Isa isa) {
  const int64_t in = a.in, blocks = a.blocks, per_group = group / kBlock;
  const bool simd = isa >= kAvx2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * in;
    int8_t* q = a.q.data() + row_start(r, a);
    float* d = a.d.data() + r * a.d_stride;
    float* lanes = a.d_lanes.data() + r * a.lanes_stride;
    float* sums = int4 ? a.sums.data() + r * a.sums_stride : nullptr;
    int32_t* corr = a.corr.empty() ? nullptr : a.corr.data() + r * a.quads * 8;
    if (int4) std::fill(sums, sums + a.sums_stride, 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = xr + b * kBlock;
      int qsum = 0;
      float db;
#ifdef MEMLM_X86
      if (simd) {
        db = quantize_block_avx2(xb, q, b, a, int4, &qsum);
      } else
#endif
      {
        if (int4)
          db = quantize_block_scalar(xb, [&](int j, int8_t v) { q[int4_position(b, j, a)] = v; }, &qsum);
        else
          db = quantize_block_scalar(xb, [&](int j, int8_t v) { q[int8_position(b, j, a)] = v; }, &qsum);
      }
      d[b] = db;
      const bool in_quad = b < 4 * a.quads;
      if ((int4 && a.layout != Layout::kTiles) || in_quad) {
        float* l = lanes + lane_of_block(b, int4, a);
        std::fill(l, l + (in_quad ? 2 : 4), db);
      }
      if (corr && in_quad) corr[lane_of_block(b, false, a)] = -128 * qsum;
      if (int4) sums[b / per_group] += db * static_cast<float>(qsum);
    }
    if (int4) {
      // The kernel reads the mins of the last groups < 8 as the 8 mins ending at the row's end
      // (no read past it); these sums line up with that load, zero where a group was counted.
      const int64_t groups = in / group, full = groups / 8 * 8;
      float* tail = sums + a.sums_stride - 8;
      for (int64_t j = 0; j < 8 && groups >= 8; ++j) tail[j] = groups - 8 + j >= full ? sums[groups - 8 + j] : 0.f;
    }
  }
}

void prepare_acts(Acts& a, int64_t rows, int64_t in, bool int4, int64_t group, Layout layout) {
  a.layout = layout;
  a.rows = rows;
  a.in = in;
  a.blocks = in / kBlock;
  a.quads = layout == Layout::kQuads ? a.blocks / 4 : 0;
  if (layout == Layout::kTiles) {
    a.np = 1;
    while (a.np < std::min(rows, kTileRows)) a.np *= 2;
    a.tile_cols = a.np <= kTileRows / 2 ? 2 * a.np : a.np;
    a.row_groups = (rows + kTileRows - 1) / kTileRows;
    a.q.assign(a.row_groups * row_start(kTileRows, a), 0);
    a.tile_d.assign(a.row_groups * a.tile_units() * 16, 0.f);
    if (int4) a.tile_sums.assign(a.row_groups * (in / group) * 16, 0.f);
  } else {
    a.q.assign(rows * in, 0);
  }
  a.d_stride = round_up(a.blocks, 8);
  a.d.assign(rows * a.d_stride, 0.f);
  const bool pairs = int4 && layout != Layout::kTiles;
  a.lanes_stride = 8 * a.quads + (pairs ? 4 * round_up(a.blocks - 4 * a.quads, 2) : 0);
  a.d_lanes.assign(rows * a.lanes_stride, 0.f);
  if (int4) {
    a.sums_stride = round_up(in / group, 8) + 8;
    a.sums.assign(rows * a.sums_stride, 0.f);
  } else {
    a.corr.assign(rows * a.quads * 8, 0);
  }
}

// A unit's product, stored, is 16 x tile_cols int32: element e of 16 holds column e % tile_cols,
// that is row (e % tile_cols) % np of the group and, paired, block 2u + (e % tile_cols) / np.
void finish_tiles(Acts& a, bool int4, int64_t group) {
  const int64_t groups = a.in / group, units = a.tile_units();
  for (int64_t rg = 0; rg < a.row_groups; ++rg)
    for (int64_t e = 0; e < 16; ++e) {
      const int64_t col = e % a.tile_cols, r = rg * kTileRows + col % a.np, second = col / a.np;
      if (r >= a.rows) continue;
      for (int64_t u = 0; u < units; ++u) {
        const int64_t b = a.paired() ? 2 * u + second : u;
        if (b < a.blocks) a.tile_d[(rg * units + u) * 16 + e] = a.d[r * a.d_stride + b];
      }
      if (int4 && second == 0)  // the min term once per row, in the first block's columns
        for (int64_t g = 0; g < groups; ++g) a.tile_sums[(rg * groups + g) * 16 + e] = a.sums[r * a.sums_stride + g];
    }
}

// ------------------------------------------------------------------ dot products

// The portable kernels: weight rows [o0, o1) against every activation row, into y (rows x out),
// with the same integer sums and the same products as the SIMD ones. Each activation row is first
// put back in natural order (the layouts only serve the SIMD loads).
std::vector<int8_t> natural_codes(const Acts& a, int64_t r, bool int4) {
  std::vector<int8_t> codes(a.in);
  const int8_t* q = a.q.data() + row_start(r, a);
  for (int64_t b = 0; b < a.blocks; ++b)
    for (int64_t j = 0; j < kBlock; ++j)
      codes[b * kBlock + j] = q[int4 ? int4_position(b, j, a) : int8_position(b, j, a)];
  return codes;
}

void int4_scalar(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  const int64_t per_group = w.group / kBlock;
  for (int64_t r = 0; r < a.rows; ++r) {
    const std::vector<int8_t> x = natural_codes(a, r, true);
    const float* d = a.d.data() + r * a.d_stride;
    const float* sums = a.sums.data() + r * a.sums_stride;
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* wr = w.packed + o * (w.in / 2);
      const c10::Half* s = w.scales + o * w.groups;
      const c10::Half* m = w.mins + o * w.groups;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        int isum = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = wr[b * 16 + j];
          isum += (byte & 15) * x[b * kBlock + 2 * j] + (byte >> 4) * x[b * kBlock + 2 * j + 1];
        }
        acc += static_cast<float>(isum) * (static_cast<float>(s[b / per_group]) * d[b]);
      }
      for (int64_t g = 0; g < w.groups; ++g) acc += static_cast<float>(m[g]) * sums[g];
      y[r * w.out + o] = acc;
    }
  }
}

void int8_scalar(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const std::vector<int8_t> x = natural_codes(a, r, false);
    const float* d = a.d.data() + r * a.d_stride;
    for (int64_t o = o0; o < o1; ++o) {
      const int8_t* wr = w.codes + o * w.in;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        int isum = 0;
        for (int j = 0; j < kBlock; ++j) isum += wr[b * kBlock + j] * x[b * kBlock + j];
        const float fac = w.groups ? w.scales[o * w.groups + b * kBlock / w.group] * d[b] : d[b];
        acc += static_cast<float>(isum) * fac;
      }
      y[r * w.out + o] = w.groups ? acc : acc * w.scales[o];
    }
  }
}

// Where the 8 groups (scales, mins, block scales) covering group g onwards are loaded from: g,
// or for the last few groups of a row the 8 that end the row, so no load reads past it. Rows
// with fewer than 8 groups start at 0 (and are loaded padded).
inline int64_t chunk_start(int64_t g, int64_t groups) { return std::max<int64_t>(0, std::min(g, groups - 8)); }

#ifdef MEMLM_X86
namespace avx2 {
#define MEMLM_SIMD MEMLM_AVX2
#define MEMLM_VNNI 0
#include "simd_kernels.h"
#undef MEMLM_VNNI
#undef MEMLM_SIMD
}  // namespace avx2

namespace avx_vnni {
#define MEMLM_SIMD __attribute__((target("avx2,fma,f16c,avxvnni")))
#define MEMLM_VNNI 1
#include "simd_kernels.h"
#undef MEMLM_VNNI
#undef MEMLM_SIMD
}  // namespace avx_vnni
#endif

// Calls the kernel of the path in use (kAmx's one-row and many-row kernels are AVX-VNNI's).
#ifdef MEMLM_X86
#define MEMLM_BY_ISA(kernel, portable, ...)                                   \
  if (isa >= kAvxVnni) return avx_vnni::kernel(__VA_ARGS__);                 \
  if (isa == kAvx2) return avx2::kernel(__VA_ARGS__);                        \
  portable
#else
#define MEMLM_BY_ISA(kernel, portable, ...) portable
#endif

void int4_tile(const Int4Weights& w, int64_t o, int nr, const Acts& a, float* y, Isa isa) {
  MEMLM_BY_ISA(int4_tile, int4_scalar(w, o, o + nr, a, y), w, o, nr, a, y);
}

void int8_tile(const Int8Weights& w, int64_t o, int nr, const Acts& a, float* y, Isa isa) {
  MEMLM_BY_ISA(int8_tile, int8_scalar(w, o, o + nr, a, y), w, o, nr, a, y);
}

void int4_rows(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y, Isa isa) {
  MEMLM_BY_ISA(int4_rows, int4_scalar(w, o0, o1, a, y), w, o0, o1, a, y);
}

void int8_rows(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y, Isa isa) {
  MEMLM_BY_ISA(int8_rows, int8_scalar(w, o0, o1, a, y), w, o0, o1, a, y);
}
#undef MEMLM_BY_ISA

// ------------------------------------------------------------------ dequantization (long prefills)

// Rows o..o+n-1 of an int4 weight as floats: q * scale + min, a multiply then an add (no FMA),
// the arithmetic of memlm.compress.quantize.dequantize_groups.
void dequant_int4_scalar(const Int4Weights& w, int64_t o, int64_t n, float* dst) {
  for (int64_t r = o; r < o + n; ++r, dst += w.in) {
    const uint8_t* p = w.packed + r * (w.in / 2);
    for (int64_t g = 0; g < w.groups; ++g) {
      const float s = static_cast<float>(w.scales[r * w.groups + g]);
      const float m = static_cast<float>(w.mins[r * w.groups + g]);
      for (int64_t j = g * w.group / 2; j < (g + 1) * w.group / 2; ++j) {
        const float lo = static_cast<float>(p[j] & 15) * s, hi = static_cast<float>(p[j] >> 4) * s;
        dst[2 * j] = lo + m;
        dst[2 * j + 1] = hi + m;
      }
    }
  }
}

void dequant_int8_scalar(const Int8Weights& w, int64_t o, int64_t n, float* dst) {
  const int64_t group = w.groups ? w.group : w.in;
  for (int64_t r = o; r < o + n; ++r, dst += w.in) {
    const int8_t* q = w.codes + r * w.in;
    for (int64_t g = 0; g < w.in / group; ++g) {
      const float s = w.groups ? w.scales[r * w.groups + g] : w.scales[r];
      for (int64_t j = g * group; j < (g + 1) * group; ++j) dst[j] = static_cast<float>(q[j]) * s;
    }
  }
}

#ifdef MEMLM_X86
MEMLM_AVX2 void dequant_int4_avx2(const Int4Weights& w, int64_t o, int64_t n, float* dst) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t r = o; r < o + n; ++r, dst += w.in) {
    const uint8_t* p = w.packed + r * (w.in / 2);
    for (int64_t g = 0; g < w.groups; ++g) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(w.scales[r * w.groups + g].x));
      const __m256 m = _mm256_set1_ps(_cvtsh_ss(w.mins[r * w.groups + g].x));
      for (int64_t j = g * w.group / 2; j < (g + 1) * w.group / 2; j += 16) {  // 16 bytes, 32 codes
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        const __m128i c[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // natural order
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 2; ++e) {
            const __m128i eight = e ? _mm_srli_si128(c[h], 8) : c[h];
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
            _mm256_storeu_ps(dst + 2 * j + 16 * h + 8 * e, _mm256_add_ps(_mm256_mul_ps(q, s), m));
          }
      }
    }
  }
}

MEMLM_AVX2 void dequant_int8_avx2(const Int8Weights& w, int64_t o, int64_t n, float* dst) {
  const int64_t group = w.groups ? w.group : w.in;
  for (int64_t r = o; r < o + n; ++r, dst += w.in) {
    const int8_t* q = w.codes + r * w.in;
    for (int64_t g = 0; g < w.in / group; ++g) {
      const __m256 s = _mm256_set1_ps(w.groups ? w.scales[r * w.groups + g] : w.scales[r]);
      for (int64_t j = g * group; j < (g + 1) * group; j += 8) {  // groups are multiples of 32
        const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), s));
      }
    }
  }
}
#endif

void dequant_int4(const Int4Weights& w, int64_t o, int64_t n, float* dst, Isa isa) {
#ifdef MEMLM_X86
  if (isa >= kAvx2) return dequant_int4_avx2(w, o, n, dst);
#endif
  dequant_int4_scalar(w, o, n, dst);
}

void dequant_int8(const Int8Weights& w, int64_t o, int64_t n, float* dst, Isa isa) {
#ifdef MEMLM_X86
  if (isa >= kAvx2) return dequant_int8_avx2(w, o, n, dst);
#endif
  dequant_int8_scalar(w, o, n, dst);
}

}  // namespace memlm::kernels
