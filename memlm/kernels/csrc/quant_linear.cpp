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
// and, shifted by 4, the high nibbles (the odd columns).
//
// Two code paths compute exactly the same integer sums: AVX2 (+FMA, F16C), chosen at run time,
// and plain C++. The SIMD functions carry a target attribute instead of the file being compiled
// with -mavx2, so the compiler cannot slip AVX2 instructions into the portable path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define MEMLM_X86 1
#include <immintrin.h>
#define MEMLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace memlm {
namespace {

constexpr int64_t kBlock = 32;  // activation block: one scale per 32 inputs, as llama.cpp's q8
constexpr int kTile = 4;        // output rows per inner loop: each activation load feeds 4 rows

// Below this many weight bytes per thread, waking a second thread costs more than it saves
// (an OpenMP fork/join is a few microseconds; 32 KB of int4 codes take about that long).
constexpr int64_t kMinBytesPerTask = 32 * 1024;

bool cpu_has_avx2() {
#ifdef MEMLM_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// Tests switch this off to check the portable path on an AVX2 machine.
std::atomic<bool> g_use_simd{cpu_has_avx2()};

// ------------------------------------------------------------------ quantized activations

// All activation rows, quantized once per call before any dot product.
//   q:    rows x in int8 codes, in the int4 order described above or in natural order (int8)
//   d:    rows x d_stride floats; int4: 8 per pair of blocks, [d0 d0 d0 d0 d1 d1 d1 d1] (the lane
//         layout of the pair's integer sums); int8: one per block
//   sums: int4 only, rows x sums_stride floats, per weight group: sum over its blocks of d*sum(q)
//         (what the group's min multiplies), zero-padded to a multiple of 8; then 8 more, the
//         last 8 groups' sums with those already in a full chunk of 8 zeroed (see tail_sums)
struct Acts {
  int64_t rows = 0, in = 0, blocks = 0, d_stride = 0, sums_stride = 0;
  std::vector<int8_t> q;
  std::vector<float> d, sums;
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where element j (0..31) of block b goes in the int4 order. A trailing single block (an odd
// block count) is stored [16 even | 16 odd].
inline int64_t int4_position(int64_t b, int64_t j, int64_t blocks) {
  const int64_t pair = b / 2, half = b % 2;
  const bool single = (b == blocks - 1) && (blocks % 2 == 1);
  const int64_t odd_offset = single ? 16 : 32;
  return pair * 64 + half * 16 + (j % 2) * odd_offset + j / 2;
}

// One block, portable: returns d and sets *qsum; writes codes via `place(j, code)`.
template <typename Place>
float quantize_block_scalar(const float* x, Place place, int* qsum) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int j = 0; j < kBlock; ++j) {
    const int v = static_cast<int>(std::nearbyint(x[j] * id));  // ties to even, as torch.round
    place(j, static_cast<int8_t>(v));
    sum += v;
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

// One block with AVX2: the same arithmetic as quantize_block_scalar, bit for bit. Returns d and
// sets *qsum; writes the codes of block b into q in the int4 order or natural order.
MEMLM_AVX2 float quantize_block_avx2(const float* x, int8_t* q, int64_t b, int64_t blocks, bool int4, int* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  const float d = hmax(amax) / 127.f;
  const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
  __m256i c[4];
  for (int i = 0; i < 4; ++i)
    c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  *qsum = static_cast<int>(hsum(_mm256_cvtepi32_ps(total)));  // small integers: exact in float
  // The packs work per 128-bit lane, leaving 4-byte runs in the order 0 2 4 6 1 3 5 7.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  const __m256i codes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (!int4) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), codes);
    return d;
  }
  // Within each 16-byte lane: 8 even-column codes, then 8 odd; then gather the even halves of
  // both lanes, then the odd halves: [16 even | 16 odd], stored where int4_position says.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(codes, split), _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + int4_position(b, 0, blocks)), _mm256_castsi256_si128(eo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + int4_position(b, 1, blocks)), _mm256_extracti128_si256(eo, 1));
  return d;
}
#endif

// Quantizes rows [r0, r1) of x (rows x in, float) into `a`, in the int4 order (int4 = true,
// with weight groups of `group` inputs) or natural order.
void quantize_rows(const float* x, int64_t r0, int64_t r1, bool int4, int64_t group, Acts& a) {
  const int64_t in = a.in, blocks = a.blocks, per_group = group / kBlock;
  const bool simd = g_use_simd.load(std::memory_order_relaxed);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * in;
    int8_t* q = a.q.data() + r * in;
    float* d = a.d.data() + r * a.d_stride;
    float* sums = int4 ? a.sums.data() + r * a.sums_stride : nullptr;
    if (int4) std::fill(sums, sums + a.sums_stride, 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = xr + b * kBlock;
      int qsum = 0;
      float db;
#ifdef MEMLM_X86
      if (simd) {
        db = quantize_block_avx2(xb, q, b, blocks, int4, &qsum);
      } else
#endif
      {
        if (int4)
          db = quantize_block_scalar(xb, [&](int j, int8_t v) { q[int4_position(b, j, blocks)] = v; }, &qsum);
        else
          db = quantize_block_scalar(xb, [&](int j, int8_t v) { q[b * kBlock + j] = v; }, &qsum);
      }
      if (int4) {
        float* lanes = d + (b / 2) * 8 + (b % 2) * 4;
        std::fill(lanes, lanes + 4, db);
        sums[b / per_group] += db * static_cast<float>(qsum);
      } else {
        d[b] = db;
      }
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

Acts quantize_acts(const float* x, int64_t rows, int64_t in, bool int4, int64_t group) {
  Acts a;
  a.rows = rows;
  a.in = in;
  a.blocks = in / kBlock;
  a.q.resize(rows * in);
  if (int4) {
    a.d_stride = round_up(a.blocks, 2) * 4;  // 8 lanes per pair; a trailing single pads with 0
    a.sums_stride = round_up(in / group, 8) + 8;
    a.d.assign(rows * a.d_stride, 0.f);
    a.sums.assign(rows * a.sums_stride, 0.f);
  } else {
    a.d_stride = a.blocks;
    a.d.assign(rows * a.d_stride, 0.f);
  }
  // Prefill: rows are independent; a decode step (one row) stays on this thread.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / in),
                   [&](int64_t r0, int64_t r1) { quantize_rows(x, r0, r1, int4, group, a); });
  return a;
}

// ------------------------------------------------------------------ int4 dot products
//
// Every kernel below computes one tile: `nr` (<= kTile) consecutive weight rows starting at row
// o, against every activation row, into y (rows x out). The tile's weights (4 x in/2 bytes) stay
// in L1 while the activation rows pass by, so a prefill reads its weights from memory once.

struct Int4Weights {
  const uint8_t* packed;    // out x in/2
  const c10::Half* scales;  // out x groups
  const c10::Half* mins;    // out x groups
  int64_t in, out, groups, group;
};

void int4_tile_scalar(const Int4Weights& w, int64_t o, int nr, const Acts& a, float* y) {
  const int64_t per_group = w.group / kBlock;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d = a.d.data() + r * a.d_stride;
    const float* sums = a.sums.data() + r * a.sums_stride;
    for (int i = 0; i < nr; ++i) {
      const uint8_t* wr = w.packed + (o + i) * (w.in / 2);
      const c10::Half* s = w.scales + (o + i) * w.groups;
      const c10::Half* m = w.mins + (o + i) * w.groups;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        const int8_t* even = q + int4_position(b, 0, a.blocks);
        const int8_t* odd = q + int4_position(b, 1, a.blocks);
        int isum = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = wr[b * 16 + j];
          isum += (byte & 15) * even[j] + (byte >> 4) * odd[j];
        }
        const float db = d[(b / 2) * 8 + (b % 2) * 4];
        acc += static_cast<float>(isum) * (static_cast<float>(s[b / per_group]) * db);
      }
      for (int64_t g = 0; g < w.groups; ++g) acc += static_cast<float>(m[g]) * sums[g];
      y[r * w.out + o + i] = acc;
    }
  }
}

#ifdef MEMLM_X86
MEMLM_AVX2 inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }

