// Shared pieces of the CPU kernels: activation dtypes and the Hadamard butterfly.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace qamw::cpu {

// Calls f with a null pointer of the C++ type of `dtype` (float, c10::Half, c10::BFloat16).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(static_cast<float*>(nullptr)); break;
    case DType::F16: f(static_cast<c10::Half*>(nullptr)); break;
    case DType::BF16: f(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

// In-place orthonormal Walsh-Hadamard transform of one block of `size` floats (Sylvester
// order). The stride-1, 2 and 4 stages are done together on groups of 8 so that every
// remaining stage is a loop over >= 8 contiguous pairs the compiler vectorises.
inline void fwht_block(float* v, int64_t size) {
  int64_t h = 1;
  if (size >= 8) {
    for (int64_t i = 0; i < size; i += 8) {
      float* a = v + i;
      float s0 = a[0] + a[1], d0 = a[0] - a[1], s1 = a[2] + a[3], d1 = a[2] - a[3];
      float s2 = a[4] + a[5], d2 = a[4] - a[5], s3 = a[6] + a[7], d3 = a[6] - a[7];
      float t0 = s0 + s1, t1 = d0 + d1, t2 = s0 - s1, t3 = d0 - d1;
      float u0 = s2 + s3, u1 = d2 + d3, u2 = s2 - s3, u3 = d2 - d3;
      a[0] = t0 + u0; a[1] = t1 + u1; a[2] = t2 + u2; a[3] = t3 + u3;
      a[4] = t0 - u0; a[5] = t1 - u1; a[6] = t2 - u2; a[7] = t3 - u3;
    }
    h = 8;
  }
  for (; h < size; h *= 2) {
    for (int64_t i = 0; i < size; i += 2 * h) {
      float* __restrict a = v + i;
      float* __restrict b = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        float x = a[j], y = b[j];
        a[j] = x + y;
        b[j] = x - y;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(size));
  for (int64_t j = 0; j < size; ++j) v[j] *= norm;
}

// out[j] = H_block(signs * x / channel_scale) for one row of n values, in fp32.
template <typename T>
void rotate_activation(const T* x, int64_t n, int64_t block, const int8_t* signs,
                       const float* channel_scale, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(x[j]);
    if (channel_scale) v /= channel_scale[j];
    if (signs) v *= static_cast<float>(signs[j]);
    out[j] = v;
  }
  for (int64_t b = 0; b < n; b += block) fwht_block(out + b, block);
}

}  // namespace qamw::cpu
