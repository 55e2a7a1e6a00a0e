// The SIMD tile kernels of quant_linear.cpp. This file is included there twice, inside two
// namespaces: once with MEMLM_SIMD = target("avx2,fma,f16c") and MEMLM_VNNI 0, once with
// AVX-VNNI added and MEMLM_VNNI 1. The only difference is how 4 bytes times 4 bytes are summed
// into a 32-bit lane (dot_u8s8 below): AVX2 needs maddubs + madd (3-4 instructions per pair of
// blocks), AVX-VNNI does it in one (vpdpbusd), about 10-15% faster on CPUs that have it. A
// target attribute cannot differ between instances of one template, hence the two inclusions.
//
// Two kinds of kernel. One activation row (a decode step): a tile of NR (<= kTile) consecutive
// weight rows, so each activation load feeds 4 weight rows. Many rows (batched decoding, short
// prefills): one weight row against up to kMaxRowTile activation rows, so that each weight load
// and unpacking feeds them all, over quads of 4 blocks whose integer sums share one vector (two
// lanes a block), which halves the float work per row and block against the pair layout.
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
    const float* d_pairs = a.d_lanes.data() + r * a.lanes_stride;  // no quads: all pairs
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

// ------------------------------------------------------------------ many rows

// 4 weight scales of blocks b..b+3 (b a multiple of 4), in block order, from a row's scales with
// per_group blocks to a group (a quad may straddle two groups when per_group is not 1, 2 or 4k).
MEMLM_SIMD inline float to_float(c10::Half h) { return half_to_float(h); }
MEMLM_SIMD inline float to_float(float f) { return f; }

MEMLM_SIMD inline __m128 quad_scales(const c10::Half* s, int64_t b, int64_t per_group) {
  if (per_group == 1) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + b)));
  if (per_group == 2) {
    int32_t two;
    std::memcpy(&two, s + b / 2, sizeof(two));
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
    return _mm_unpacklo_ps(v, v);
  }
  if (per_group % 4 == 0) return _mm_set1_ps(to_float(s[b / per_group]));
  return _mm_setr_ps(to_float(s[b / per_group]), to_float(s[(b + 1) / per_group]), to_float(s[(b + 2) / per_group]),
                     to_float(s[(b + 3) / per_group]));
}

MEMLM_SIMD inline __m128 quad_scales(const float* s, int64_t b, int64_t per_group) {
  if (per_group == 1) return _mm_loadu_ps(s + b);
  if (per_group == 2) {
    const __m128 v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s + b / 2)));
    return _mm_unpacklo_ps(v, v);
  }
  if (per_group % 4 == 0) return _mm_set1_ps(s[b / per_group]);
  return _mm_setr_ps(s[b / per_group], s[(b + 1) / per_group], s[(b + 2) / per_group], s[(b + 3) / per_group]);
}

// The 4 scales spread over the 8 lanes of a quad's sums; lane_blocks: the block of each lane.
MEMLM_SIMD inline __m256 quad_lanes(__m128 four, __m256i lane_blocks) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), lane_blocks);
}

// The lane sum of v.
MEMLM_SIMD inline float hsum1(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// y[r * out + o] for the MR rows from r0: the lane sums of acc, 4 rows at a time.
template <int MR>
MEMLM_SIMD inline void store_rows(const __m256* acc, int64_t r0, int64_t o, int64_t out, float* y) {
  int i = 0;
  for (; i + 4 <= MR; i += 4) {
    alignas(16) float t[4];
    _mm_store_ps(t, hsum4(acc + i));
    for (int j = 0; j < 4; ++j) y[(r0 + i + j) * out + o] = t[j];
  }
  for (; i < MR; ++i) y[(r0 + i) * out + o] = hsum1(acc[i]);
}

// int4: the 4 operands of quad k of a weight row, 8 bytes of each of its blocks per operand
// (slots 0 2 1 3, the activation layout of int4_position): the low nibbles of its 64 bytes
// (even columns) and high nibbles (odd columns), unpacked 8 bytes at a time.
MEMLM_SIMD inline void int4_quad_operands(const uint8_t* row, int64_t k, __m256i* op) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k * 64));
  const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k * 64 + 32));
  const __m256i lo0 = _mm256_and_si256(c0, low4), lo1 = _mm256_and_si256(c1, low4);
  const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(c0, 4), low4);
  const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(c1, 4), low4);
  op[0] = _mm256_unpacklo_epi64(lo0, lo1);
  op[1] = _mm256_unpackhi_epi64(lo0, lo1);
  op[2] = _mm256_unpacklo_epi64(hi0, hi1);
  op[3] = _mm256_unpackhi_epi64(hi0, hi1);
}

// acc + the integer sums of a quad of int4 codes (op) with 128 bytes of activation codes x.
MEMLM_SIMD inline __m256i int4_quad_sums(const __m256i* op, const int8_t* x) {
  const __m256i* xv = reinterpret_cast<const __m256i*>(x);
#if MEMLM_VNNI
  __m256i acc = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) acc = _mm256_dpbusd_avx_epi32(acc, op[c], _mm256_loadu_si256(xv + c));
  return acc;