// [s0 s0 s0 s0 s1 s1 s1 s1] from the two float16 scales at s (group 32: a pair's two blocks).
MEMLM_AVX2 inline __m256 pair_scales(const c10::Half* s) {
  int32_t two;
  std::memcpy(&two, s, 4);
  const __m128i spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
  return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128(two), spread));
}

// 8 float16 values from p as floats.
MEMLM_AVX2 inline __m256 load8_halves(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// [sum of a0's lanes, a1's, a2's, a3's].
MEMLM_AVX2 inline __m128 hsum4(const __m256* a) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <int NR>
MEMLM_AVX2 inline void store_tile(float* y, __m128 v) {
  if (NR == kTile) {
    _mm_storeu_ps(y, v);
  } else {
    alignas(16) float t[kTile];
    _mm_store_ps(t, v);
    for (int i = 0; i < NR; ++i) y[i] = t[i];
  }
}

// acc[i] += (integer dot of pair k with weight row i) * scale[i] * d, for NR rows.
template <int NR>
MEMLM_AVX2 inline void int4_pair(const uint8_t* const* wr, int64_t k, __m256i x_even, __m256i x_odd, __m256 dk,
                                 const __m256* scale, __m256* acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < NR; ++i) {
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[i] + k * 32));
    const __m256i lo = _mm256_and_si256(codes, low4);                        // even columns
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);  // odd columns
    // u8 x s8 pairs to s16: at most 2 * 15 * 127 each, twice that after the add: no saturation.
    const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_even), _mm256_maddubs_epi16(hi, x_odd));
    const __m256i isum = _mm256_madd_epi16(p16, ones);  // lanes 0-3: block 2k, 4-7: block 2k+1
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale[i], dk), acc[i]);
  }
}

