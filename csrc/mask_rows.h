// The outputs of one sample from its sorted order, written the same way by the CPU and the CUDA engine.
//
// Rank r (the r-th smallest key) of spatial token s, for each of the T frames (K = T*Ks, L = T*Ls):
//   r < Ks:   ids_keep[t*Ks + r] = t*Ls + s,  ids_restore[t*Ls + s] = t*Ks + r,                  mask = 0
//   r >= Ks:                                  ids_restore[t*Ls + s] = K + t*(Ls-Ks) + (r-Ks),    mask = 1
// For T == 1 this is exactly the reference's double argsort. Plain C++ (host and device), no ATen.
#pragma once

#include <cstdint>

#include "philox.h"  // MAE_FAST_HD

namespace mae_fast {

MAE_FAST_HD void write_rank(int64_t r, int64_t s, int64_t Ls, int64_t Ks, int64_t T, int64_t* keep_n,
                            int64_t* restore_n, float* mask_n) {
  const int64_t K = T * Ks;
  for (int64_t t = 0; t < T; ++t) {
    if (r < Ks) {
      keep_n[t * Ks + r] = t * Ls + s;
      restore_n[t * Ls + s] = t * Ks + r;
      mask_n[t * Ls + s] = 0.f;
    } else {
      restore_n[t * Ls + s] = K + t * (Ls - Ks) + (r - Ks);
      mask_n[t * Ls + s] = 1.f;
    }
  }
}

}  // namespace mae_fast
