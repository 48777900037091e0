// CUDA kernels of match_cost and pairwise_giou (arguments are checked in match_cost.cpp).
//
// match_cost: ONE launch for the whole batch, one warp per query row (b, q). For the softmax
// class cost the warp first reduces the row's logsumexp over the C classes (lanes stride over the
// classes, then shuffles), so the normalisation costs one pass over the logits per query, not one
// per pair; then the lanes stride over the row's T targets and write the row coalesced. The
// per-pair arithmetic is box_math.h's, the same functions the CPU kernel runs.
//
// Inputs may be float32, float16, bfloat16 (computed in float32) or float64 (computed in
// float64); the cost is float32, or float64 for float64 inputs.
//
// Bad values cannot be checked on the host without a device sync, so the kernel makes them loud
// instead: an image whose num_targets lies outside [0, T] gets a NaN block, and a real target
// whose label lies outside [0, C) gets NaN costs (linear_sum_assignment then reports the image).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include <limits>
#include <vector>

#include "box_math.h"
#include "common.h"

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads: 8 query rows per block

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// scalar_t: input type; acc_t: compute and output type (float, or double for double inputs).
template <typename scalar_t, typename acc_t, int kClassMode, bool kSquareGamma>
__global__ void match_cost_kernel(const scalar_t* __restrict__ logits,      // (B, Q, C)
                                  const scalar_t* __restrict__ boxes,       // (B, Q, 4) cxcywh
                                  const int64_t* __restrict__ labels,       // (B, T)
                                  const scalar_t* __restrict__ tgt_boxes,   // (B, T, 4) cxcywh
                                  const int64_t* __restrict__ num_targets,  // (B,)
                                  int64_t B, int64_t Q, int64_t C, int64_t T, acc_t w_class,
                                  acc_t w_bbox, acc_t w_giou, acc_t alpha, acc_t gamma,
                                  acc_t* __restrict__ cost) {               // (B, Q, T)
  using namespace detrkd;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B * Q) return;  // whole warps leave together: row is uniform across the warp
  const int64_t b = row / Q;
  const int64_t n = num_targets[b];
  acc_t* out = cost + row * T;  // (T,)
  if (n < 0 || n > T) {  // invalid count: a NaN block instead of reading out of bounds
    for (int64_t t = lane; t < T; t += kWarp) out[t] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const scalar_t* logit = logits + row * C;  // (C,)

  acc_t lse = 0;
  if (kClassMode == 1 && n > 0) {  // softmax: logsumexp over the C classes, by the whole warp
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = lane; c < C; c += kWarp) mx = dk_max(mx, static_cast<acc_t>(logit[c]));
    mx = warp_max(mx);
    acc_t sum = 0;
    for (int64_t c = lane; c < C; c += kWarp) sum += dk_exp(static_cast<acc_t>(logit[c]) - mx);
    lse = logsumexp_from(mx, warp_sum(sum));  // NaN if a logit is NaN
  }

  // The prediction's box, converted once per lane (4 loads, cached).
  const acc_t pcx = static_cast<acc_t>(boxes[4 * row]), pcy = static_cast<acc_t>(boxes[4 * row + 1]);
  const acc_t pw = static_cast<acc_t>(boxes[4 * row + 2]), ph = static_cast<acc_t>(boxes[4 * row + 3]);
  acc_t px1, py1, px2, py2;
  cxcywh_to_xyxy(pcx, pcy, pw, ph, px1, py1, px2, py2);
  const acc_t parea = box_area(px1, py1, px2, py2);

  for (int64_t t = lane; t < T; t += kWarp) {
    if (t >= n) {
      out[t] = acc_t(0);  // padded target
      continue;
    }
    const int64_t i = b * T + t;
    const int64_t label = labels[i];
    if (label < 0 || label >= C) {  // invalid label: NaN instead of reading out of bounds
      out[t] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    const acc_t x = static_cast<acc_t>(logit[label]);
    const acc_t cls = kClassMode == 0 ? focal_class_cost<kSquareGamma>(x, alpha, gamma)
                                      : softmax_class_cost(x, lse);
    const acc_t tcx = static_cast<acc_t>(tgt_boxes[4 * i]), tcy = static_cast<acc_t>(tgt_boxes[4 * i + 1]);
    const acc_t tw = static_cast<acc_t>(tgt_boxes[4 * i + 2]), th = static_cast<acc_t>(tgt_boxes[4 * i + 3]);
    acc_t tx1, ty1, tx2, ty2;
    cxcywh_to_xyxy(tcx, tcy, tw, th, tx1, ty1, tx2, ty2);
    const acc_t tarea = box_area(tx1, ty1, tx2, ty2);
    out[t] = pair_match_cost(cls, pcx, pcy, pw, ph, px1, py1, px2, py2, parea, tcx, tcy, tw, th,
                             tx1, ty1, tx2, ty2, tarea, w_class, w_bbox, w_giou);
  }
}