// G32: a scale per block (a pair has two); otherwise group % 64 == 0 and whole pairs share one.
// Scales are converted from float16 8 at a time (one row's 8 groups), then each pair's lanes are
// picked out with a permute; a row whose group count is not a multiple of 8 takes its last 8
// groups as the 8 that end the row, so no load reads past it.
template <int NR, bool G32>
MEMLM_AVX2 void int4_tile_avx2(const Int4Weights& w, int64_t o, const Acts& a, float* y) {
  const uint8_t* wr[NR];
  const c10::Half *s[NR], *m[NR];
  for (int i = 0; i < NR; ++i) {
    wr[i] = w.packed + (o + i) * (w.in / 2);
    s[i] = w.scales + (o + i) * w.groups;
    m[i] = w.mins + (o + i) * w.groups;
  }
  const int64_t pairs = a.blocks / 2, groups = w.groups, full = groups / 8 * 8;
  const int64_t pairs_per_chunk = G32 ? 4 : 8 * (w.group / 64);  // pairs covered by 8 groups
  const int64_t pairs_per_group = G32 ? 1 : w.group / 64;
  const bool short_row = groups < 8;  // tiny layers: scales one pair at a time
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d = a.d.data() + r * a.d_stride;
    const float* sums = a.sums.data() + r * a.sums_stride;
    __m256 acc[kTile], chunk[NR], scale[NR];
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < pairs; ++k) {
      if (k % pairs_per_chunk == 0 && !short_row) {
        const int64_t first = std::min(k / pairs_per_chunk * 8, groups - 8);
        for (int i = 0; i < NR; ++i) chunk[i] = load8_halves(s[i] + first);
      }
      const int64_t first = std::min(k / pairs_per_chunk * 8, groups - 8);
      if (G32) {  // lanes 0-3 take group 2k's scale, lanes 4-7 group 2k+1's
        const __m256i lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_set1_epi32(2 * k - first));
        for (int i = 0; i < NR; ++i)
          scale[i] = short_row ? pair_scales(s[i] + 2 * k) : _mm256_permutevar8x32_ps(chunk[i], lanes);
      } else if (k % pairs_per_group == 0) {
        const int64_t g = k / pairs_per_group;
        const __m256i lanes = _mm256_set1_epi32(g - first);
        for (int i = 0; i < NR; ++i)
          scale[i] = short_row ? _mm256_set1_ps(half_to_float(s[i][g])) : _mm256_permutevar8x32_ps(chunk[i], lanes);
      }
      const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 64));
      const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 64 + 32));
      int4_pair<NR>(wr, k, x_even, x_odd, _mm256_loadu_ps(d + k * 8), scale, acc);
    }
    if (G32 && a.blocks % 2) {  // a trailing single block, stored [16 even | 16 odd]
      const int64_t b = a.blocks - 1;
      const __m128i low4 = _mm_set1_epi8(0x0F);
      const __m128i x_even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + pairs * 64));
      const __m128i x_odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + pairs * 64 + 16));
      for (int i = 0; i < NR; ++i) {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[i] + b * 16));
        const __m128i lo = _mm_and_si128(codes, low4), hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low4);
        const __m128i p16 = _mm_add_epi16(_mm_maddubs_epi16(lo, x_even), _mm_maddubs_epi16(hi, x_odd));
        const __m256i isum = _mm256_zextsi128_si256(_mm_madd_epi16(p16, _mm_set1_epi16(1)));
        const __m256 fac = _mm256_set1_ps(half_to_float(s[i][b]) * d[pairs * 8]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), fac, acc[i]);
      }
    }
    // The min term: sum over groups of min * (sum over the group's blocks of d * sum(q)).
    for (int64_t g = 0; g < full; g += 8) {
      const __m256 sv = _mm256_loadu_ps(sums + g);
      for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(load8_halves(m[i] + g), sv, acc[i]);
    }
    if (full < groups && !short_row) {  // the last 8 groups, with tail sums zero where counted
      const __m256 sv = _mm256_loadu_ps(sums + a.sums_stride - 8);
      for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(load8_halves(m[i] + groups - 8), sv, acc[i]);
    } else if (short_row) {
      for (int i = 0; i < NR; ++i) {
        float extra = 0.f;
        for (int64_t g = 0; g < groups; ++g) extra += half_to_float(m[i][g]) * sums[g];
        acc[i] = _mm256_add_ps(acc[i], _mm256_zextps128_ps256(_mm_set_ss(extra)));
      }
    }
    store_tile<NR>(y + r * w.out + o, hsum4(acc));
  }
}
#endif

