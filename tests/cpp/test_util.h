// What the C++ kernel tests share: the failure counter and EXPECT, a seeded generator, and
// activations stored in any of the three dtypes.
#pragma once
#include <c10/util/BFloat16.h>
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

