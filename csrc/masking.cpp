// The masking engine: op schemas (TORCH_LIBRARY_FRAGMENT) and the CPU implementation.
//
// Ops (the public wrapper is mae_fast/ops/random_masking.py; these are its building blocks):
//   mae_fast::random_masking(Tensor device_like, int batch_size, int spatial_tokens,
//       int spatial_keep, int frames, Generator? generator) -> (ids_keep, ids_restore, mask)
//     keys from Philox4x32-10 seeded and offset from the device's generator.
//   mae_fast::random_masking_seeded(..., int seed, int offset): the same with an explicit
//     Philox seed and offset (private: lets tests compare the CPU and CUDA implementations).
//   mae_fast::masking_from_noise(Tensor noise [N, Ls], int spatial_keep, int frames): keys
//     given as noise; equals the reference double argsort of the noise (stable ties).
// `device_like` only carries the device (and the dispatch key): an empty tensor will do.
//
// Sorting: random mode sorts plain 64-bit keys that hold the token index in their low bits
// (distinct keys, see philox.h); noise mode sorts (key, index) pairs. Both order by (key, index),
// the same order the CUDA bitonic sort produces.
//
// CPU generator: each call draws one 64-bit number from the torch CPU generator (under its
// mutex) as the Philox seed, with offset 0. So torch.manual_seed reproduces a run and
// consecutive calls differ. (CUDA takes seed and offset from philox_cuda_state, see the .cu.)
#include "masking.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "mask_rows.h"
#include "philox.h"

namespace mae_fast {
namespace {

struct Entry {
  uint64_t key;
  uint32_t idx;
  bool operator<(const Entry& o) const { return key < o.key || (key == o.key && idx < o.idx); }
};

// One sample's outputs from its sorted order (idx_at(r) = spatial token of rank r); see mask_rows.h.
template <typename IdxAt>
inline void write_sample(int64_t* keep_n, int64_t* restore_n, float* mask_n, int64_t Ls, int64_t Ks, int64_t T,
                         const IdxAt& idx_at) {
  for (int64_t r = 0; r < Ls; ++r) write_rank(r, idx_at(r), Ls, Ks, T, keep_n, restore_n, mask_n);
}

// Sort each sample's entries (filled by fill(n, entries)) and write the three outputs.
template <typename Fill>
void run_cpu(int64_t batch_size, int64_t spatial_tokens, int64_t spatial_keep, int64_t frames,
             MaskingResult& out, const Fill& fill) {
  const int64_t Ls = spatial_tokens, Ks = spatial_keep, T = frames;
  const int64_t L = T * Ls, K = T * Ks;
  int64_t* keep = std::get<0>(out).data_ptr<int64_t>();
  int64_t* restore = std::get<1>(out).data_ptr<int64_t>();
  float* mask = std::get<2>(out).data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Ls, 1));
  at::parallel_for(0, batch_size, grain, [&](int64_t begin, int64_t end) {
    std::vector<Entry> entries(Ls);
    for (int64_t n = begin; n < end; ++n) {
      fill(n, entries.data());
      // Only the order of the first Ks matters for ids_keep, but ids_restore needs every rank.
      std::sort(entries.begin(), entries.end());
      write_sample(keep + n * K, restore + n * L, mask + n * L, Ls, Ks, T,
                   [&](int64_t r) { return static_cast<int64_t>(entries[r].idx); });
    }
  });
}

MaskingResult philox_cpu(const at::Device& device, int64_t batch_size, int64_t spatial_tokens,
                         int64_t spatial_keep, int64_t frames, uint64_t seed, uint64_t offset) {
  check_sizes(batch_size, spatial_tokens, spatial_keep, frames);
  auto out = empty_outputs(device, batch_size, spatial_tokens, spatial_keep, frames);
  const int64_t Ls = spatial_tokens, Ks = spatial_keep, T = frames;
  const int64_t L = T * Ls, K = T * Ks;
  const int bits = index_bits(static_cast<uint64_t>(Ls));
  const uint64_t low = bits == 0 ? uint64_t(0) : (~uint64_t(0) >> (64 - bits));
  int64_t* keep = std::get<0>(out).data_ptr<int64_t>();
  int64_t* restore = std::get<1>(out).data_ptr<int64_t>();
  float* mask = std::get<2>(out).data_ptr<float>();
  // Keys are distinct with the index in their low bits: sort plain 64-bit words.
  const int64_t grain = std::max<int64_t>(1, 16384 / Ls);
  at::parallel_for(0, batch_size, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(Ls);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t s = 0; s < Ls; ++s) {
        keys[s] = masking_key(seed, offset, static_cast<uint64_t>(n), static_cast<uint64_t>(s),
                              static_cast<uint64_t>(Ls), bits);
      }
      std::sort(keys.begin(), keys.end());
      write_sample(keep + n * K, restore + n * L, mask + n * L, Ls, Ks, T,
                   [&](int64_t r) { return static_cast<int64_t>(keys[r] & low); });
    }
  });
  return out;
}

