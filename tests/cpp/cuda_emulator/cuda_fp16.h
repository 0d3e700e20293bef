// Emulated <cuda_fp16.h> (see cuda_runtime.h): __half as IEEE binary16, rounded to nearest even.
#pragma once
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  unsigned short bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }

struct __half2 {
  __half x, y;
};
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{__float2half_rn(a), __float2half_rn(b)};
}
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
