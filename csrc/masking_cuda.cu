// The masking engine on CUDA: the whole batch in one kernel launch.
//
// One block per sample. The block computes its spatial_tokens keys (Philox4x32-10, or the
// given noise as order-preserving bits), pads them to a power of two P with +inf entries,
// bitonic-sorts the (key, token index) pairs lexicographically (ties to the lower index, as
// on the CPU), then writes ids_keep, ids_restore and mask (mask_rows.h, shared with the CPU).
//
// Storage for the sort: shared memory (12 bytes per padded token; up to the device's opt-in
// limit, e.g. 227 KiB on H100/H200, so P <= 16384) or, beyond it, a scratch buffer in global
// memory from torch's caching allocator (same kernel, same launch count: one). The environment
// variable MAE_FAST_MASKING_SMEM_BYTES caps the shared memory used (0 forces the global path;
// tests use it).
//
// Randomness: the Philox seed and offset come from the CUDA generator's philox_cuda_state(4)
// taken under its mutex and unpacked in the kernel (at::cuda::philox::unpack), as torch's own
// random ops do, so the op is safe under CUDA graph capture (each replay advances the offset).
#include "masking.h"

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/core/Generator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>

#include "mask_rows.h"
#include "philox.h"

namespace mae_fast {
namespace {

template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_double<double>(double x) {
  return x;
}

__device__ __forceinline__ bool pair_less(uint64_t ka, uint32_t ia, uint64_t kb, uint32_t ib) {
  return ka < kb || (ka == kb && ia < ib);
}

// kNoise: keys from noise [N, Ls] (contiguous); else from Philox with the state in rng.
// gkeys/gidx: global scratch [N, P] (nullptr: use dynamic shared memory).
template <bool kNoise, typename scalar_t>
__global__ void masking_kernel(const scalar_t* __restrict__ noise, at::PhiloxCudaState rng, int64_t Ls, int64_t Ks,
                               int64_t T, int bits, int64_t P, uint64_t* gkeys, uint32_t* gidx,
                               int64_t* __restrict__ keep, int64_t* __restrict__ restore, float* __restrict__ mask) {
  extern __shared__ uint64_t smem[];
  const int64_t n = blockIdx.x;
  uint64_t* keys;
  uint32_t* idx;
  if (gkeys != nullptr) {
    keys = gkeys + n * P;
    idx = gidx + n * P;
  } else {
    keys = smem;
    idx = reinterpret_cast<uint32_t*>(smem + P);
  }
  uint64_t seed = 0, offset = 0;
  if (!kNoise) {
    const auto state = at::cuda::philox::unpack(rng);
    seed = std::get<0>(state);
    offset = std::get<1>(state);
  }
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    if (i < Ls) {
      if (kNoise) {
        keys[i] = sortable_bits(to_double(noise[n * Ls + i]));
      } else {
        keys[i] = masking_key(seed, offset, static_cast<uint64_t>(n), static_cast<uint64_t>(i),
                              static_cast<uint64_t>(Ls), bits);
      }
      idx[i] = static_cast<uint32_t>(i);
    } else {  // padding sorts after every real token
      keys[i] = ~uint64_t(0);
      idx[i] = 0xffffffffu;
    }
  }
  __syncthreads();

  // Bitonic sort of P = 2^m pairs, ascending.
  const int64_t half = P >> 1;
  for (int64_t k = 2; k <= P; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t t = threadIdx.x; t < half; t += blockDim.x) {
        const int64_t a = ((t / j) * (j << 1)) + (t % j);
        const int64_t b = a + j;
        const bool ascending = (a & k) == 0;
        const uint64_t ka = keys[a], kb = keys[b];
        const uint32_t ia = idx[a], ib = idx[b];
        const bool swap = ascending ? pair_less(kb, ib, ka, ia) : pair_less(ka, ia, kb, ib);
        if (swap) {
          keys[a] = kb;
          keys[b] = ka;
          idx[a] = ib;
          idx[b] = ia;
        }
      }
      __syncthreads();
    }
  }

  const int64_t L = T * Ls, K = T * Ks;
  for (int64_t r = threadIdx.x; r < Ls; r += blockDim.x) {
    write_rank(r, static_cast<int64_t>(idx[r]), Ls, Ks, T, keep + n * K, restore + n * L, mask + n * L);
  }
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Shared memory the kernel may use on this device (bytes), honouring MAE_FAST_MASKING_SMEM_BYTES.
int64_t smem_budget() {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  int64_t budget = optin;
  if (const char* env = std::getenv("MAE_FAST_MASKING_SMEM_BYTES")) {
    const long long cap = std::atoll(env);
    if (cap >= 0 && cap < budget) budget = cap;
  }
  return budget;
}

