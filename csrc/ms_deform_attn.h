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
// has zero gradient (NaN and infinite locations: NaN, see below). The derivatives of the corner
// weights, used for the location gradient:
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

// floor(v) as an index, for the pixel coordinates bilinear_taps sees (clamped into [-1, W] and
// [-1, H], far inside the integer range). On the GPU floorf is one instruction. On the CPU the
// int cast truncates toward zero and negative non-integers step down by one: the same values, in
// a form that vectorizes under the default -ftrapping-math (floor() does not).
template <typename index_t, typename acc_t>
DETRKD_HD index_t floor_to_index(acc_t v) {
#ifdef __CUDA_ARCH__
  return static_cast<index_t>(floor(v));
#else
  const index_t i = static_cast<index_t>(v);
  return i - static_cast<index_t>(static_cast<acc_t>(i) > v);
#endif
}

// The pieces of one bilinear sample, shared by bilinear_corners (CUDA kernels, CPU backward)
// and bilinear_taps (CPU forward), so that both compute the same values.
//
// NaN and infinite locations follow grid_sample (the fallback, which is grid_sample): such a
// point samples NaN whatever the values; no value row is read for it and grad_value gets nothing
// from it; its attention weight's gradient is NaN, and so is its location gradient along each
// axis whose weights depend on a NaN fraction (a NaN x makes fx NaN, hence dw_c/dpy and grad_y;
// dw_c/dpx involves only fy, so grad_x stays 0, as grid_sample's does). The kernels get this
// without branches: such a point fails the in-map test (every comparison with NaN is false), its
// pixel coordinates are clamped to a safe place before floor() and the int cast, and its
// fractions fx, fy get x - x and y - y added (0 for a finite coordinate, NaN for a NaN or
// infinite one), so the corner weights and their derivatives are NaN exactly where grid_sample's
// are. Huge but finite locations are ordinary points outside the map: zero sample, zero
// gradients.

// Pixel coordinates of the location (x, y) on a level of `height` x `width` cells, and whether
// any corner can be inside the map: the point lies in [-1, W) x [-1, H). The test `px >= -1`
// (not `> -1`) keeps grid_sample's gradient at px == -1 exactly, where the in-map corner has
// weight 0 but a non-zero derivative. NaN locations fail the test.
template <typename acc_t, typename index_t>
DETRKD_HD bool pixel_coords(acc_t x, acc_t y, index_t height, index_t width, acc_t& px,
                            acc_t& py) {
  px = x * static_cast<acc_t>(width) - acc_t(0.5);
  py = y * static_cast<acc_t>(height) - acc_t(0.5);
  // (& rather than &&: no short-circuit branches, so that loops over points vectorize)
  return (px >= acc_t(-1)) & (px < static_cast<acc_t>(width)) & (py >= acc_t(-1)) &
         (py < static_cast<acc_t>(height));
}

// The four corners of one sample: their rows (h * W + w; meaningless for corners outside),
// which are inside the map (all four false for a point outside [-1, W) x [-1, H)), their
// bilinear weights, and the fractional parts fx, fy (for the derivatives). Scalar fields, not
// arrays, so that a loop over points keeps them in vector registers.
template <typename acc_t, typename index_t>
struct Taps {
  index_t row0, row1, row2, row3;
  bool in0, in1, in2, in3;
  acc_t w0, w1, w2, w3;
  acc_t fx, fy;
};