#else
  // 16-bit sums of 8 products: at most 8 * 15 * 127, no saturation.
  __m256i p16 = _mm256_maddubs_epi16(op[0], _mm256_loadu_si256(xv));
  for (int c = 1; c < 4; ++c) p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(op[c], _mm256_loadu_si256(xv + c)));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

// Weight rows [o0, o1), one at a time, against the MR activation rows from r0.
template <int MR>
MEMLM_SIMD void int4_rows_tile(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, int64_t r0, float* y) {
  for (int64_t o = o0; o < o1; ++o) {
  const uint8_t* wr = w.packed + o * (w.in / 2);
  const c10::Half* s = w.scales + o * w.groups;
  const c10::Half* m = w.mins + o * w.groups;
  const int64_t per_group = w.group / kBlock;
  const int8_t* q0 = a.q.data() + r0 * a.in;
  const float* lanes0 = a.d_lanes.data() + r0 * a.lanes_stride;
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i lane_blocks = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
  for (int64_t k = 0; k < a.quads; ++k) {
    __m256i op[4];
    int4_quad_operands(wr, k, op);
    const __m256 sv = quad_lanes(quad_scales(s, 4 * k, per_group), lane_blocks);
    for (int i = 0; i < MR; ++i) {
      const __m256i isum = int4_quad_sums(op, q0 + i * a.in + k * 128);
      const __m256 fac = _mm256_mul_ps(sv, _mm256_loadu_ps(lanes0 + i * a.lanes_stride + 8 * k));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), fac, acc[i]);
    }
  }
  // The blocks after the quads: pairs (32 weight bytes, 64 activation bytes), then a single one.
  int64_t b = 4 * a.quads;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (; b + 1 < a.blocks; b += 2) {
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 16));
    const __m256i lo = _mm256_and_si256(codes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
    const __m256 sv = _mm256_set_m128(_mm_set1_ps(half_to_float(s[(b + 1) / per_group])),
                                      _mm_set1_ps(half_to_float(s[b / per_group])));
    for (int i = 0; i < MR; ++i) {
      const int8_t* x = q0 + i * a.in + b * kBlock;
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
#if MEMLM_VNNI
      const __m256i isum = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xe), hi, xo);
#else
      const __m256i isum = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)),
                                             _mm256_set1_epi16(1));
#endif
      const __m256 fac = _mm256_mul_ps(sv, _mm256_loadu_ps(lanes0 + i * a.lanes_stride + 8 * a.quads + (b - 4 * a.quads) * 4));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), fac, acc[i]);
    }
  }
  if (b < a.blocks) {  // an odd block count: [16 even | 16 odd], group 32
    const uint8_t* const one_row[1] = {wr};
    for (int i = 0; i < MR; ++i) {
      const float fac = half_to_float(s[b]) * a.d[(r0 + i) * a.d_stride + b];
      int4_last_block<1>(one_row, b, q0 + i * a.in, &fac, &acc[i]);
    }
  }
  // The min term, 8 groups at a time (see int4_min_term).
  const int64_t groups = w.groups, full = groups / 8 * 8;
  const float* sums0 = a.sums.data() + r0 * a.sums_stride;
  for (int64_t g = 0; g < full; g += 8) {
    const __m256 mv = load8_halves(m + g);
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sums0 + i * a.sums_stride + g), acc[i]);
  }
  if (full < groups) {
    const int64_t start = chunk_start(full, groups);
    const __m256 mv = load8_halves(m + start, groups - start);
    for (int i = 0; i < MR; ++i) {
      const float* sums = sums0 + i * a.sums_stride;
      acc[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(groups >= 8 ? sums + a.sums_stride - 8 : sums), acc[i]);
    }
  }
  store_rows<MR>(acc, r0, o, w.out, y);
  }
}

// int8: the 4 operands of quad k of a weight row: 8 bytes of each block per operand, in block
// order (chunks 0, 2, 1, 3 of the blocks, the activation layout of int8_position).
MEMLM_SIMD inline void int8_quad_operands(const int8_t* row, int64_t k, __m256i* op) {
  __m256i blk[4];
  for (int j = 0; j < 4; ++j) blk[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k * 128 + j * 32));
  const __m256i lo01 = _mm256_unpacklo_epi64(blk[0], blk[1]), hi01 = _mm256_unpackhi_epi64(blk[0], blk[1]);
  const __m256i lo23 = _mm256_unpacklo_epi64(blk[2], blk[3]), hi23 = _mm256_unpackhi_epi64(blk[2], blk[3]);
  op[0] = _mm256_permute2x128_si256(lo01, lo23, 0x20);
  op[1] = _mm256_permute2x128_si256(lo01, lo23, 0x31);
  op[2] = _mm256_permute2x128_si256(hi01, hi23, 0x20);
  op[3] = _mm256_permute2x128_si256(hi01, hi23, 0x31);
}

