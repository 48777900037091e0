// Per-element box and matching-cost math, written once for the CPU (.cpp) and CUDA (.cu) kernels.
//
// Every function is DETRKD_HD (a plain inline function on the CPU, __host__ __device__ under nvcc)
// and templated on the compute type T (float, or double for float64 inputs). The kernels differ
// only in how they walk the (b, q, t) pairs: the CPU kernel runs these functions in a loop that
// the compiler vectorizes, the CUDA kernel runs them in one thread per pair.
//
// Conventions shared with common/ops.py's pure-PyTorch fallbacks (the tests hold them equal):
//   * boxes are normalised (cx, cy, w, h) for the matching cost, (x1, y1, x2, y2) for GIoU;
//   * a box's area is max(x2 - x1, 0) * max(y2 - y1, 0), so zero-size boxes have area 0;
//   * IoU = inter / max(union, tiny) and GIoU = IoU - (hull - union) / max(hull, tiny), with tiny
//     the smallest normal number of T: zero-size boxes give finite values (IoU 0, and GIoU 0 for
//     two identical points, -1 for disjoint zero-area boxes);
//   * a box with a NaN coordinate has a NaN area, so its IoU, GIoU and matching costs are NaN
//     (the clamps keep NaN, see dk_min), and linear_sum_assignment then refuses the cost.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace detrkd {

// ---------------------------------------------------------------------------------------------
// Small helpers. min/max are written as comparisons (not fminf/fmaxf) so that the CPU compiler
// maps them to single vector instructions inside vectorized loops.
//
// NaN: a comparison with NaN is false, so these return their FIRST argument when either is NaN.
// Every clamp below passes the computed value first (dk_max(x2 - x1, 0), dk_min(x, 88)), so a NaN
// input stays NaN through it, as in the fallback's torch.clamp / torch.maximum, instead of being
// clamped into a finite number that would look like a real cost. (Same instruction count: x86's
// minps/maxps return their second operand on NaN, and the compiler just swaps the operands.)
// ---------------------------------------------------------------------------------------------

template <typename T>
DETRKD_HD T dk_min(T a, T b) { return b < a ? b : a; }

template <typename T>
DETRKD_HD T dk_max(T a, T b) { return b > a ? b : a; }

// `result`, or NaN when x is NaN or infinite: x - x is 0 for every finite x and NaN otherwise.
// For results of bit-level arithmetic (fast_log below) that cannot carry a NaN by themselves.
template <typename T>
DETRKD_HD T keep_nan(T result, T x) { return result + (x - x); }

DETRKD_HD float dk_abs(float a) { return fabsf(a); }
DETRKD_HD double dk_abs(double a) { return fabs(a); }

// Smallest positive normal number (torch.finfo(dtype).tiny): the floor of the IoU denominators.
template <typename T>
DETRKD_HD T tiny_value();
template <>
DETRKD_HD float tiny_value<float>() { return 1.17549435e-38f; }
template <>
DETRKD_HD double tiny_value<double>() { return 2.2250738585072014e-308; }

