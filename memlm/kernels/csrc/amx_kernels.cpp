// The many-row kernels on AMX's int8 tiles (Intel Sapphire Rapids and later): per block of 32
// inputs, one tile dot product of 16 weight rows with up to 16 activation rows, then the block's
// scales in AVX-512. As in llama.cpp's AMX path for q4_1 / q8_0 (ggml-cpu/amx), the tile's depth
// is one block (32 bytes, not the 64 it could take), since every block has its own scales.
//
// Unlike llama.cpp, the weights are not repacked for the tiles: they are the A operand (16 rows x
// 32 codes, what a tile load takes from a plain row-major matrix), read where they lie (int8) or
// after unpacking the nibbles of 16 rows into a buffer of a few KB (int4). The activations, which
// are quantized per call anyway, are written straight into the B operand's layout (kTiles, see
// quant_kernels.cpp). The product of a block is stored (16 weight rows x np activation rows, np the
// row count rounded up to a power of 2) and scaled as np vectors of 16 (weight row, activation
// row) pairs, so the float work shrinks with the row count. With 8 rows or fewer, two blocks
// share a dot product of depth 64, side by side in the B operand (its columns np.. hold the
// second block, zeros elsewhere): half the dot products, each about as costly as one of depth
// 32, and with few rows the tile unit's latency, not the float work, is what limits.
//
// Linux hands the tile registers to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM),
// asked once by amx_usable(); each thread loads the tile configuration when its work begins and
// releases the tiles when it ends.

#include <algorithm>
#include <cstring>
#include <vector>

#include "quant_kernels.h"

#if defined(__x86_64__) && defined(__linux__)
#define MEMLM_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MEMLM_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#endif

namespace memlm::kernels {

bool amx_usable() {
#ifdef MEMLM_HAS_AMX
  static const bool usable = [] {
    if (!(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
          __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avxvnni")))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, <asm/fpu/types.h>
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

#ifdef MEMLM_HAS_AMX
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two slots, so that one unit's product is computed while the previous one's is scaled: tiles
// 0, 1 the weights of a unit (16 rows x 32 codes, or 64 for a pair of blocks); 2, 3 its
// activations (8 rows, or 16, of cols x 4 codes); 4, 5 the product (16 x cols int32). Pairs: 6, 7
// the weights and activations of a last, odd block (depth 32, into 4).
MEMLM_AMX void configure(const Acts& a) {
  TileConfig c;
  const int64_t depth = a.paired() ? 64 : 32;
  const auto cols = static_cast<uint16_t>(a.tile_cols * 4);
  for (int t = 0; t < 2; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(depth);
    c.rows[2 + t] = static_cast<uint8_t>(depth / 4);
    c.colsb[2 + t] = cols;
    c.rows[4 + t] = 16;
    c.colsb[4 + t] = cols;
  }
  if (a.paired()) {
    c.rows[6] = 16;
    c.colsb[6] = 32;
    c.rows[7] = 8;
    c.colsb[7] = cols;
  }
  _tile_loadconfig(&c);
}

// r[i] (16 rows of 16 floats) becomes its transpose: r[j] element i = old r[i] element j.
MEMLM_AMX void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // Per 128-bit lane L and rows 4i..4i+3: u[4i + c] = their column 4L + c.
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // Then a 4 x 4 transpose of the 128-bit lanes, for each c.
  for (int c = 0; c < 4; ++c) {
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
  }
}

// dst (cols x 16): the (m <= 16) rows x cols matrix src (row stride `cols`) transposed, as float,
// zero past row m.
template <typename T>
MEMLM_AMX void transposed(const T* src, int64_t m, int64_t cols, float* dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    __m512 r[16];
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= m) {
        r[i] = _mm512_setzero_ps();
      } else if constexpr (sizeof(T) == 2) {
        r[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src + i * cols + c0));
      } else {
        r[i] = _mm512_maskz_loadu_ps(mask, src + i * cols + c0);
      }
    }
    transpose16(r);
    for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(dst + (c0 + j) * 16, r[j]);
  }
}

