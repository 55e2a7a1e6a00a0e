// The compute of memlm's quantized linear ops, free of torch (quant_linear.cpp binds it as
// torch ops and splits the work across threads). See quant_linear.cpp for the method.

#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace memlm::kernels {

constexpr int64_t kBlock = 32;  // activation block: one scale per 32 inputs, as llama.cpp's q8
constexpr int kTile = 4;        // output rows per inner loop: each activation load feeds 4 rows

// The instruction sets, in order: each includes the ones before it. kAmx: AVX-VNNI, AVX-512 and
// AMX's int8 tiles, with the kernel's permission to use them (asked of Linux once per process).
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvxVnni = 2, kAmx = 3 };
inline const char* const kIsaNames[] = {"portable", "avx2", "avx_vnni", "amx"};
Isa best_isa();  // what this CPU has

// How activation codes are laid out, by the kernel that reads them (see int4_position and
// int8_position in quant_kernels.cpp).
enum class Layout { kRow, kQuads, kTiles };
constexpr int64_t kTileRows = 16;  // AMX: weight rows and activation rows per tile

// All activation rows, quantized once per call before any dot product.
//   q:    int8 codes in the layout the kernels read. kRow (one row): rows x in, int4 in pairs of
//         blocks, int8 in natural order. kQuads (many rows): the same, but the first `quads`
//         groups of 4 blocks interleaved so that one weight load feeds the 4 blocks. kTiles
//         (AMX): per group of 16 rows (of `np` rows when there are fewer, np a power of 2) and
//         block, the 8 x np*4 byte tile of the dot product; for np <= 8, per pair of blocks,
//         the 16 x 2np*4 byte tile of both, side by side (see tile_position)
//   d:    rows x d_stride floats, one per block, zero-padded to a multiple of 8
//   d_lanes: rows x lanes_stride floats, 8 per quad in the lane layout of its integer sums
//         (int4 [d0 d0 d2 d2 d1 d1 d3 d3], int8 [d0 d0 d1 d1 d2 d2 d3 d3]), then, int4 only, 8
//         per pair of blocks after the quads [d0 d0 d0 d0 d1 d1 d1 d1]; a single block pads with 0
//   sums: int4 only, rows x sums_stride floats, per weight group: sum over its blocks of d*sum(q)
//         (what the group's min multiplies), zero-padded to a multiple of 8; then 8 more, the
//         last 8 groups' sums with those already in a full chunk of 8 zeroed (see quantize_rows)
//   corr: int8 quads only, rows x quads x 8 int32: -128 * sum(q) of each block of a quad in the
//         first of its two lanes (the AVX-VNNI kernel adds 128 to the signed weights, see there)
//   tile_d, tile_sums: kTiles only, per group of rows and tile unit (block, or pair of blocks
//         when np <= 8; weight group for the sums, int4), 16 floats in the lanes of the unit's
//         product (see Acts::tile_cols): element e the d (the sum) of its row and block, else 0
struct Acts {
  Layout layout = Layout::kRow;
  int64_t rows = 0, in = 0, blocks = 0, quads = 0, d_stride = 0, lanes_stride = 0, sums_stride = 0;
  // kTiles: rows per group np, the group count, and the tile's columns: np, or 2 np when two
  // blocks share a tile (np <= 8: tile column c holds row c % np of block 2u + c / np)
  int64_t np = 0, row_groups = 0, tile_cols = 0;
  bool paired() const { return tile_cols > np; }
  int64_t tile_units() const { return paired() ? (blocks + 1) / 2 : blocks; }
  std::vector<int8_t> q;
  std::vector<float> d, d_lanes, sums, tile_d, tile_sums;
  std::vector<int32_t> corr;
};

struct Int4Weights {
  const uint8_t* packed;    // out x in/2, low nibble = even column
  const c10::Half* scales;  // out x groups
  const c10::Half* mins;    // out x groups
  int64_t in, out, groups, group;
};

struct Int8Weights {
  const int8_t* codes;  // out x in
  const float* scales;  // out (per row) or out x groups
  int64_t in, out, groups, group;  // groups == 0: one scale per row
};

// Sizes (zeroed) the buffers of `a` for rows x in activations in `layout`; int4: with weight
// groups of `group`.
void prepare_acts(Acts& a, int64_t rows, int64_t in, bool int4, int64_t group, Layout layout);
// Quantizes rows [r0, r1) of x (rows x in, float32) into `a` (prepared with the same arguments).
void quantize_rows(const float* x, int64_t r0, int64_t r1, bool int4, int64_t group, Acts& a, Isa isa);
// kTiles: fills tile_d and tile_sums once all rows are quantized.
void finish_tiles(Acts& a, bool int4, int64_t group);

// One activation layout per row count: the many-row kernels read quads from this many rows on.
constexpr int64_t kQuadRows = 2;
constexpr int kMaxRowTile = 8;  // activation rows per pass of a weight row in the many-row kernels

// One row count (a.quads == 0): y (rows x out) for the nr (<= kTile) weight rows from row o,
// against every activation row.
void int4_tile(const Int4Weights& w, int64_t o, int nr, const Acts& a, float* y, Isa isa);
void int8_tile(const Int8Weights& w, int64_t o, int nr, const Acts& a, float* y, Isa isa);
// Many rows (a.quads > 0 or a layer too narrow for a quad): y for weight rows [o0, o1), each
// weight row read once per kMaxRowTile activation rows.
void int4_rows(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y, Isa isa);
void int8_rows(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y, Isa isa);
// AMX (a.layout == kTiles, isa kAmx): y for weight rows [o0, o1), o0 a multiple of kTileRows;
// amx_kernels.cpp.
void int4_tiles(const Int4Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y);
void int8_tiles(const Int8Weights& w, int64_t o0, int64_t o1, const Acts& a, float* y);
bool amx_usable();  // the CPU has AMX-INT8 and AVX-512 and Linux lets this process use the tiles

// Rows o..o+n-1 of the weight as float32 into dst (n x in).
void dequant_int4(const Int4Weights& w, int64_t o, int64_t n, float* dst, Isa isa);
void dequant_int8(const Int8Weights& w, int64_t o, int64_t n, float* dst, Isa isa);

}  // namespace memlm::kernels