DETRKD_HD float int_bits_as_float(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

DETRKD_HD int32_t float_bits_as_int(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

// ---------------------------------------------------------------------------------------------
// exp and log for float, in plain arithmetic.
//
// Why not expf/logf: the focal cost needs one exp and two logs per (query, target) pair, and the
// C library's scalar calls (~15 ns per pair here) would take 4-5 ms at 16 x 900 x 20, four times
// the whole budget. Written as arithmetic, the CPU loops over pairs vectorize (8 pairs per AVX2
// instruction) and the CUDA kernel runs the very same operations, so both backends agree to the
// last bit up to FMA contraction. Accuracy: <= 3 ulp over the ranges used here (checked against
// float64 by tests/test_match_cost.py).
// ---------------------------------------------------------------------------------------------

// ln 2 split into a part with few significant bits (n * kLn2Hi is exact for |n| < 2^11) and the
// rest (Cody & Waite, "Software Manual for the Elementary Functions", 1980).
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.42860682030941723e-6f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// exp(x) = 2^n * exp(r) with n = rint(x / ln 2) and |r| <= ln 2 / 2; exp(r) by a degree-5
// polynomial (max relative error of exp overall 2e-7, under 2 ulp). The caller guarantees x in
// [-87, 88], so that 2^n is a normal float; fast_exp below clamps to that range.
DETRKD_HD float fast_exp_in_range(float x) {
  // n = rint(x / ln 2) by the round-to-nearest of one addition: adding 1.5 * 2^23 leaves no
  // fraction bits, so the sum's low mantissa bits hold n (two's complement for n < 0).
  const float shifted = fmaf(x, kLog2e, kRoundMagic);
  const float n = shifted - kRoundMagic;
  float r = fmaf(n, -kLn2Hi, x);
  r = fmaf(n, -kLn2Lo, r);
  // exp(r) for |r| <= ln 2 / 2 by a degree-5 polynomial (least-max relative error fit, 7.5e-8).
  float p = 8.29765075774936e-3f;
  p = fmaf(p, r, 4.191538175382586e-2f);
  p = fmaf(p, r, 1.666757479298982e-1f);
  p = fmaf(p, r, 4.999889485406184e-1f);
  p = fmaf(p, r, 9.999996919726174e-1f);
  p = fmaf(p, r, 1.0000000716542645f);
  // 2^n: the low bits of `shifted` are n, so (bits << 23) is n << 23 (the magic's own bits
  // shift out), plus the exponent bias 127 << 23.
  // (Unsigned arithmetic: the shift discards high bits by design.)
  const uint32_t two_n = (static_cast<uint32_t>(float_bits_as_int(shifted)) << 23) + (127u << 23);
  return p * int_bits_as_float(static_cast<int32_t>(two_n));
}

// exp(x) for any x: clamped to [-87, 88], so the result is a finite normal float (for x < -87 it
// returns exp(-87) ~ 1.6e-38 instead of a denormal or 0); NaN for a NaN x (the clamps keep it,
// and the polynomial carries it through).
DETRKD_HD float fast_exp(float x) { return fast_exp_in_range(dk_max(dk_min(x, 88.0f), -87.0f)); }

// log(x) for a positive normal float x (all callers guarantee it). Write x = m * 2^e with m in
// [sqrt(1/2), sqrt(2)): subtracting the bits of sqrt(1/2) from x's bits makes the exponent field
// count from there, so e and m come out of three integer operations. Then
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = (m - 1) / (m + 1), |s| <= 0.172
// (a fitted cubic in s^2 replaces the series: relative error 1.6e-9), and log(x) = e ln 2 + log(m)
// (e ln 2 in one rounding: float(ln 2) is off by 3e-9 relative, far below an ulp of the sum).
// Max error over all positive normal floats: 2.7 ulp, near x = 1.28 (from rounding s).
// It reads only x's bits: for a NaN x it returns a finite number. Callers whose argument can be
// NaN wrap the result in keep_nan.
constexpr int32_t kSqrtHalfBits = 0x3f3504f3;  // bits of the float sqrt(1/2)
DETRKD_HD float fast_log(float x) {
  const int32_t shifted = float_bits_as_int(x) - kSqrtHalfBits;
  const int32_t e = shifted >> 23;  // arithmetic shift: floor(log2(x / sqrt(1/2)))
  const float m = int_bits_as_float((shifted & 0x007fffff) + kSqrtHalfBits);  // x / 2^e
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  // 2 atanh(s) / s = 2 + 2 s^2 / 3 + 2 s^4 / 5 + ..., as a degree-3 polynomial in s^2 fitted on
  // [0, 0.0295] (relative error 1.6e-9).
  float p = fmaf(s2, 0.29838710366826743f, 0.3997844912342631f);
  p = fmaf(p, s2, 0.6666677298447229f);
  p = fmaf(p, s2, 2.0f);
  return fmaf(static_cast<float>(e), kLn2, s * p);
}

// exp/log of the compute type: the arithmetic versions above for float, the math library for
// double (the float64 path is a reference path, not a fast one).
DETRKD_HD float dk_exp(float x) { return fast_exp(x); }
DETRKD_HD float dk_exp_in_range(float x) { return fast_exp_in_range(x); }  // x in [-87, 88]
DETRKD_HD float dk_log(float x) { return fast_log(x); }
DETRKD_HD double dk_exp(double x) { return ::exp(x); }
DETRKD_HD double dk_exp_in_range(double x) { return ::exp(x); }
DETRKD_HD double dk_log(double x) { return ::log(x); }

// ---------------------------------------------------------------------------------------------
// Boxes
// ---------------------------------------------------------------------------------------------

// (cx, cy, w, h) -> (x1, y1, x2, y2)
template <typename T>
DETRKD_HD void cxcywh_to_xyxy(T cx, T cy, T w, T h, T& x1, T& y1, T& x2, T& y2) {
  x1 = cx - T(0.5) * w;
  y1 = cy - T(0.5) * h;
  x2 = cx + T(0.5) * w;
  y2 = cy + T(0.5) * h;
}

template <typename T>
DETRKD_HD T box_area(T x1, T y1, T x2, T y2) {
  return dk_max(x2 - x1, T(0)) * dk_max(y2 - y1, T(0));
}

// Generalized IoU (Rezatofighi et al., CVPR 2019, Algorithm 1) and IoU of boxes a and b (xyxy),
// given their areas (computed once per box by the caller, with box_area):
//   IoU  = |a n b| / |a u b|,   GIoU = IoU - |C \ (a u b)| / |C|,  C the smallest enclosing box.
template <typename T>
DETRKD_HD void giou_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b,
                        T& giou, T& iou) {
  const T inter_w = dk_max(dk_min(ax2, bx2) - dk_max(ax1, bx1), T(0));
  const T inter_h = dk_max(dk_min(ay2, by2) - dk_max(ay1, by1), T(0));
  const T inter = inter_w * inter_h;
  const T uni = area_a + area_b - inter;
  iou = inter / dk_max(uni, tiny_value<T>());
  const T hull_w = dk_max(dk_max(ax2, bx2) - dk_min(ax1, bx1), T(0));
  const T hull_h = dk_max(dk_max(ay2, by2) - dk_min(ay1, by1), T(0));
  const T hull = hull_w * hull_h;
  giou = iou - (hull - uni) / dk_max(hull, tiny_value<T>());
}

// L1 distance of two cxcywh boxes, the DETR box cost: |dcx| + |dcy| + |dw| + |dh|.
template <typename T>
DETRKD_HD T l1_distance(T acx, T acy, T aw, T ah, T bcx, T bcy, T bw, T bh) {
  return dk_abs(acx - bcx) + dk_abs(acy - bcy) + dk_abs(aw - bw) + dk_abs(ah - bh);
}

// ---------------------------------------------------------------------------------------------
// Class costs
// ---------------------------------------------------------------------------------------------

// base^gamma for base > 0 (or NaN: then NaN). gamma = 2 (every DETR in this project) is a
// compile-time choice, one multiplication; the CPU kernel picks it outside its vector loop, which
// must stay branch-free.
template <bool kSquareGamma, typename T>
DETRKD_HD T focal_power(T base, T gamma) {
  if constexpr (kSquareGamma) {
    return base * base;
  } else {
    return keep_nan(dk_exp(gamma * dk_log(base)), base);
  }
}

// Focal matching cost of one query for one target class (Deformable DETR's matcher, after
// Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), from that class's logit x:
//   p = sigmoid(x)
//   cost = alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1 - p + 1e-8))
// i.e. the focal loss of calling the query positive minus that of calling it negative.
// 1 - p is computed as e / (1 + e) with e = exp(-x), not by subtraction, so it keeps its
// relative precision when p is close to 1; e is clamped to exp(+-80) so that p and 1 - p are
// positive normal floats (their eps-shifted logs are unaffected: p < 2e-35 is far below 1e-8).
// kSquareGamma: the caller promises gamma == 2. A NaN logit gives a NaN cost (the clamps keep
// it, see dk_min); an infinite one a finite cost, as in the fallback.
template <bool kSquareGamma, typename T>
DETRKD_HD T focal_class_cost(T x, T alpha, T gamma) {
  const T e = dk_exp_in_range(dk_max(dk_min(-x, T(80)), T(-80)));
  const T p = T(1) / (T(1) + e);  // sigmoid(x)
  const T q = e * p;              // 1 - sigmoid(x)
  const T pos = alpha * focal_power<kSquareGamma>(q, gamma) * -dk_log(p + T(1e-8));
  const T neg = (T(1) - alpha) * focal_power<kSquareGamma>(p, gamma) * -dk_log(q + T(1e-8));
  return pos - neg;
}

// DETR's softmax matching cost -softmax(logits)[label] = -exp(x_label - logsumexp(logits)),
// given the query's logsumexp over all classes (computed once per query by the caller).
template <typename T>
DETRKD_HD T softmax_class_cost(T x, T logsumexp) {
  return -dk_exp(x - logsumexp);
}

// A query's logsumexp over its logits from their maximum mx and sum = sum_c exp(x_c - mx):
// mx + log(sum). NaN when a logit is NaN (its term makes sum NaN), so that every class cost of
// that query is NaN, as softmax's is in the fallback.
template <typename T>
DETRKD_HD T logsumexp_from(T mx, T sum) {
  return keep_nan(mx + dk_log(sum), sum);
}

// The DETR matching cost of one (query, target) pair (Carion et al., arXiv:2005.12872, sec. 3.1):
//   w_class * class + w_bbox * L1(cxcywh) - w_giou * GIoU(xyxy).
// The prediction's and the target's xyxy corners and areas come precomputed (once per box).
template <typename T>
DETRKD_HD T pair_match_cost(T class_cost, T pcx, T pcy, T pw, T ph, T px1, T py1, T px2, T py2,
                            T parea, T tcx, T tcy, T tw, T th, T tx1, T ty1, T tx2, T ty2,
                            T tarea, T w_class, T w_bbox, T w_giou) {
  T giou, iou;
  giou_iou(px1, py1, px2, py2, parea, tx1, ty1, tx2, ty2, tarea, giou, iou);
  const T l1 = l1_distance(pcx, pcy, pw, ph, tcx, tcy, tw, th);
  return w_class * class_cost + w_bbox * l1 - w_giou * giou;
}

}  // namespace detrkd
