// The quantized linear ops of quant_linear.cpp, for memlm's other C++ ops to call directly
// (decode_block.cpp): the same checks and kernels as torch.ops.memlm.int4_linear / int8_linear,
// without a trip through the dispatcher.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant_kernels.h"

namespace memlm {

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group_size, int64_t dequant_rows, int64_t amx_rows);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t dequant_rows,
                       int64_t amx_rows);

// The code path in use: the CPU's best, unless memlm::set_isa chose a lower one.
kernels::Isa isa_in_use();

}  // namespace memlm