// One thread per (b, n, m) pair, grid-stride; consecutive threads write consecutive m.
template <typename scalar_t>
__global__ void pairwise_giou_kernel(const scalar_t* __restrict__ a,  // (B, N, 4) xyxy
                                     const scalar_t* __restrict__ b,  // (B, M, 4) xyxy
                                     int64_t B, int64_t N, int64_t M,
                                     scalar_t* __restrict__ giou,     // (B, N, M)
                                     scalar_t* __restrict__ iou) {    // (B, N, M)
  using namespace detrkd;
  const int64_t total = B * N * M;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx % M;
    const int64_t bn = idx / M;           // b * N + n
    const int64_t bm = (bn / N) * M + m;  // b * M + m
    const scalar_t ax1 = a[4 * bn], ay1 = a[4 * bn + 1], ax2 = a[4 * bn + 2], ay2 = a[4 * bn + 3];
    const scalar_t bx1 = b[4 * bm], by1 = b[4 * bm + 1], bx2 = b[4 * bm + 2], by2 = b[4 * bm + 3];
    scalar_t g, u;
    giou_iou(ax1, ay1, ax2, ay2, box_area(ax1, ay1, ax2, ay2), bx1, by1, bx2, by2,
             box_area(bx1, by1, bx2, by2), g, u);
    giou[idx] = g;
    iou[idx] = u;
  }
}

}  // namespace

at::Tensor match_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                           const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                           const at::Tensor& num_targets, int64_t class_mode, double w_class,
                           double w_bbox, double w_giou, double alpha, double gamma) {
  const c10::cuda::CUDAGuard guard(pred_logits.device());
  const int64_t B = pred_logits.size(0), Q = pred_logits.size(1), C = pred_logits.size(2);
  const int64_t T = tgt_labels.size(1);
  const auto out_dtype = pred_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor cost = at::empty({B, Q, T}, pred_logits.options().dtype(out_dtype));
  if (cost.numel() == 0) return cost;
  const int64_t rows = B * Q;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "match_cost: B*Q=", rows,
              " is too large for one launch");
  const bool square_gamma = gamma == 2.0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_logits.scalar_type(),
                                  "match_cost_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(
          pred_logits.data_ptr<scalar_t>(), pred_boxes.data_ptr<scalar_t>(),
          tgt_labels.data_ptr<int64_t>(), tgt_boxes.data_ptr<scalar_t>(),
          num_targets.data_ptr<int64_t>(), B, Q, C, T, static_cast<acc_t>(w_class),
          static_cast<acc_t>(w_bbox), static_cast<acc_t>(w_giou), static_cast<acc_t>(alpha),
          static_cast<acc_t>(gamma), cost.data_ptr<acc_t>());
    };
    if (class_mode == 1) {
      launch(match_cost_kernel<scalar_t, acc_t, 1, true>);
    } else if (square_gamma) {
      launch(match_cost_kernel<scalar_t, acc_t, 0, true>);
    } else {
      launch(match_cost_kernel<scalar_t, acc_t, 0, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cost;
}

std::vector<at::Tensor> pairwise_giou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  at::Tensor giou = at::empty({B, N, M}, boxes1.options());
  at::Tensor iou = at::empty_like(giou);
  const int64_t total = giou.numel();
  if (total == 0) return {giou, iou};
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "pairwise_giou_cuda", [&] {
    pairwise_giou_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        boxes1.data_ptr<scalar_t>(), boxes2.data_ptr<scalar_t>(), B, N, M,
        giou.data_ptr<scalar_t>(), iou.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {giou, iou};
}