// The taps of the location (x, y), without branches, so that a loop over points vectorizes.
template <typename acc_t, typename index_t>
DETRKD_HD Taps<acc_t, index_t> bilinear_taps(acc_t x, acc_t y, index_t height, index_t width) {
  acc_t px, py;
  const bool any = pixel_coords(x, y, height, width, px, py);
  // Clamped into [-1, W] x [-1, H] (a NaN fails the comparison and becomes -1), so that floor()
  // and the int cast never see huge or NaN values; this changes nothing for a point inside,
  // whose taps are the ones used.
  px = px > acc_t(-1) ? px : acc_t(-1);
  px = px < static_cast<acc_t>(width) ? px : static_cast<acc_t>(width);
  py = py > acc_t(-1) ? py : acc_t(-1);
  py = py < static_cast<acc_t>(height) ? py : static_cast<acc_t>(height);
  Taps<acc_t, index_t> t;
  const index_t w0 = floor_to_index<index_t>(px), h0 = floor_to_index<index_t>(py);
  // in [0, 1); NaN for a NaN or infinite coordinate (x - x, see above)
  t.fx = (px - static_cast<acc_t>(w0)) + (x - x);
  t.fy = (py - static_cast<acc_t>(h0)) + (y - y);
  const acc_t gx = acc_t(1) - t.fx, gy = acc_t(1) - t.fy;
  const bool in_w0 = w0 >= 0, in_w1 = w0 + 1 < width;  // w0 < width holds where any does
  const bool in_h0 = h0 >= 0, in_h1 = h0 + 1 < height;
  t.in0 = any & in_h0 & in_w0, t.in1 = any & in_h0 & in_w1;
  t.in2 = any & in_h1 & in_w0, t.in3 = any & in_h1 & in_w1;
  t.row0 = h0 * width + w0, t.row1 = t.row0 + 1;
  t.row2 = (h0 + 1) * width + w0, t.row3 = t.row2 + 1;
  t.w0 = gy * gx, t.w1 = gy * t.fx, t.w2 = t.fy * gx, t.w3 = t.fy * t.fx;
  return t;
}

// The weight a corner enters the sample with: its bilinear weight w when the corner is inside
// the map, else w * 0, which is 0, or NaN for a NaN or infinite location. (A corner outside reads
// a row of zeros, or is skipped; this keeps the point's NaN either way: 0 * NaN is NaN.)
template <typename acc_t>
DETRKD_HD acc_t tap_weight(bool in, acc_t w) {
  return in ? w : w * acc_t(0);
}

// Fills `k` for the location (x, y) on a level of `height` x `width` cells: rows (-1 for
// corners outside the map), weights and their derivatives, NaN for a NaN or infinite location.
// Returns whether any corner is inside the map; when none is, the sample is zero and its
// gradients are those of outside_point_grads.
template <typename acc_t, typename index_t>
DETRKD_HD bool bilinear_corners(acc_t x, acc_t y, index_t height, index_t width,
                                Corners<acc_t, index_t>& k) {
  const Taps<acc_t, index_t> t = bilinear_taps(x, y, height, width);
  k.row[0] = t.in0 ? t.row0 : index_t(-1);
  k.row[1] = t.in1 ? t.row1 : index_t(-1);
  k.row[2] = t.in2 ? t.row2 : index_t(-1);
  k.row[3] = t.in3 ? t.row3 : index_t(-1);
  k.weight[0] = t.w0, k.weight[1] = t.w1, k.weight[2] = t.w2, k.weight[3] = t.w3;
  const acc_t gx = acc_t(1) - t.fx, gy = acc_t(1) - t.fy;
  const acc_t W = static_cast<acc_t>(width), H = static_cast<acc_t>(height);
  k.dweight_dx[0] = -gy * W;
  k.dweight_dx[1] = gy * W;
  k.dweight_dx[2] = -t.fy * W;
  k.dweight_dx[3] = t.fy * W;
  k.dweight_dy[0] = -gx * H;
  k.dweight_dy[1] = -t.fx * H;
  k.dweight_dy[2] = gx * H;
  k.dweight_dy[3] = t.fx * H;
  return t.in0 | t.in1 | t.in2 | t.in3;
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

// <g, 0> for the upstream gradient g of a query-head: 0, or NaN when g holds a NaN or inf.
// Summed over this thread's channels of g; the parts add up like any dot product.
template <typename acc_t>
DETRKD_HD acc_t zero_dot_term(acc_t g) {
  return g * acc_t(0);
}

// Gradients of a point with no corner inside the map: every corner reads zero, so
// dot_c = <grad_out, 0> = g_zero (the sum of zero_dot_term over grad_out's channels) and
// point_grads gives 0, except where grid_sample's gives NaN: a NaN or infinite location (NaN
// weights or derivatives), a NaN or infinite attention weight (a * 0), a NaN or inf in grad_out.
// The kernels take this path instead of the four corner loops, whose rows would all be zeros.
template <typename acc_t, typename index_t>
DETRKD_HD void outside_point_grads(const Corners<acc_t, index_t>& k, acc_t g_zero, acc_t attn,
                                   acc_t& grad_attn, acc_t& grad_x, acc_t& grad_y) {
  const acc_t dot[4] = {g_zero, g_zero, g_zero, g_zero};
  point_grads(k, dot, attn, grad_attn, grad_x, grad_y);
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
