// The SIMD tile kernels of quant_linear.cpp. This file is included there twice, inside two
// namespaces: once with MEMLM_SIMD = target("avx2,fma,f16c") and MEMLM_VNNI 0, once with
// AVX-VNNI added and MEMLM_VNNI 1. The only difference is how 4 bytes times 4 bytes are summed
// into a 32-bit lane (dot_u8s8 below): AVX2 needs maddubs + madd (3-4 instructions per pair of
// blocks), AVX-VNNI does it in one (vpdpbusd), about 10-15% faster on CPUs that have it. A
// target attribute cannot differ between instances of one template, hence the two inclusions.
//
// Every kernel computes one tile: NR (<= kTile) consecutive weight rows starting at row o,
// against every activation row, into y (rows x out). The tile's weights (4 x in/2 bytes for
// int4) stay in L1 while the activation rows pass by, so a prefill reads its weights once.
//
// Needs from the includer: kBlock, kTile, Acts, Int4Weights, Int8Weights, chunk_start.

MEMLM_SIMD inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }

// 8 float16 values from p as floats; n < 8: only n of them, the rest zero (tiny layers).
MEMLM_SIMD inline __m256 load8_halves(const c10::Half* p, int64_t n = 8) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, n * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// [sum of a[0]'s lanes, a[1]'s, a[2]'s, a[3]'s].
MEMLM_SIMD inline __m128 hsum4(const __m256* a) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <int NR>
MEMLM_SIMD inline void store_tile(float* y, __m128 v) {
  if (NR == kTile) {
    _mm_storeu_ps(y, v);
  } else {
    alignas(16) float t[kTile];
    _mm_store_ps(t, v);
    for (int i = 0; i < NR; ++i) y[i] = t[i];
  }
}

// acc + (sum of the 4 products u[j] * s[j] of each 32-bit lane), u unsigned, s signed bytes.
// maddubs makes 16-bit sums of 2 products, which saturate above 32767: the callers keep them
// below (at most 2 * 15 * 127 for int4 codes, 2 * 128 * 127 for int8).
MEMLM_SIMD inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if MEMLM_VNNI
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// ------------------------------------------------------------------ int4

// The integer sums of pair k (blocks 2k, 2k+1) with one weight row: lanes 0-3 block 2k's
// partial sums, 4-7 block 2k+1's.
MEMLM_SIMD inline __m256i int4_pair_sums(const uint8_t* row, int64_t k, __m256i x_even, __m256i x_odd) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k * 32));
  const __m256i lo = _mm256_and_si256(codes, low4);                        // even columns
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);  // odd columns
#if MEMLM_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, x_even), hi, x_odd);
#else
  // Adding the two 16-bit products first (at most 4 * 15 * 127) saves a madd.
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_even), _mm256_maddubs_epi16(hi, x_odd));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

// acc[i] += (integer sums of pair k with weight row i) * fac[i], for NR rows; fac holds the
// weight scale times the activation scale of block 2k (lanes 0-3) and 2k+1 (lanes 4-7).
template <int NR>
MEMLM_SIMD inline void int4_pair(const uint8_t* const* wr, int64_t k, const int8_t* q, const __m256* fac,
                                 __m256* acc) {
  const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 64));
  const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * 64 + 32));
  for (int i = 0; i < NR; ++i)
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_pair_sums(wr[i], k, x_even, x_odd)), fac[i], acc[i]);
}

// The trailing block b of a row with an odd block count (stored [16 even | 16 odd]); fac[i]:
// the weight scale times the activation scale.
template <int NR>
MEMLM_SIMD inline void int4_last_block(const uint8_t* const* wr, int64_t b, const int8_t* q, const float* fac,
                                       __m256* acc) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i x_even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
  const __m128i x_odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
  for (int i = 0; i < NR; ++i) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[i] + b * 16));
    const __m128i lo = _mm_and_si128(codes, low4), hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low4);
    const __m128i p16 = _mm_add_epi16(_mm_maddubs_epi16(lo, x_even), _mm_maddubs_epi16(hi, x_odd));
    const __m256i isum = _mm256_zextsi128_si256(_mm_madd_epi16(p16, _mm_set1_epi16(1)));
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(fac[i]), acc[i]);
  }
}

// acc[i] += the min term of weight row i: sum over groups of min * (sum over the group's blocks
// of d * sum(q)), 8 groups at a time.
template <int NR>
MEMLM_SIMD inline void int4_min_term(const c10::Half* const* m, int64_t groups, const Acts& a, const float* sums,
                                     __m256* acc) {
  const int64_t full = groups / 8 * 8;
  for (int64_t g = 0; g < full; g += 8) {
    const __m256 sv = _mm256_loadu_ps(sums + g);
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(load8_halves(m[i] + g), sv, acc[i]);
  }
  if (full == groups) return;
  // The last groups: the 8 mins ending the row against sums zeroed where already counted (see
  // quantize_rows), or, in a row of fewer than 8 groups, the padded mins against the sums.
  const int64_t start = chunk_start(full, groups);
  const __m256 sv = _mm256_loadu_ps(groups >= 8 ? sums + a.sums_stride - 8 : sums);
  for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(load8_halves(m[i] + start, groups - start), sv, acc[i]);
}