void int4_tile(const Int4Weights& w, int64_t o, int nr, const Acts& a, float* y, bool simd) {
#ifdef MEMLM_X86
  if (simd) {
    // One instance per row count and scale layout; all take the same arguments.
    using Tile = void (*)(const Int4Weights&, int64_t, const Acts&, float*);
    static constexpr Tile g32[] = {int4_tile_avx2<1, true>, int4_tile_avx2<2, true>, int4_tile_avx2<3, true>,
                                   int4_tile_avx2<4, true>};
    static constexpr Tile wide[] = {int4_tile_avx2<1, false>, int4_tile_avx2<2, false>,
                                    int4_tile_avx2<3, false>, int4_tile_avx2<4, false>};
    return (w.group == kBlock ? g32 : wide)[nr - 1](w, o, a, y);
  }
#endif
  int4_tile_scalar(w, o, nr, a, y);
}

// ------------------------------------------------------------------ int8 dot products

struct Int8Weights {
  const int8_t* codes;  // out x in
  const float* scales;  // out (per row) or out x groups
  int64_t in, out, groups, group;  // groups == 0: one scale per row
};

void int8_tile_scalar(const Int8Weights& w, int64_t o, int nr, const Acts& a, float* y) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d = a.d.data() + r * a.d_stride;
    for (int i = 0; i < nr; ++i) {
      const int8_t* wr = w.codes + (o + i) * w.in;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        int isum = 0;
        for (int j = 0; j < kBlock; ++j) isum += wr[b * kBlock + j] * q[b * kBlock + j];
        const float fac = w.groups ? w.scales[(o + i) * w.groups + b * kBlock / w.group] * d[b] : d[b];
        acc += static_cast<float>(isum) * fac;
      }
      y[r * w.out + o + i] = w.groups ? acc : acc * w.scales[o + i];
    }
  }
}

