// The float32 linear op of float_linear.cpp, for memlm's other C++ ops to call directly
// (decode_block.cpp): the same checks and kernels as torch.ops.memlm.float_linear.

#pragma once

#include <ATen/core/Tensor.h>

namespace memlm {

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight);

}  // namespace memlm