// Group 32: a weight scale per block. Per 4 pairs (8 blocks), 8 weight scales times the 8
// activation scales give the factors, and a permute hands each pair its two.
template <int NR>
MEMLM_SIMD void int4_tile_g32(const Int4Weights& w, int64_t o, const Acts& a, float* y) {
  const uint8_t* wr[NR];
  const c10::Half *s[NR], *m[NR];
  for (int i = 0; i < NR; ++i) {
    wr[i] = w.packed + (o + i) * (w.in / 2);
    s[i] = w.scales + (o + i) * w.groups;
    m[i] = w.mins + (o + i) * w.groups;
  }
  const int64_t pairs = a.blocks / 2, blocks = a.blocks;  // groups == blocks
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d = a.d.data() + r * a.d_stride;
    __m256 acc[kTile], f8[NR], fac[NR];
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < pairs; k0 += 4) {
      const int64_t start = chunk_start(2 * k0, blocks);
      const __m256 d8 = _mm256_loadu_ps(d + start);
      for (int i = 0; i < NR; ++i) f8[i] = _mm256_mul_ps(load8_halves(s[i] + start, blocks - start), d8);
      for (int64_t k = k0; k < std::min(k0 + 4, pairs); ++k) {
        const __m256i lanes =
            _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_set1_epi32(static_cast<int>(2 * k - start)));
        for (int i = 0; i < NR; ++i) fac[i] = _mm256_permutevar8x32_ps(f8[i], lanes);
        int4_pair<NR>(wr, k, q, fac, acc);
      }
    }
    if (blocks % 2) {
      float last[NR];
      for (int i = 0; i < NR; ++i) last[i] = half_to_float(s[i][blocks - 1]) * d[blocks - 1];
      int4_last_block<NR>(wr, blocks - 1, q, last, acc);
    }
    int4_min_term<NR>(m, w.groups, a, a.sums.data() + r * a.sums_stride, acc);
    store_tile<NR>(y + r * w.out + o, hsum4(acc));
  }
}

// Groups of 64 or more inputs (a multiple of 64): every pair lies in one group. Scales come 8
// groups at a time; a permute broadcasts each group's, times the pair's activation scales.
template <int NR>
MEMLM_SIMD void int4_tile_wide(const Int4Weights& w, int64_t o, const Acts& a, float* y) {
  const uint8_t* wr[NR];
  const c10::Half *s[NR], *m[NR];
  for (int i = 0; i < NR; ++i) {
    wr[i] = w.packed + (o + i) * (w.in / 2);
    s[i] = w.scales + (o + i) * w.groups;
    m[i] = w.mins + (o + i) * w.groups;
  }
  const int64_t groups = w.groups, pairs_per_group = w.group / 64;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int8_t* q = a.q.data() + r * a.in;
    const float* d_pairs = a.d_pairs.data() + r * a.d_pairs_stride;
    __m256 acc[kTile], s8[NR], scale[NR], fac[NR];
    for (int i = 0; i < kTile; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
      const int64_t start = chunk_start(g0, groups);
      for (int i = 0; i < NR; ++i) s8[i] = load8_halves(s[i] + start, groups - start);
      for (int64_t g = g0; g < std::min(g0 + 8, groups); ++g) {
        const __m256i lane = _mm256_set1_epi32(static_cast<int>(g - start));
        for (int i = 0; i < NR; ++i) scale[i] = _mm256_permutevar8x32_ps(s8[i], lane);
        for (int64_t k = g * pairs_per_group; k < (g + 1) * pairs_per_group; ++k) {
          const __m256 dk = _mm256_loadu_ps(d_pairs + k * 8);
          for (int i = 0; i < NR; ++i) fac[i] = _mm256_mul_ps(scale[i], dk);
          int4_pair<NR>(wr, k, q, fac, acc);
        }
      }
    }
    int4_min_term<NR>(m, groups, a, a.sums.data() + r * a.sums_stride, acc);
    store_tile<NR>(y + r * w.out + o, hsum4(acc));
  }
}

inline void int4_tile(const Int4Weights& w, int64_t o, int nr, const Acts& a, float* y) {
  // One instance per row count and scale layout; all take the same arguments.
  using Tile = void (*)(const Int4Weights&, int64_t, const Acts&, float*);
  static constexpr Tile g32[] = {int4_tile_g32<1>, int4_tile_g32<2>, int4_tile_g32<3>, int4_tile_g32<4>};
  static constexpr Tile wide[] = {int4_tile_wide<1>, int4_tile_wide<2>, int4_tile_wide<3>, int4_tile_wide<4>};
  (w.group == kBlock ? g32 : wide)[nr - 1](w, o, a, y);
}

// ------------------------------------------------------------------ int8

// GROUPED: a float32 scale per group of w.group inputs; else one per row, applied at the end.
template <int NR, bool GROUPED>
MEMLM_SIMD void int8_tile_simd(const Int8Weights& w, int64_t o, const Acts& a, float* y) {
  const int8_t* wr[NR];
  const float* s[NR];
  for (int i = 0; i < NR; ++i) {
    wr[i] = w.codes + (o + i) * w.in;
    s[i] = GROUPED ? w.scales + (o + i) * w.groups : w.scales + o + i;
  }
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
          // One operand must be unsigned: |w| times x with w's sign.
          const __m256i isum = dot_u8s8(_mm256_setzero_si256(), _mm256_abs_epi8(codes), _mm256_sign_epi8(x, codes));
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), GROUPED ? _mm256_mul_ps(scale[i], db) : db, acc[i]);
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

inline void int8_tile(const Int8Weights& w, int64_t o, int nr, const Acts& a, float* y) {
  using Tile = void (*)(const Int8Weights&, int64_t, const Acts&, float*);
  static constexpr Tile grouped[] = {int8_tile_simd<1, true>, int8_tile_simd<2, true>, int8_tile_simd<3, true>,
                                     int8_tile_simd<4, true>};
  static constexpr Tile per_row[] = {int8_tile_simd<1, false>, int8_tile_simd<2, false>, int8_tile_simd<3, false>,
                                     int8_tile_simd<4, false>};
  (w.groups ? grouped : per_row)[nr - 1](w, o, a, y);
}