#ifdef MEMLM_X86
// GROUPED: a float32 scale per group of w.group inputs; else one per row, applied at the end.
template <int NR, bool GROUPED>
MEMLM_AVX2 void int8_tile_avx2(const Int8Weights& w, int64_t o, const Acts& a, float* y) {
  const int8_t* wr[NR];
  const float* s[NR];
  for (int i = 0; i < NR; ++i) {
    wr[i] = w.codes + (o + i) * w.in;
    s[i] = GROUPED ? w.scales + (o + i) * w.groups : w.scales + o + i;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t blocks_per_group = GROUPED ? w.group / kBlock : a.blocks;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d = a.d.data() + r * a.d_stride;
    __m256 acc[kTile], scale[NR];
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0, g = 0; b < a.blocks; ++g) {
      if (GROUPED)
        for (int i = 0; i < NR; ++i) scale[i] = _mm256_set1_ps(s[i][g]);
      for (const int64_t end = b + blocks_per_group; b < end; ++b) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
        const __m256 db = _mm256_set1_ps(d[b]);
        for (int i = 0; i < NR; ++i) {
          const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[i] + b * kBlock));
          // maddubs wants one unsigned operand: |w| times x with w's sign (2 * 128 * 127 fits s16).
          const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(codes), _mm256_sign_epi8(x, codes));
          const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
          acc[i] = _mm256_fmadd_ps(isum, GROUPED ? _mm256_mul_ps(scale[i], db) : db, acc[i]);
        }
      }
    }
    __m128 v = hsum4(acc);
    if (!GROUPED) {
      alignas(16) float row_scale[kTile] = {0.f, 0.f, 0.f, 0.f};
      for (int i = 0; i < NR; ++i) row_scale[i] = s[i][0];
      v = _mm_mul_ps(v, _mm_load_ps(row_scale));
    }
    store_tile<NR>(y + r * w.out + o, v);
  }
}
#endif

void int8_tile(const Int8Weights& w, int64_t o, int nr, const Acts& a, float* y, bool simd) {
#ifdef MEMLM_X86
  if (simd) {
    using Tile = void (*)(const Int8Weights&, int64_t, const Acts&, float*);
    static constexpr Tile grouped[] = {int8_tile_avx2<1, true>, int8_tile_avx2<2, true>, int8_tile_avx2<3, true>,
                                       int8_tile_avx2<4, true>};
    static constexpr Tile per_row[] = {int8_tile_avx2<1, false>, int8_tile_avx2<2, false>,
                                       int8_tile_avx2<3, false>, int8_tile_avx2<4, false>};
    return (w.groups ? grouped : per_row)[nr - 1](w, o, a, y);
  }
#endif
  int8_tile_scalar(w, o, nr, a, y);
}

// ------------------------------------------------------------------ the ops

// Runs tile(o, nr, y) over all tiles of kTile output rows, split across torch's threads.
template <typename Tile>
at::Tensor run_tiles(const at::Tensor& x, int64_t rows, int64_t out, int64_t weight_bytes, Tile tile) {
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (out + kTile - 1) / kTile;
  const int64_t tile_work = std::max<int64_t>(1, weight_bytes / out * kTile * rows);
  at::parallel_for(0, tiles, std::max<int64_t>(1, kMinBytesPerTask / tile_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t * kTile;
      tile(o, static_cast<int>(std::min<int64_t>(kTile, out - o)), yp);
    }
  });
  return y;
}