// The codes of int4 weight rows o0..o0+m-1 as bytes, per block [16 low nibbles | 16 high]
// (the tile order of the activations), 16 rows of `in` bytes, zero past row m.
MEMLM_AMX void unpack_int4(const Int4Weights& w, int64_t o0, int64_t m, uint8_t* dst) {
  const int64_t blocks = w.in / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // 16-byte lanes: [low 0, high 0, low 1, high 1] and [low 2, high 2, low 3, high 3]
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t i = 0; i < 16; ++i) {
    uint8_t* d = dst + i * w.in;
    if (i >= m) {
      std::memset(d, 0, w.in);
      continue;
    }
    const uint8_t* p = w.packed + (o0 + i) * (w.in / 2);
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) {
      const __m512i c = _mm512_loadu_si512(p + b * 16);
      const __m512i lo = _mm512_and_si512(c, low4), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
      _mm512_storeu_si512(d + b * kBlock, _mm512_permutex2var_epi64(lo, first, hi));
      _mm512_storeu_si512(d + b * kBlock + 64, _mm512_permutex2var_epi64(lo, second, hi));
    }
    for (; b < blocks; ++b) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b * 16));
      const __m128i l4 = _mm512_castsi512_si128(low4);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + b * kBlock), _mm_and_si128(c, l4));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + b * kBlock + 16), _mm_and_si128(_mm_srli_epi16(c, 4), l4));
    }
  }
}

// dst (16 x cols): the m <= 16 rows x cols matrix src as float, zero past row m.
MEMLM_AMX void as_float(const c10::Half* src, int64_t m, int64_t cols, float* dst) {
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - c0)) - 1);
      const __m512 v = i < m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src + i * cols + c0)) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(dst + i * cols + c0, mask, v);
    }
}

// acc[v] element e stands for weight row v * (16 / COLS) + e / COLS of the tile and tile column
// e % COLS. spread: 16 values, one per weight row (row i at per_weight_row[i * stride]; COLS < 16:
// stride 1), as they line up with acc[v]; spread2 takes the first's for columns < NP (the first
// block of a pair) and the second's for the others.
template <int COLS>
MEMLM_AMX inline __m512i weight_rows(int v) {
  constexpr int shift = COLS == 1 ? 0 : COLS == 2 ? 1 : COLS == 4 ? 2 : COLS == 8 ? 3 : 4;
  const __m512i e = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_add_epi32(_mm512_set1_epi32(v * (16 / COLS)), _mm512_srli_epi32(e, shift));
}

template <int COLS>
MEMLM_AMX inline __m512 spread(const float* per_weight_row, int v, int64_t stride) {
  if constexpr (COLS == 16) {
    return _mm512_set1_ps(per_weight_row[v * stride]);
  } else {
    return _mm512_permutexvar_ps(weight_rows<COLS>(v), _mm512_loadu_ps(per_weight_row));
  }
}

template <int COLS, int NP>
MEMLM_AMX inline __m512 spread2(const float* first, const float* second, int v) {
  const __m512i e = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 later = _mm512_cmpge_epi32_mask(_mm512_and_si512(e, _mm512_set1_epi32(COLS - 1)), _mm512_set1_epi32(NP));
  const __m512i idx = _mm512_mask_add_epi32(weight_rows<COLS>(v), later, weight_rows<COLS>(v), _mm512_set1_epi32(16));
  return _mm512_permutex2var_ps(_mm512_loadu_ps(first), idx, _mm512_loadu_ps(second));
}

// What a tile needs besides the activations: A (the weight codes, 16 rows at stride lda) and the
// weight scales (and int4 mins) as float, the value of weight row i and group g at
// [i * row_stride + g * group_stride]: row-major for 16 activation rows (spread broadcasts them),
// transposed for fewer (spread permutes the 16 of a group).
struct WeightTile {
  const uint8_t* codes;
  int64_t lda;
  const float* scales;
  const float* mins;  // int4 only
  int64_t groups, per_group;  // per_group: blocks to a scale group (int8 per row: all)
  int64_t row_stride, group_stride;
};

// acc += a unit's product (16 x COLS int32) times its scales: the activations' d (16 floats, see
// Acts::tile_d) and, GROUPED, the weights' (16 floats, one per weight row) of each block's group.
template <int COLS, int NP, bool GROUPED>
MEMLM_AMX inline void scale_unit(const int32_t* product, const float* d16, const float* s, const float* s2,
                                 int64_t stride, __m512* acc) {
  const __m512 d = _mm512_loadu_ps(d16);
  for (int v = 0; v < COLS; ++v) {
    const __m512 p = _mm512_cvtepi32_ps(_mm512_load_si512(product + 16 * v));
    if constexpr (!GROUPED) {
      acc[v] = _mm512_fmadd_ps(p, d, acc[v]);
    } else {
      const __m512 sv = COLS > NP ? spread2<COLS, NP>(s, s2, v) : spread<COLS>(s, v, stride);
      acc[v] = _mm512_fmadd_ps(_mm512_mul_ps(p, d), sv, acc[v]);
    }
  }
}

