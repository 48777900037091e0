// Shared definitions for the CPU (.cpp) and CUDA (.cu) translation units of common._C.
//
// DETRKD_HD marks the per-element math that both backends run: on the CPU it is a plain inline
// function (so the CPU tests exercise exactly the arithmetic the CUDA kernels run), under nvcc it
// is a __host__ __device__ inline function.
#pragma once

#ifdef __CUDACC__
#define DETRKD_HD __host__ __device__ __forceinline__
#else
#define DETRKD_HD inline
#endif

#include <ATen/ATen.h>

#define DETRKD_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
#define DETRKD_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got ", (x).dim())
