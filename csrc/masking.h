// Shared declarations of the masking engine (CPU in masking.cpp, CUDA in masking_cuda.cu).
//
// Every implementation sorts, per sample, the pairs (key, spatial token index) of the
// spatial_tokens = L / frames tokens lexicographically (so ties go to the lower index, like a
// stable argsort), takes the first spatial_keep as kept, and writes the outputs with write_rank
// (mask_rows.h). For frames == 1 this is exactly the reference double argsort.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace mae_fast {

using MaskingResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Error messages format numbers with std::to_string and pass only strings to TORCH_CHECK_*:
// streaming numbers into c10::str from this extension crashed (SIGSEGV in the throw path) on
// the GPU machine (torch 2.11 + its g++/libstdc++), while string-only messages worked.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string num(double v) { return std::to_string(v); }
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// Argument checks shared by every implementation (the Python wrapper checks first, with
// friendlier messages; these guard direct calls of torch.ops.mae_fast.*).
inline void check_sizes(int64_t batch_size, int64_t spatial_tokens, int64_t spatial_keep, int64_t frames) {
  TORCH_CHECK_VALUE(batch_size >= 0, "batch_size must be >= 0, got ", num(batch_size));
  TORCH_CHECK_VALUE(spatial_tokens >= 1, "spatial_tokens must be >= 1, got ", num(spatial_tokens));
  TORCH_CHECK_VALUE(spatial_tokens <= (int64_t(1) << 31), "spatial_tokens must be <= 2**31, got ", num(spatial_tokens));
  TORCH_CHECK_VALUE(frames >= 1, "frames must be >= 1, got ", num(frames));
  // spatial_keep == 0 keeps nothing (ids_keep [N, 0]): the official model then encodes the cls token alone
  TORCH_CHECK_VALUE(spatial_keep >= 0 && spatial_keep <= spatial_tokens,
                    "spatial_keep must be in [0, spatial_tokens=", num(spatial_tokens), "], got ", num(spatial_keep));
}

// The seeded entry point's Philox offset: counter word offset / 4, so a multiple of 4 (docs/OPS.md, keys).
inline void check_offset(int64_t offset) {
  TORCH_CHECK_VALUE(offset >= 0 && offset % 4 == 0, "offset must be a non-negative multiple of 4, got ", num(offset));
}

inline void check_noise(const at::Tensor& noise, int64_t spatial_keep, int64_t frames) {
  TORCH_CHECK_VALUE(noise.dim() == 2, "noise must be [N, L / frames], got ", shape_str(noise.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(noise.scalar_type()), "noise must be a floating tensor, got ",
                    std::string(c10::toString(noise.scalar_type())));
  check_sizes(noise.size(0), noise.size(1), spatial_keep, frames);
}

inline MaskingResult empty_outputs(const at::Device& device, int64_t batch_size, int64_t spatial_tokens,
                                   int64_t spatial_keep, int64_t frames) {
  const auto idx = at::TensorOptions().dtype(at::kLong).device(device);
  return {at::empty({batch_size, frames * spatial_keep}, idx),                            // [N, K]
          at::empty({batch_size, frames * spatial_tokens}, idx),                          // [N, L]
          at::empty({batch_size, frames * spatial_tokens}, idx.dtype(at::kFloat))};       // [N, L]
}

}  // namespace mae_fast