// A slot (tiles A, B, C) computes the product of a unit. GCC's tile intrinsics paste the tile
// number into assembly text, so it must be a literal: one function per slot. Their tile loads do
// not tell the compiler that they read memory: tile_rows puts a barrier before them.
#define MEMLM_SLOT(NAME, A, B, C)                                                              \
  template <bool INT4>                                                                         \
  MEMLM_AMX inline void NAME(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ldb) {    \
    _tile_loadd(A, a, lda);                                                                    \
    _tile_loadd(B, b, ldb);                                                                    \
    _tile_zero(C);                                                                             \
    if constexpr (INT4)                                                                        \
      _tile_dpbusd(C, A, B); /* unsigned codes 0..15 times signed activations */               \
    else                                                                                       \
      _tile_dpbssd(C, A, B);                                                                   \
  }
MEMLM_SLOT(issue0, 0, 2, 4)
MEMLM_SLOT(issue1, 1, 3, 5)
MEMLM_SLOT(issue_last0, 6, 7, 4)  // a last, odd block where units are pairs: depth 32
MEMLM_SLOT(issue_last1, 6, 7, 5)
#undef MEMLM_SLOT

// Unit u of A (weights, lda) and B (activations of the row group, unit_b bytes a unit, ldb) into
// slot `slot`'s product; `last_odd`: u is the odd block after the last pair.
template <bool INT4>
MEMLM_AMX inline void issue(int slot, bool last_odd, const uint8_t* a, int64_t lda, const int8_t* b, int64_t ldb) {
  if (last_odd)
    slot == 0 ? issue_last0<INT4>(a, lda, b, ldb) : issue_last1<INT4>(a, lda, b, ldb);
  else
    slot == 0 ? issue0<INT4>(a, lda, b, ldb) : issue1<INT4>(a, lda, b, ldb);
}

// y for the tile's m weight rows from o0 and the activation rows of row group rg.
template <int NP, bool INT4, bool GROUPED>
MEMLM_AMX void tile_rows(const WeightTile& t, int64_t o0, int64_t m, int64_t out, const Acts& a, int64_t rg,
                         float* y) {
  constexpr bool PAIRED = NP <= 8;
  constexpr int COLS = PAIRED ? 2 * NP : NP;
  const int64_t blocks = a.blocks, units = a.tile_units(), depth = PAIRED ? 64 : 32, ldb = COLS * 4;
  const int8_t* bq = a.q.data() + rg * units * depth * COLS;  // unit u's B operand at bq + u * depth * COLS
  const float* dv = a.tile_d.data() + rg * units * 16;
  alignas(64) int32_t c[2][16 * COLS];
  __m512 acc[COLS];
  for (int v = 0; v < COLS; ++v) acc[v] = _mm512_setzero_ps();
  const int64_t last_odd = PAIRED && blocks % 2 == 1 ? units - 1 : -1;
  // The weight scales of the first and the second block of unit u (a single block: twice its own).
  const int64_t per_unit = PAIRED ? 2 : 1;
  auto first = [&](int64_t u) { return t.scales + (per_unit * u / t.per_group) * t.group_stride; };
  auto second = [&](int64_t u) {
    return t.scales + (std::min(per_unit * u + per_unit - 1, blocks - 1) / t.per_group) * t.group_stride;
  };
  asm volatile("" ::: "memory");  // the weight and activation buffers are written
  // Unit u + 1's product is computed while unit u's is scaled.
  issue<INT4>(0, last_odd == 0, t.codes, t.lda, bq, ldb);
  for (int64_t u = 0; u < units; u += 2) {
    if (u + 1 < units)
      issue<INT4>(1, last_odd == u + 1, t.codes + (u + 1) * depth, t.lda, bq + (u + 1) * depth * COLS, ldb);
    _tile_stored(4, c[0], ldb);
    scale_unit<COLS, NP, GROUPED>(c[0], dv + u * 16, first(u), second(u), t.row_stride, acc);
    if (u + 1 >= units) break;
    if (u + 2 < units)
      issue<INT4>(0, last_odd == u + 2, t.codes + (u + 2) * depth, t.lda, bq + (u + 2) * depth * COLS, ldb);
    _tile_stored(5, c[1], ldb);
    scale_unit<COLS, NP, GROUPED>(c[1], dv + (u + 1) * 16, first(u + 1), second(u + 1), t.row_stride, acc);
  }
  if constexpr (INT4) {  // the min term: sum over groups of min * (sum of d * sum(q) of its blocks)
    const float* sums = a.tile_sums.data() + rg * t.groups * 16;
    for (int64_t g = 0; g < t.groups; ++g) {
      const __m512 sv = _mm512_loadu_ps(sums + g * 16);
      for (int v = 0; v < COLS; ++v)
        acc[v] = _mm512_fmadd_ps(spread<COLS>(t.mins + g * t.group_stride, v, t.row_stride), sv, acc[v]);
    }
  }
  if constexpr (!INT4 && !GROUPED)
    for (int v = 0; v < COLS; ++v) acc[v] = _mm512_mul_ps(acc[v], spread<COLS>(t.scales, v, t.row_stride));
  const int64_t r0 = rg * kTileRows, valid_rows = std::min<int64_t>(NP, a.rows - r0);
  if constexpr (!PAIRED) {  // NP = 16, transposed: acc[e] holds activation row e over the 16 weight rows
    transpose16(acc);
    const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
    for (int64_t e = 0; e < valid_rows; ++e) _mm512_mask_storeu_ps(y + (r0 + e) * out + o0, mask, acc[e]);
  } else {  // a row's two blocks are NP columns apart: add them
    alignas(64) float flat[16 * COLS];
    const __m512i e = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i partner = _mm512_add_epi32(e, _mm512_set1_epi32(NP));
    for (int v = 0; v < COLS; ++v)
      _mm512_store_ps(flat + 16 * v, _mm512_add_ps(acc[v], _mm512_permutexvar_ps(partner, acc[v])));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < valid_rows; ++r) y[(r0 + r) * out + o0 + i] = flat[i * COLS + r];
  }
}

