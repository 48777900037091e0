// CUDA kernels of multi-scale deformable attention (Zhu et al., Deformable DETR,
// arXiv:2010.04159, eq. 2). Arguments are checked in ms_deform_attn.cpp before these run; the
// per-point math (corner rows, bilinear weights and their derivatives) is ms_deform_attn.h, the
// same code the CPU kernels run.
//
// Work mapping: a group of G lanes (G a power of two <= 32, inside one warp) handles one
// (b, q, head); lane i handles channels i, i + G, i + 2G, ... so neighbouring lanes read
// neighbouring channels of a value row (coalesced). G = 32 for Dh >= 32, else the next power of
// two >= Dh, so that small heads still fill their warps.
//   forward:  every lane accumulates its channels over all L * P points in registers and writes
//             them once; no atomics.
//   backward: per point, every lane adds A * w_c * grad_out into the four corners of grad_value
//             with atomicAdd (many queries sample the same cells, so atomics are unavoidable
//             without sorting), and forms its partial sums of grad_attn and grad_loc; the group
//             adds those up with warp shuffles (no shared memory, no __syncthreads) and lane 0
//             writes them. The official kernel instead syncs the block and lets one thread sum
//             the channels serially, per point.
// Types: float, double, half and bfloat16; arithmetic in at::opmath_type (float for the half
// types). For the half types grad_value is accumulated in a float buffer and cast at the end.
// Loops are grid-stride with a capped grid; every pointer is computed inside its iteration.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

namespace {

using detrkd::msda::bilinear_corners;
using detrkd::msda::Corners;
using detrkd::msda::point_grads;

constexpr int kBlock = 256;  // threads per block, a multiple of 32

struct Sizes {
  int64_t B, S, Q, H, L, P, Dh;
};

// Forward. CPL = channels per lane held in registers per pass: the group covers G * CPL channels
// per pass over the points and makes ceil(Dh / (G * CPL)) passes (one unless Dh > 256).
template <typename scalar_t, int G, int CPL>
__global__ void __launch_bounds__(kBlock)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                   const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, Sizes n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_groups = n.B * n.Q * n.H;
  const int lane = threadIdx.x % G;
  const int64_t row_stride = n.H * n.Dh;
  for (int64_t grp = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / G;
       grp < n_groups; grp += static_cast<int64_t>(gridDim.x) * (kBlock / G)) {
    // grp = (b * Q + q) * H + h indexes the output row out[b, q, h*Dh : (h+1)*Dh]
    const int64_t h = grp % n.H, b = grp / (n.Q * n.H);
    const scalar_t* v_bh = value + (b * n.S * n.H + h) * n.Dh;  // row r at v_bh + r * row_stride
    for (int64_t c0 = 0; c0 < n.Dh; c0 += G * CPL) {
      acc_t acc[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) acc[k] = acc_t(0);
      for (int64_t l = 0; l < n.L; ++l) {
        const int64_t Hl = shapes[2 * l], Wl = shapes[2 * l + 1], start = starts[l];
        for (int64_t p = 0; p < n.P; ++p) {
          const int64_t pt = (grp * n.L + l) * n.P + p;
          Corners<acc_t> kc;
          if (!bilinear_corners(static_cast<acc_t>(loc[2 * pt]),
                                static_cast<acc_t>(loc[2 * pt + 1]), Hl, Wl, kc)) {
            continue;
          }
          const acc_t a = static_cast<acc_t>(attn[pt]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t r = start + kc.row[c];
            if (kc.row[c] < 0 || r < 0 || r >= n.S) continue;  // outside (or a bad level table)
            const acc_t w = a * kc.weight[c];
            const scalar_t* vr = v_bh + r * row_stride;
#pragma unroll
            for (int k = 0; k < CPL; ++k) {
              const int64_t ch = c0 + k * G + lane;
              if (ch < n.Dh) acc[k] += w * static_cast<acc_t>(vr[ch]);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t ch = c0 + k * G + lane;
        if (ch < n.Dh) out[grp * n.Dh + ch] = static_cast<scalar_t>(acc[k]);
      }
    }
  }
}

// Sum of v over the G lanes of this lane's group (all 32 lanes of the warp must call it).
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  }
  return v;
}

// Backward. grad_value_acc is grad_value itself (float, double) or a float buffer (half types).
template <typename scalar_t, int G>
__global__ void __launch_bounds__(kBlock)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                    const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                    scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn, Sizes n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_groups = n.B * n.Q * n.H;
  const int lane = threadIdx.x % G;
  const int64_t row_stride = n.H * n.Dh;
  // The loop bound depends on the block only, so all lanes of a warp run the same iterations
  // and reach every shuffle together; groups past the end are inactive but still shuffle.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kBlock; base < n_groups * G;
       base += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t grp = (base + threadIdx.x) / G;  // (b * Q + q) * H + h
    const bool active = grp < n_groups;
    const int64_t h = grp % n.H, b = grp / (n.Q * n.H);
    const int64_t head_offset = (b * n.S * n.H + h) * n.Dh;  // value row r: + r * row_stride
    const scalar_t* g_row = grad_out + grp * n.Dh;
    for (int64_t l = 0; l < n.L; ++l) {
      const int64_t Hl = shapes[2 * l], Wl = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < n.P; ++p) {
        const int64_t pt = (grp * n.L + l) * n.P + p;
        Corners<acc_t> kc;
        const bool inside =
            active && bilinear_corners(static_cast<acc_t>(loc[2 * pt]),
                                       static_cast<acc_t>(loc[2 * pt + 1]), Hl, Wl, kc);
        acc_t ga = 0, gx = 0, gy = 0;  // this lane's share of grad_attn, grad_loc x and y
        if (inside) {
          const acc_t a = static_cast<acc_t>(attn[pt]);
          int64_t offset[4];
          acc_t dot[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t r = start + kc.row[c];
            offset[c] = (kc.row[c] < 0 || r < 0 || r >= n.S) ? -1 : head_offset + r * row_stride;
            dot[c] = acc_t(0);
          }
          for (int64_t ch = lane; ch < n.Dh; ch += G) {
            const acc_t g = static_cast<acc_t>(g_row[ch]);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (offset[c] < 0) continue;
              dot[c] += g * static_cast<acc_t>(value[offset[c] + ch]);
              atomicAdd(grad_value_acc + offset[c] + ch, a * kc.weight[c] * g);
            }
          }
          point_grads(kc, dot, a, ga, gx, gy);  // linear in dot, so partial sums add up
        }
        ga = group_sum<G>(ga);
        gx = group_sum<G>(gx);
        gy = group_sum<G>(gy);
        if (active && lane == 0) {
          grad_attn[pt] = static_cast<scalar_t>(ga);
          grad_loc[2 * pt] = static_cast<scalar_t>(gx);
          grad_loc[2 * pt + 1] = static_cast<scalar_t>(gy);
        }
      }
    }
  }
}