// One int8 weight row o against the MR activation rows from r0. The byte dot product wants one
// unsigned operand: AVX-VNNI adds 128 to the weight codes (once per weight row, shared by all rows)
// and starts each row's sums from -128 * sum(activation codes) (a.corr); AVX2 moves the weight's
// sign onto the activations (per row) as the one-row kernel does.
template <int MR>
MEMLM_SIMD void int8_rows_tile(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, int64_t r0, float* y) {
  for (int64_t o = o0; o < o1; ++o) {
  const int8_t* wr = w.codes + o * w.in;
  const bool grouped = w.groups > 0;
  const float* s = grouped ? w.scales + o * w.groups : w.scales + o;
  const int64_t per_group = grouped ? w.group / kBlock : a.blocks;
  const int8_t* q0 = a.q.data() + r0 * a.in;
  const float* lanes0 = a.d_lanes.data() + r0 * a.lanes_stride;
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i lane_blocks = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t k = 0; k < a.quads; ++k) {
    __m256i op[4];
    int8_quad_operands(wr, k, op);
#if MEMLM_VNNI
    for (int c = 0; c < 4; ++c) op[c] = _mm256_xor_si256(op[c], _mm256_set1_epi8(static_cast<char>(0x80)));
    const int32_t* corr0 = a.corr.data() + r0 * a.quads * 8 + k * 8;
#else
    __m256i mag[4];
    for (int c = 0; c < 4; ++c) mag[c] = _mm256_abs_epi8(op[c]);
#endif
    const __m256 sv = grouped ? quad_lanes(quad_scales(s, 4 * k, per_group), lane_blocks) : _mm256_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const __m256i* x = reinterpret_cast<const __m256i*>(q0 + i * a.in + k * 128);
#if MEMLM_VNNI
      __m256i isum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr0 + i * a.quads * 8));
      for (int c = 0; c < 4; ++c) isum = _mm256_dpbusd_avx_epi32(isum, op[c], _mm256_loadu_si256(x + c));
#else
      __m256i isum = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c)
        isum = dot_u8s8(isum, mag[c], _mm256_sign_epi8(_mm256_loadu_si256(x + c), op[c]));
#endif
      const __m256 dv = _mm256_loadu_ps(lanes0 + i * a.lanes_stride + 8 * k);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), grouped ? _mm256_mul_ps(sv, dv) : dv, acc[i]);
    }
  }
  for (int64_t b = 4 * a.quads; b < a.blocks; ++b) {  // the blocks after the quads, one at a time
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * kBlock));
    const __m256i mag = _mm256_abs_epi8(codes);
    const float sb = grouped ? s[b / per_group] : 1.f;
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + i * a.in + b * kBlock));
      const __m256i isum = dot_u8s8(_mm256_setzero_si256(), mag, _mm256_sign_epi8(x, codes));
      const __m256 fac = _mm256_set1_ps(sb * a.d[(r0 + i) * a.d_stride + b]);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), fac, acc[i]);
    }
  }
  if (!grouped)
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_mul_ps(acc[i], _mm256_set1_ps(s[0]));
  store_rows<MR>(acc, r0, o, w.out, y);
  }
}

// Weight rows [o0, o1) against all activation rows, kMaxRowTile at a time (a second pass over
// the weights of a task finds them in L2).
template <typename W, typename Tile>
MEMLM_SIMD inline void rows_loop(const W& w, int64_t o0, int64_t o1, const Acts& a, float* y, const Tile* tiles) {
  for (int64_t r0 = 0; r0 < a.rows; r0 += kMaxRowTile)
    tiles[std::min<int64_t>(kMaxRowTile, a.rows - r0) - 1](w, o0, o1, a, r0, y);
}

inline void int4_rows(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  using Tile = void (*)(const Int4Weights&, int64_t, int64_t, const Acts&, int64_t, float*);
  static constexpr Tile tiles[] = {int4_rows_tile<1>, int4_rows_tile<2>, int4_rows_tile<3>, int4_rows_tile<4>,
                                   int4_rows_tile<5>, int4_rows_tile<6>, int4_rows_tile<7>, int4_rows_tile<8>};
  static_assert(sizeof(tiles) / sizeof(tiles[0]) == kMaxRowTile);
  rows_loop(w, o0, o1, a, y, tiles);
}

inline void int8_rows(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y) {
  using Tile = void (*)(const Int8Weights&, int64_t, int64_t, const Acts&, int64_t, float*);
  static constexpr Tile tiles[] = {int8_rows_tile<1>, int8_rows_tile<2>, int8_rows_tile<3>, int8_rows_tile<4>,
                                   int8_rows_tile<5>, int8_rows_tile<6>, int8_rows_tile<7>, int8_rows_tile<8>};
  static_assert(sizeof(tiles) / sizeof(tiles[0]) == kMaxRowTile);
  rows_loop(w, o0, o1, a, y, tiles);
}