template <bool kNoise, typename scalar_t>
void launch(const scalar_t* noise, const at::PhiloxCudaState& rng, int64_t batch_size, int64_t Ls, int64_t Ks,
            int64_t T, MaskingResult& out, const at::Device& device) {
  if (batch_size == 0) return;
  TORCH_CHECK_VALUE(batch_size <= 2147483647LL, "batch_size must be < 2**31 on CUDA, got ", num(batch_size));
  const int64_t P = next_pow2(Ls);
  const int bits = index_bits(static_cast<uint64_t>(Ls));
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, P / 2)));
  const int64_t bytes = P * static_cast<int64_t>(sizeof(uint64_t) + sizeof(uint32_t));
  at::Tensor gkeys, gidx;
  uint64_t* gkeys_ptr = nullptr;
  uint32_t* gidx_ptr = nullptr;
  int64_t smem = 0;
  auto kernel = masking_kernel<kNoise, scalar_t>;
  if (bytes <= smem_budget()) {
    smem = bytes;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
  } else {
    const auto opts = at::TensorOptions().device(device);
    gkeys = at::empty({batch_size, P}, opts.dtype(at::kLong));  // [N, P] scratch
    gidx = at::empty({batch_size, P}, opts.dtype(at::kInt));    // [N, P] scratch
    gkeys_ptr = reinterpret_cast<uint64_t*>(gkeys.data_ptr<int64_t>());
    gidx_ptr = reinterpret_cast<uint32_t*>(gidx.data_ptr<int32_t>());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  kernel<<<static_cast<unsigned int>(batch_size), threads, static_cast<size_t>(smem), stream>>>(
      noise, rng, Ls, Ks, T, bits, P, gkeys_ptr, gidx_ptr, std::get<0>(out).data_ptr<int64_t>(),
      std::get<1>(out).data_ptr<int64_t>(), std::get<2>(out).data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

MaskingResult philox_cuda(const at::Device& device, int64_t batch_size, int64_t spatial_tokens, int64_t spatial_keep,
                          int64_t frames, const at::PhiloxCudaState& rng) {
  auto out = empty_outputs(device, batch_size, spatial_tokens, spatial_keep, frames);
  launch<false, float>(nullptr, rng, batch_size, spatial_tokens, spatial_keep, frames, out, device);
  return out;
}

MaskingResult random_masking_cuda(const at::Tensor& device_like, int64_t batch_size, int64_t spatial_tokens,
                                  int64_t spatial_keep, int64_t frames, const std::optional<at::Generator>& generator) {
  check_sizes(batch_size, spatial_tokens, spatial_keep, frames);
  const at::Device device = device_like.device();
  const c10::cuda::CUDAGuard guard(device);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  const at::Device gen_device = gen->device();  // torch.Generator(device="cuda") carries no index
  const int64_t gen_index = gen_device.has_index() ? gen_device.index() : c10::cuda::current_device();
  TORCH_CHECK_VALUE(gen_device.is_cuda() && gen_index == device.index(), "generator is on ", gen_device.str(),
                    " but the masks go to ", device.str());
  at::PhiloxCudaState rng;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng = gen->philox_cuda_state(4);  // one 128-bit Philox block per (sample, spatial token)
  }
  return philox_cuda(device, batch_size, spatial_tokens, spatial_keep, frames, rng);
}

MaskingResult random_masking_seeded_cuda(const at::Tensor& device_like, int64_t batch_size, int64_t spatial_tokens,
                                         int64_t spatial_keep, int64_t frames, int64_t seed, int64_t offset) {
  check_sizes(batch_size, spatial_tokens, spatial_keep, frames);
  check_offset(offset);
  const c10::cuda::CUDAGuard guard(device_like.device());
  const at::PhiloxCudaState rng(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  return philox_cuda(device_like.device(), batch_size, spatial_tokens, spatial_keep, frames, rng);
}

MaskingResult masking_from_noise_cuda(const at::Tensor& noise_in, int64_t spatial_keep, int64_t frames) {
  check_noise(noise_in, spatial_keep, frames);
  const int64_t batch_size = noise_in.size(0), spatial_tokens = noise_in.size(1);
  const c10::cuda::CUDAGuard guard(noise_in.device());
  const at::Tensor noise = noise_in.contiguous();  // [N, Ls]
  auto out = empty_outputs(noise.device(), batch_size, spatial_tokens, spatial_keep, frames);
  const at::PhiloxCudaState unused;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "masking_from_noise_cuda", [&] {
    launch<true, scalar_t>(noise.data_ptr<scalar_t>(), unused, batch_size, spatial_tokens, spatial_keep, frames, out,
                           noise.device());
  });
  return out;
}

}  // namespace
}  // namespace mae_fast

TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("random_masking", &mae_fast::random_masking_cuda);
  m.impl("random_masking_seeded", &mae_fast::random_masking_seeded_cuda);
  m.impl("masking_from_noise", &mae_fast::masking_from_noise_cuda);
}
