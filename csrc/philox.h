// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// one implementation shared by the CPU and the CUDA masking code, so both draw the same keys.
//
// philox4x32_10(counter, key) is a pure function: 128-bit counter, 64-bit key -> 128 random
// bits. The masking engine uses the layout of curand_init(seed, subsequence, offset) +
// curand4(), which is what torch's own CUDA random ops use with the generator's (seed,
// offset): key = seed, counter = (offset / 4 as 64 bits, subsequence as 64 bits), low word
// first. See masking_key() below.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MAE_FAST_HD __host__ __device__ __forceinline__
#else
#define MAE_FAST_HD inline
#endif

namespace mae_fast {

struct Philox4 {
  uint32_t v[4];
};

MAE_FAST_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Ten rounds of Philox4x32 with the published multipliers and Weyl key increments.
MAE_FAST_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    Philox4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Bits needed to hold a spatial token index in [0, spatial_tokens).
MAE_FAST_HD int index_bits(uint64_t spatial_tokens) {
  int b = 0;
  while ((uint64_t(1) << b) < spatial_tokens) ++b;
  return b;
}

// The 64-bit sort key of spatial token s of sample n in random mode.
// Philox block: key = seed, counter = (offset / 4, subsequence = n * spatial_tokens + s)
// (offset is the generator's philox offset, a multiple of 4: each call reserves one 128-bit
// block per subsequence). The key is the first two 32-bit outputs, first word high, with its
// low `bits` = index_bits(spatial_tokens) bits replaced by s: keys are distinct, so every
// sort puts them in the same order on every device, and the remaining 64 - bits (>= 32)
// random bits make ties of the random part (then broken by index) negligible
// (probability < spatial_tokens^2 / 2^(65 - bits) per sample).
MAE_FAST_HD uint64_t masking_key(uint64_t seed, uint64_t offset, uint64_t n, uint64_t s, uint64_t spatial_tokens,
                                 int bits) {
  const uint64_t block = offset >> 2;
  const uint64_t subsequence = n * spatial_tokens + s;
  Philox4 ctr;
  ctr.v[0] = static_cast<uint32_t>(block);
  ctr.v[1] = static_cast<uint32_t>(block >> 32);
  ctr.v[2] = static_cast<uint32_t>(subsequence);
  ctr.v[3] = static_cast<uint32_t>(subsequence >> 32);
  const Philox4 out = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t r = (static_cast<uint64_t>(out.v[0]) << 32) | static_cast<uint64_t>(out.v[1]);
  const uint64_t low = bits == 0 ? uint64_t(0) : (~uint64_t(0) >> (64 - bits));
  return (r & ~low) | s;
}

// A float's value as an unsigned key with the same order (-0.0 and +0.0 equal, as in
// torch.sort). Only finite values reach here (the op validates noise).
MAE_FAST_HD uint64_t sortable_bits(double x) {
  if (x == 0.0) x = 0.0;  // -0.0 -> +0.0
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
}

}  // namespace mae_fast