template <bool INT4, bool GROUPED>
MEMLM_AMX void tile_all_rows(const WeightTile& t, int64_t o0, int64_t m, int64_t out, const Acts& a, float* y) {
  using Rows = void (*)(const WeightTile&, int64_t, int64_t, int64_t, const Acts&, int64_t, float*);
  static constexpr Rows by_np[] = {tile_rows<1, INT4, GROUPED>, tile_rows<2, INT4, GROUPED>,
                                   tile_rows<4, INT4, GROUPED>, tile_rows<8, INT4, GROUPED>,
                                   tile_rows<16, INT4, GROUPED>};
  const int which = a.np == 1 ? 0 : a.np == 2 ? 1 : a.np == 4 ? 2 : a.np == 8 ? 3 : 4;
  for (int64_t rg = 0; rg < a.row_groups; ++rg) by_np[which](t, o0, m, out, a, rg, y);
}

}  // namespace

MEMLM_AMX void int4_tiles(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  configure(a);
  std::vector<uint8_t> codes(16 * w.in);
  std::vector<float> scales(w.groups * 16), mins(w.groups * 16);
  const bool row_major = a.np == kTileRows;
  const WeightTile t{codes.data(), w.in, scales.data(), mins.data(), w.groups, w.group / kBlock,
                     row_major ? w.groups : 1, row_major ? 1 : 16};
  for (int64_t o = o0; o < o1; o += 16) {
    const int64_t m = std::min<int64_t>(16, w.out - o);
    unpack_int4(w, o, m, codes.data());
    if (row_major) {
      as_float(w.scales + o * w.groups, m, w.groups, scales.data());
      as_float(w.mins + o * w.groups, m, w.groups, mins.data());
    } else {
      transposed(w.scales + o * w.groups, m, w.groups, scales.data());
      transposed(w.mins + o * w.groups, m, w.groups, mins.data());
    }
    tile_all_rows<true, true>(t, o, m, w.out, a, y);
  }
  _tile_release();
}

MEMLM_AMX void int8_tiles(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  configure(a);
  std::vector<uint8_t> partial;  // a last tile of fewer than 16 rows, zero-padded
  const int64_t groups = w.groups ? w.groups : 1;
  std::vector<float> scales(groups * 16);
  const bool row_major = a.np == kTileRows;
  for (int64_t o = o0; o < o1; o += 16) {
    const int64_t m = std::min<int64_t>(16, w.out - o);
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(w.codes + o * w.in);
    if (m < 16) {
      partial.assign(16 * w.in, 0);
      std::memcpy(partial.data(), codes, m * w.in);
      codes = partial.data();
    }
    const float* s = w.scales + o * groups;
    if (!row_major) {
      transposed(s, m, groups, scales.data());  // per row: one column of 16
      s = scales.data();
    } else if (m < 16) {
      std::fill(scales.begin(), scales.end(), 0.f);
      std::copy(s, s + m * groups, scales.begin());
      s = scales.data();
    }
    const WeightTile t{codes, w.in, s, nullptr, groups, w.groups ? w.group / kBlock : a.blocks,
                       row_major ? groups : 1, row_major ? 1 : 16};
    if (w.groups)
      tile_all_rows<false, true>(t, o, m, w.out, a, y);
    else
      tile_all_rows<false, false>(t, o, m, w.out, a, y);
  }
  _tile_release();
}

#else  // no AMX here: never called, as best_isa() never says kAmx

void int4_tiles(const Int4Weights&, int64_t, int64_t, const Acts&, float*) {}
void int8_tiles(const Int8Weights&, int64_t, int64_t, const Acts&, float*) {}

#endif

}  // namespace memlm::kernels