// Many rows (a long prefill): the float weights and torch's matmul (MKL / oneDNN, which the
// integer kernel cannot match once the weights are reused enough) give y = x @ W^T. The weights
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
      const __m256 s = _mm256_set1_ps(half_to_float(w.scales[r * w.groups + g]));
      const __m256 m = _mm256_set1_ps(half_to_float(w.mins[r * w.groups + g]));
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

void dequant_int4(const Int4Weights& w, int64_t o, int64_t n, float* dst, bool simd) {
#ifdef MEMLM_X86
  if (simd) return dequant_int4_avx2(w, o, n, dst);
#endif
  dequant_int4_scalar(w, o, n, dst);
}

void dequant_int8(const Int8Weights& w, int64_t o, int64_t n, float* dst, bool simd) {
#ifdef MEMLM_X86
  if (simd) return dequant_int8_avx2(w, o, n, dst);
#endif
  dequant_int8_scalar(w, o, n, dst);
}

// x (..., in) float32 / bfloat16 -> (rows, in) contiguous float32, after the shared checks.
at::Tensor flat_input(const char* op, const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x's last dimension must be in_features = ", in,
              ", got shape ", x.sizes());
  TORCH_CHECK(in % kBlock == 0, op, ": in_features must be a multiple of ", kBlock, ", got ", in);
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

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t dequant_rows) {
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
  const bool simd = g_use_simd.load(std::memory_order_relaxed);
  if (dequant_rows > 0 && rows >= dequant_rows) {
    auto dequant = [&](int64_t o, int64_t n, float* dst) { dequant_int4(w, o, n, dst, simd); };
    return shaped_output(x, dequant_matmul(xf, out, in, dequant), out);
  }
  const Acts a = quantize_acts(xf.data_ptr<float>(), rows, in, /*int4=*/true, group_size);
  const at::Tensor y = run_tiles(x, rows, out, out * in / 2,
                                 [&](int64_t o, int nr, float* yp) { int4_tile(w, o, nr, a, yp, simd); });
  return shaped_output(x, y, out);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t dequant_rows) {
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
  const bool simd = g_use_simd.load(std::memory_order_relaxed);
  if (dequant_rows > 0 && rows >= dequant_rows) {
    auto dequant = [&](int64_t o, int64_t n, float* dst) { dequant_int8(w, o, n, dst, simd); };
    return shaped_output(x, dequant_matmul(xf, out, in, dequant), out);
  }
  const Acts a = quantize_acts(xf.data_ptr<float>(), rows, in, /*int4=*/false, kBlock);
  const at::Tensor y = run_tiles(x, rows, out, out * in,
                                 [&](int64_t o, int nr, float* yp) { int8_tile(w, o, nr, a, yp, simd); });
  return shaped_output(x, y, out);
}

// Turns the SIMD path off (tests of the portable path) or back on where the CPU has it;
// returns whether SIMD is now in use.
bool set_simd(bool enabled) {
  g_use_simd.store(enabled && cpu_has_avx2());
  return g_use_simd.load();
}

}  // namespace
}  // namespace memlm

// A fragment, not TORCH_LIBRARY: other parts of memlm may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(memlm, m) {
  // dequant_rows: from this many activation rows on, dequantize-then-matmul (0: never).
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group_size, int dequant_rows=0) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w_int8, Tensor scales, int dequant_rows=0) -> Tensor");
  m.def("set_simd(bool enabled) -> bool", &memlm::set_simd);  // no tensors: one kernel for all
}

TORCH_LIBRARY_IMPL(memlm, CPU, m) {
  m.impl("int4_linear", &memlm::int4_linear);
  m.impl("int8_linear", &memlm::int8_linear);
}