MaskingResult random_masking_seeded_cpu(const at::Tensor& device_like, int64_t batch_size, int64_t spatial_tokens,
                                        int64_t spatial_keep, int64_t frames, int64_t seed, int64_t offset) {
  check_offset(offset);
  return philox_cpu(device_like.device(), batch_size, spatial_tokens, spatial_keep, frames,
                    static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

MaskingResult random_masking_cpu(const at::Tensor& device_like, int64_t batch_size, int64_t spatial_tokens,
                                 int64_t spatial_keep, int64_t frames, const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  return philox_cpu(device_like.device(), batch_size, spatial_tokens, spatial_keep, frames, seed, 0);
}

MaskingResult masking_from_noise_cpu(const at::Tensor& noise_in, int64_t spatial_keep, int64_t frames) {
  check_noise(noise_in, spatial_keep, frames);
  const int64_t batch_size = noise_in.size(0), spatial_tokens = noise_in.size(1);
  const at::Tensor noise = noise_in.contiguous();
  auto out = empty_outputs(noise.device(), batch_size, spatial_tokens, spatial_keep, frames);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "masking_from_noise_cpu", [&] {
    const scalar_t* x = noise.data_ptr<scalar_t>();
    const int64_t Ls = spatial_tokens;
    // Finite check first, outside the parallel region (no exception thrown from worker threads).
    const int64_t total = batch_size * Ls;
    for (int64_t i = 0; i < total; ++i) {
      const double v = static_cast<double>(x[i]);
      TORCH_CHECK_VALUE(std::isfinite(v), "noise must be finite (no NaN or inf), found ", num(v), " at [", num(i / Ls),
                        ", ", num(i % Ls), "]");
    }
    run_cpu(batch_size, spatial_tokens, spatial_keep, frames, out, [&](int64_t n, Entry* e) {
      for (int64_t s = 0; s < Ls; ++s) {
        e[s].key = sortable_bits(static_cast<double>(x[n * Ls + s]));
        e[s].idx = static_cast<uint32_t>(s);
      }
    });
  });
  return out;
}

}  // namespace

// Tests: the raw Philox block for a counter and key (known-answer vectors), and one key.
std::vector<int64_t> philox_block_for_test(std::vector<int64_t> ctr, std::vector<int64_t> key) {
  TORCH_CHECK_VALUE(ctr.size() == 4 && key.size() == 2, "counter needs 4 words and key 2");
  Philox4 c;
  for (int i = 0; i < 4; ++i) c.v[i] = static_cast<uint32_t>(ctr[i]);
  const Philox4 out = philox4x32_10(c, static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}

}  // namespace mae_fast

// FRAGMENT: other parts of mae_fast (Python custom ops) add to the same namespace.
TORCH_LIBRARY_FRAGMENT(mae_fast, m) {
  m.def(
      "random_masking(Tensor device_like, int batch_size, int spatial_tokens, int spatial_keep, int frames, "
      "Generator? generator=None) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "random_masking_seeded(Tensor device_like, int batch_size, int spatial_tokens, int spatial_keep, int frames, "
      "int seed, int offset) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
  m.def(
      "masking_from_noise(Tensor noise, int spatial_keep, int frames) "
      "-> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
}

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("random_masking", &mae_fast::random_masking_cpu);
  m.impl("random_masking_seeded", &mae_fast::random_masking_seeded_cpu);
  m.impl("masking_from_noise", &mae_fast::masking_from_noise_cpu);
}
