// The asynchronous copies of <cuda_pipeline.h> for the CUDA emulator (cuda_runtime.h). A copy is
// only queued, and made when a __pipeline_wait_prior covers its batch: code that reads the
// destination before waiting reads what was there before (NaN bytes in fresh shared memory).
#pragma once
#include <cstddef>

#include "cuda_runtime.h"

namespace qamw_emu {
void pipeline_copy(void* dst, const void* src, size_t bytes);
void pipeline_commit();
void pipeline_wait_prior(size_t prior);
}  // namespace qamw_emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align,
                                    size_t zfill = 0) {
  (void)zfill;
  qamw_emu::pipeline_copy(dst, src, size_and_align);
}
inline void __pipeline_commit() { qamw_emu::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t prior) { qamw_emu::pipeline_wait_prior(prior); }
