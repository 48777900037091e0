// Per-sample-point math of multi-scale deformable attention (Zhu et al., Deformable DETR,
// arXiv:2010.04159, eq. 2), shared by the CPU kernels (ms_deform_attn.cpp) and the CUDA kernels
// (ms_deform_attn_cuda.cu). Only the loops, the threading and the reductions differ between them.
//
// A sampling location (x, y) in [0, 1] over a level of H x W cells maps to the pixel coordinate
//     px = x * W - 0.5,   py = y * H - 0.5
// (cell centres sit at integers; this is grid_sample's align_corners=False). The sample is the
// bilinear blend of the four cells around (px, py):
//     v(px, py) = sum_c  w_c * V[h_c, w_c],   c in {00, 01, 10, 11} = {top-left, top-right,
//                                                                     bottom-left, bottom-right}
//     w_00 = (1 - fy)(1 - fx),  w_01 = (1 - fy) fx,  w_10 = fy (1 - fx),  w_11 = fy fx
// with h0 = floor(py), w0 = floor(px), fy = py - h0, fx = px - w0. A corner outside the map reads
// zero (grid_sample's padding_mode='zeros'), so a point beyond (-1, W) x (-1, H) samples zero and
// has zero gradient. The derivatives of the corner weights, used for the location gradient:
//     dw_00/dpx = -(1 - fy),  dw_01/dpx = (1 - fy),  dw_10/dpx = -fy,  dw_11/dpx = fy
//     dw_00/dpy = -(1 - fx),  dw_01/dpy = -fx,       dw_10/dpy = (1 - fx), dw_11/dpy = fx
// and d/dx = W d/dpx, d/dy = H d/dpy.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace detrkd {
namespace msda {

// The four corners of one bilinear sample on one level: where they are in the level's rows and
// how much each weighs. `row[c]` is the row (h * W + w) of corner c inside the level, or -1 when
// the corner lies outside the map; `weight[c]` is its bilinear weight and `dweight_dx[c]`,
// `dweight_dy[c]` the derivatives of that weight w.r.t. the *normalised* location x and y.
// index_t is the integer type of the rows: int64_t on the CPU; the CUDA kernels use int32_t when
// every tensor has fewer than 2^31 elements (64-bit integer multiplies cost several 32-bit ones
// on a GPU), which requires H * W < 2^31 for the level.
template <typename acc_t, typename index_t = int64_t>
struct Corners {
  index_t row[4];
  acc_t weight[4];
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];
};

DETRKD_HD float floor_of(float v) { return floorf(v); }
DETRKD_HD double floor_of(double v) { return floor(v); }

// Fills `k` for the location (x, y) on a level of `height` x `width` cells. Returns false (and
// leaves `k` untouched) when no corner is inside the map: the sample and its gradients are zero.
// The test `px >= -1` (not `> -1`) keeps grid_sample's gradient at px == -1 exactly, where the
// in-map corner has weight 0 but a non-zero derivative. NaN locations fail the test and sample 0.
template <typename acc_t, typename index_t>
DETRKD_HD bool bilinear_corners(acc_t x, acc_t y, index_t height, index_t width,
                                Corners<acc_t, index_t>& k) {
  const acc_t px = x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t py = y * static_cast<acc_t>(height) - acc_t(0.5);
  if (!(px >= acc_t(-1) && px < static_cast<acc_t>(width) && py >= acc_t(-1) &&
        py < static_cast<acc_t>(height))) {
    return false;  // also keeps floor() of huge or NaN coordinates away from the int cast
  }
  const acc_t fw0 = floor_of(px), fh0 = floor_of(py);
  const index_t w0 = static_cast<index_t>(fw0), h0 = static_cast<index_t>(fh0);
  const acc_t fx = px - fw0, fy = py - fh0;  // fractional parts in [0, 1)
  const acc_t gx = acc_t(1) - fx, gy = acc_t(1) - fy;
  const bool in_w0 = w0 >= 0, in_w1 = w0 + 1 < width;  // w0 < width holds since px < width
  const bool in_h0 = h0 >= 0, in_h1 = h0 + 1 < height;
  const acc_t W = static_cast<acc_t>(width), H = static_cast<acc_t>(height);

  k.row[0] = (in_h0 && in_w0) ? h0 * width + w0 : -1;
  k.row[1] = (in_h0 && in_w1) ? h0 * width + w0 + 1 : -1;
  k.row[2] = (in_h1 && in_w0) ? (h0 + 1) * width + w0 : -1;
  k.row[3] = (in_h1 && in_w1) ? (h0 + 1) * width + w0 + 1 : -1;
  k.weight[0] = gy * gx;
  k.weight[1] = gy * fx;
  k.weight[2] = fy * gx;
  k.weight[3] = fy * fx;
  k.dweight_dx[0] = -gy * W;
  k.dweight_dx[1] = gy * W;
  k.dweight_dx[2] = -fy * W;
  k.dweight_dx[3] = fy * W;
  k.dweight_dy[0] = -gx * H;
  k.dweight_dy[1] = -fx * H;
  k.dweight_dy[2] = gx * H;
  k.dweight_dy[3] = fx * H;
  return true;
}

// Location and weight gradients of one sample point from the per-corner dot products
// dot[c] = <grad_out, V[corner c]> (the upstream gradient of this query-head's output, dotted
// with the corner's value vector; 0 for corners outside the map):
//     d out / d a = sum_c w_c dot_c           (a: the attention weight)
//     d out / d x = a * sum_c dw_c/dx dot_c,  same for y.
template <typename acc_t, typename index_t>
DETRKD_HD void point_grads(const Corners<acc_t, index_t>& k, const acc_t dot[4], acc_t attn,
                           acc_t& grad_attn, acc_t& grad_x, acc_t& grad_y) {
  acc_t ga = 0, gx = 0, gy = 0;
  for (int c = 0; c < 4; ++c) {
    ga += k.weight[c] * dot[c];
    gx += k.dweight_dx[c] * dot[c];
    gy += k.dweight_dy[c] * dot[c];
  }
  grad_attn = ga;
  grad_x = attn * gx;
  grad_y = attn * gy;
}

}  // namespace msda
}  // namespace detrkd

#ifdef WITH_CUDA
// The CUDA kernels (ms_deform_attn_cuda.cu); ms_deform_attn.cpp checks the arguments first.
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight);
std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc,
                                                     const at::Tensor& attn_weight,
                                                     const at::Tensor& grad_output);
#endif