// Lanes per (b, q, head): the next power of two >= Dh, at most a warp.
int lanes_for(int64_t Dh) {
  int g = 1;
  while (g < 32 && g < Dh) g *= 2;
  return g;
}

// Blocks for `threads` threads, capped at 32 per multiprocessor (the loops are grid-stride).
int64_t blocks_for(int64_t threads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return std::max<int64_t>(1, std::min((threads + kBlock - 1) / kBlock, cap));
}

Sizes sizes_of(const at::Tensor& value, const at::Tensor& spatial_shapes,
               const at::Tensor& sampling_loc) {
  return Sizes{value.size(0),        value.size(1),        sampling_loc.size(1), value.size(2),
               spatial_shapes.size(0), sampling_loc.size(4), value.size(3)};
}

// Calls BODY with the compile-time constant G (lanes per group) equal to lanes_for(Dh).
#define DETRKD_DISPATCH_LANES(Dh, ...)                            \
  switch (lanes_for(Dh)) {                                        \
    case 1: { constexpr int G = 1; __VA_ARGS__; break; }          \
    case 2: { constexpr int G = 2; __VA_ARGS__; break; }          \
    case 4: { constexpr int G = 4; __VA_ARGS__; break; }          \
    case 8: { constexpr int G = 8; __VA_ARGS__; break; }          \
    case 16: { constexpr int G = 16; __VA_ARGS__; break; }        \
    default: { constexpr int G = 32; __VA_ARGS__; break; }        \
  }

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes n = sizes_of(value, spatial_shapes, sampling_loc);
  const int64_t n_groups = n.B * n.Q * n.H;
  if (n_groups == 0 || n.Dh == 0) return at::zeros({n.B, n.Q, n.H * n.Dh}, value.options());
  at::Tensor out = at::empty({n.B, n.Q, n.H * n.Dh}, value.options());  // every entry written
  const int lanes = lanes_for(n.Dh);
  const int64_t per_lane = (n.Dh + lanes - 1) / lanes;  // channels each lane covers
  const int64_t blocks = blocks_for(n_groups * lanes);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        const auto args = std::make_tuple(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
            attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
        const auto launch = [&](auto kernel) {  // kernel: a forward_kernel instantiation
          std::apply([&](auto... a) { kernel<<<blocks, kBlock, 0, stream>>>(a...); }, args);
        };
        if (lanes < 32) {
          DETRKD_DISPATCH_LANES(n.Dh, launch(forward_kernel<scalar_t, G, 1>));
        } else if (per_lane <= 1) {
          launch(forward_kernel<scalar_t, 32, 1>);
        } else if (per_lane <= 2) {
          launch(forward_kernel<scalar_t, 32, 2>);
        } else if (per_lane <= 4) {
          launch(forward_kernel<scalar_t, 32, 4>);
        } else {
          launch(forward_kernel<scalar_t, 32, 8>);  // and several passes over the channels
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc,
                                                     const at::Tensor& attn_weight,
                                                     const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes n = sizes_of(value, spatial_shapes, sampling_loc);
  const bool half_type =
      value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // grad_value is summed with atomics: in float for the half types, then cast once.
  at::Tensor grad_value_acc =
      at::zeros_like(value, half_type ? value.options().dtype(at::kFloat) : value.options());
  const int64_t n_groups = n.B * n.Q * n.H;
  const bool work = n_groups > 0 && n.Dh > 0;
  // with work, the kernel writes every entry of grad_loc and grad_attn
  at::Tensor grad_loc = work ? at::empty_like(sampling_loc) : at::zeros_like(sampling_loc);
  at::Tensor grad_attn = work ? at::empty_like(attn_weight) : at::zeros_like(attn_weight);
  if (work) {
    const int64_t blocks = blocks_for(n_groups * lanes_for(n.Dh));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          DETRKD_DISPATCH_LANES(
              n.Dh,
              backward_kernel<scalar_t, G><<<blocks, kBlock, 0, stream>>>(
                  value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                  level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
                  attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                  grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
                  grad_attn.data_ptr<scalar_t>(), n));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_value = half_type ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_loc, grad_attn};
}
