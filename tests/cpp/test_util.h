// What the C++ kernel tests share: the failure counter and EXPECT, a seeded generator,
// activations stored in any of the three dtypes, and random AAAC group scales.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

inline int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
      ++failures;                                           \
    }                                                       \
  } while (0)

inline std::mt19937 rng(7);
inline float normal() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

// Activations of `dtype` stored in raw bytes, and read back as float.
struct Activations {
  qamw::DType dtype;
  std::vector<float> f32;
  std::vector<c10::Half> f16;
  std::vector<c10::BFloat16> bf16;
  explicit Activations(qamw::DType d, int64_t size) : dtype(d) {
    if (d == qamw::DType::F32) f32.resize(size);
    if (d == qamw::DType::F16) f16.resize(size);
    if (d == qamw::DType::BF16) bf16.resize(size);
  }
  void* data() {
    if (dtype == qamw::DType::F16) return f16.data();
    if (dtype == qamw::DType::BF16) return bf16.data();
    return f32.data();
  }
  void set(int64_t i, float v) {
    if (dtype == qamw::DType::F32) f32[i] = v;
    if (dtype == qamw::DType::F16) f16[i] = c10::Half(v);
    if (dtype == qamw::DType::BF16) bf16[i] = c10::BFloat16(v);
  }
  float get(int64_t i) const {
    if (dtype == qamw::DType::F16) return static_cast<float>(f16[i]);
    if (dtype == qamw::DType::BF16) return static_cast<float>(bf16[i]);
    return f32[i];
  }
};

inline const qamw::DType kDtypes[] = {qamw::DType::F32, qamw::DType::F16, qamw::DType::BF16};
// Relative rounding of one value stored in each dtype, with room for fp32 accumulation.
inline double tolerance(qamw::DType d) {
  return d == qamw::DType::F32 ? 1e-4 : d == qamw::DType::F16 ? 2e-3 : 1.6e-2;
}


// `count` random AAAC group scales, stored as fp16 and as FP8 e4m3: the first is -0 (a zero
// scale still carries its codebook choice), and every third is small (FP8 subnormals).
struct AaacScales {
  std::vector<c10::Half> f16;
  std::vector<c10::Float8_e4m3fn> f8;
  explicit AaacScales(int64_t count) : f16(count), f8(count) {
    for (int64_t g = 0; g < count; ++g) {
      const float v = g == 0 ? -0.0f : normal() * (g % 3 == 0 ? 0.01f : 1.0f);
      f16[g] = c10::Half(v);
      f8[g] = c10::Float8_e4m3fn(v);
    }
  }
  const void* data(qamw::ScaleType t) const {
    return t == qamw::ScaleType::F16 ? static_cast<const void*>(f16.data())
                                     : static_cast<const void*>(f8.data());
  }
  float stored(qamw::ScaleType t, int64_t g) const {
    return t == qamw::ScaleType::F16 ? float(f16[g]) : float(f8[g]);
  }
};
