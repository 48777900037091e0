// DETR matching cost and batched pairwise GIoU: argument checks, CPU kernels, dispatch to CUDA.
//
// match_cost builds, for every image b, only its own (Q x T) block of the Hungarian matcher's cost
// (B x Q x T_max with per-image target counts), never the (B*Q x sum T) matrix of the reference
// DETR matcher. The per-pair math lives in box_math.h and is shared with match_cost_cuda.cu.
//
// CPU kernel layout: at::parallel_for runs over blocks of kRows queries of one image. Per block,
// three branch-free loops over contiguous arrays that the compiler vectorizes (`omp simd`),
// box_math.h's float exp/log included: gather the logits of the targets' classes, the focal class
// cost flat over the whole (kRows x targets) block (most of the arithmetic, so it runs whole
// vectors whatever the target count), then the L1 and GIoU terms per query row against the
// image's targets held as structure of arrays. Each prediction box is converted once, each
// softmax logsumexp taken once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "box_math.h"
#include "common.h"
#include "ops.h"

#ifdef WITH_CUDA
// Defined in match_cost_cuda.cu; the arguments are checked here first.
at::Tensor match_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                           const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                           const at::Tensor& num_targets, int64_t class_mode, double w_class,
                           double w_bbox, double w_giou, double alpha, double gamma);
std::vector<at::Tensor> pairwise_giou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2);
#endif

namespace {

constexpr int64_t kFocal = 0;
constexpr int64_t kSoftmax = 1;

// Checks shared by both devices. The messages name the argument, as common/ops.py's do.
void check_match_cost_args(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                           const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                           const at::Tensor& num_targets, int64_t class_mode) {
  DETRKD_CHECK_DIM(pred_logits, 3);
  DETRKD_CHECK_DIM(pred_boxes, 3);
  DETRKD_CHECK_DIM(tgt_labels, 2);
  DETRKD_CHECK_DIM(tgt_boxes, 3);
  DETRKD_CHECK_DIM(num_targets, 1);
  const int64_t B = pred_logits.size(0), Q = pred_logits.size(1), T = tgt_labels.size(1);
  TORCH_CHECK(pred_boxes.size(0) == B && pred_boxes.size(1) == Q && pred_boxes.size(2) == 4,
              "pred_boxes must have shape (B=", B, ", Q=", Q, ", 4), got ", pred_boxes.sizes());
  TORCH_CHECK(tgt_labels.size(0) == B, "tgt_labels must have shape (B=", B, ", T), got ",
              tgt_labels.sizes());
  TORCH_CHECK(tgt_boxes.size(0) == B && tgt_boxes.size(1) == T && tgt_boxes.size(2) == 4,
              "tgt_boxes must have shape (B=", B, ", T=", T, ", 4), got ", tgt_boxes.sizes());
  TORCH_CHECK(num_targets.size(0) == B, "num_targets must have B=", B, " entries, got ",
              num_targets.size(0));
  TORCH_CHECK(pred_logits.is_floating_point(), "pred_logits must be floating point, got ",
              pred_logits.scalar_type());
  TORCH_CHECK(pred_boxes.scalar_type() == pred_logits.scalar_type() &&
                  tgt_boxes.scalar_type() == pred_logits.scalar_type(),
              "pred_logits, pred_boxes and tgt_boxes must share a dtype, got ",
              pred_logits.scalar_type(), ", ", pred_boxes.scalar_type(), ", ",
              tgt_boxes.scalar_type());
  TORCH_CHECK(tgt_labels.scalar_type() == at::kLong, "tgt_labels must be int64, got ",
              tgt_labels.scalar_type());
  TORCH_CHECK(num_targets.scalar_type() == at::kLong, "num_targets must be int64, got ",
              num_targets.scalar_type());
  TORCH_CHECK(class_mode == kFocal || class_mode == kSoftmax,
              "class_mode must be 0 (focal) or 1 (softmax), got ", class_mode);
  const auto device = pred_logits.device();
  TORCH_CHECK(pred_boxes.device() == device && tgt_labels.device() == device &&
                  tgt_boxes.device() == device && num_targets.device() == device,
              "all inputs must be on one device, got pred_logits on ", device, ", pred_boxes on ",
              pred_boxes.device(), ", tgt_labels on ", tgt_labels.device(), ", tgt_boxes on ",
              tgt_boxes.device(), ", num_targets on ", num_targets.device());
  DETRKD_CHECK_CONTIGUOUS(pred_logits);
  DETRKD_CHECK_CONTIGUOUS(pred_boxes);
  DETRKD_CHECK_CONTIGUOUS(tgt_labels);
  DETRKD_CHECK_CONTIGUOUS(tgt_boxes);
  DETRKD_CHECK_CONTIGUOUS(num_targets);
}

// Values the CPU kernel would otherwise read out of bounds: checked here, on the host. (The CUDA
// kernel cannot check without a device sync; it writes NaN instead, see match_cost_cuda.cu.)
void check_match_cost_values_cpu(const at::Tensor& tgt_labels, const at::Tensor& num_targets,
                                 int64_t C) {
  const int64_t B = tgt_labels.size(0), T = tgt_labels.size(1);
  const int64_t* n = num_targets.data_ptr<int64_t>();
  const int64_t* labels = tgt_labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(n[b] >= 0 && n[b] <= T, "num_targets must lie in [0, T=", T, "], got ", n[b],
                " for image ", b);
    for (int64_t t = 0; t < n[b]; ++t) {
      TORCH_CHECK(labels[b * T + t] >= 0 && labels[b * T + t] < C, "tgt_labels must lie in [0, C=",
                  C, ") for real targets, got ", labels[b * T + t], " at image ", b, ", target ",
                  t);
    }
  }
}

// The kernel pads each image's target count n to n_pad, a multiple of kLanes (8 floats = one
// AVX2 vector; with AVX-512 the compiler runs 16 at a time plus one 8-wide step), so that the
// loops over targets always run whole vectors. Padded targets are the unit box with label 0;
// their costs are computed and thrown away.
constexpr int64_t kLanes = 8;

// Queries per block: a block's logit rows (kRows x C floats), its (kRows x n_pad) cost scratch
// and the image's target arrays stay in the L1 cache while the block's three passes run.
constexpr int64_t kRows = 32;

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// One image's targets as structure of arrays (cx, cy, w, h, x1, y1, x2, y2, area, label), each
// (T_pad,), so that a loop over targets reads each field contiguously.
template <typename scalar_t>
struct ImageTargets {
  std::vector<scalar_t> data;  // 9 fields x T_pad
  std::vector<int32_t> label;  // (T_pad,)
  scalar_t *cx, *cy, *w, *h, *x1, *y1, *x2, *y2, *area;

  explicit ImageTargets(int64_t T_pad) : data(9 * T_pad), label(T_pad) {
    scalar_t* d = data.data();
    cx = d, cy = d + T_pad, w = d + 2 * T_pad, h = d + 3 * T_pad, x1 = d + 4 * T_pad;
    y1 = d + 5 * T_pad, x2 = d + 6 * T_pad, y2 = d + 7 * T_pad, area = d + 8 * T_pad;
  }

  // Fill from image b's first n targets (labels already checked to lie in [0, C)) and pad up to
  // n_pad. boxes: (T, 4) cxcywh and labels: (T,) of this image.
  void load(const scalar_t* boxes, const int64_t* labels, int64_t n, int64_t n_pad) {
    using namespace detrkd;
    for (int64_t t = 0; t < n_pad; ++t) {
      if (t < n) {
        cx[t] = boxes[4 * t], cy[t] = boxes[4 * t + 1], w[t] = boxes[4 * t + 2];
        h[t] = boxes[4 * t + 3];
        label[t] = static_cast<int32_t>(labels[t]);
      } else {
        cx[t] = cy[t] = scalar_t(0.5), w[t] = h[t] = scalar_t(1);
        label[t] = 0;
      }
      cxcywh_to_xyxy(cx[t], cy[t], w[t], h[t], x1[t], y1[t], x2[t], y2[t]);
      area[t] = box_area(x1[t], y1[t], x2[t], y2[t]);
    }
  }
};

// One block of R <= kRows queries of one image against its n targets, in three passes over a
// (R, n_pad) scratch S, each a plain loop the compiler vectorizes:
//   1. gather:  S[r, t] = logit[r, label_t]                       (softmax: the class cost, -p)
//   2. class:   S[r, t] = w_class * focal(S[r, t]), flat over all R * n_pad entries (focal only:
//               its exp and two logs are most of the work, and a flat loop runs whole vectors
//               whatever n is)
//   3. boxes:   S[r, t] += w_bbox * L1 - w_giou * GIoU, per query row, pred box broadcast
// then the row's first n entries are copied out and its padded targets set to 0.
// logits: (R, C), boxes: (R, 4) cxcywh, out: (R, T).
template <typename scalar_t>
void match_cost_block(const scalar_t* logits, const scalar_t* boxes, int64_t R, int64_t C,
                      int64_t T, const ImageTargets<scalar_t>& tg, int64_t n, int64_t class_mode,
                      scalar_t w_class, scalar_t w_bbox, scalar_t w_giou, scalar_t alpha,
                      scalar_t gamma, scalar_t* S, scalar_t* out) {
  using namespace detrkd;
  const int64_t n_pad = round_up(n, kLanes);
  const int32_t* label = tg.label.data();

  // 1. Gather each query's logits of the targets' classes. A plain scalar loop on purpose: forced
  //    into vector gather instructions (`omp simd`) it ran the whole kernel ~1.5x slower here.
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* x = logits + r * C;  // (C,)
    scalar_t* s = S + r * n_pad;         // (n_pad,)
    for (int64_t t = 0; t < n_pad; ++t) s[t] = x[label[t]];
    if (class_mode == kSoftmax) {
      // -softmax(x)[label_t] = -exp(x[label_t] - logsumexp(x)), the logsumexp once per query.
      scalar_t mx = x[0];
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < C; ++c) mx = x[c] > mx ? x[c] : mx;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += dk_exp(x[c] - mx);
      const scalar_t lse = mx + dk_log(sum);
#pragma omp simd
      for (int64_t t = 0; t < n_pad; ++t) s[t] = w_class * softmax_class_cost(s[t], lse);
    }
  }

  // 2. Focal class cost, flat over the block.
  if (class_mode == kFocal) {
    const int64_t count = R * n_pad;
    if (gamma == scalar_t(2)) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) S[i] = w_class * focal_class_cost<true>(S[i], alpha, gamma);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) S[i] = w_class * focal_class_cost<false>(S[i], alpha, gamma);
    }
  }

  // 3. Box costs, one query row at a time.
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t pcx = boxes[4 * r], pcy = boxes[4 * r + 1];
    const scalar_t pw = boxes[4 * r + 2], ph = boxes[4 * r + 3];
    scalar_t px1, py1, px2, py2;
    cxcywh_to_xyxy(pcx, pcy, pw, ph, px1, py1, px2, py2);
    const scalar_t parea = box_area(px1, py1, px2, py2);
    scalar_t* s = S + r * n_pad;  // (n_pad,): the weighted class cost so far
#pragma omp simd
    for (int64_t t = 0; t < n_pad; ++t) {
      s[t] = pair_match_cost(s[t], pcx, pcy, pw, ph, px1, py1, px2, py2, parea, tg.cx[t],
                             tg.cy[t], tg.w[t], tg.h[t], tg.x1[t], tg.y1[t], tg.x2[t], tg.y2[t],
                             tg.area[t], scalar_t(1), w_bbox, w_giou);
    }
    scalar_t* o = out + r * T;  // (T,)
    std::copy(s, s + n, o);
    std::fill(o + n, o + T, scalar_t(0));  // padded targets
  }
}

template <typename scalar_t>
void match_cost_cpu_kernel(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                           const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                           const at::Tensor& num_targets, int64_t class_mode, scalar_t w_class,
                           scalar_t w_bbox, scalar_t w_giou, scalar_t alpha, scalar_t gamma,
                           at::Tensor& cost) {
  const int64_t B = pred_logits.size(0), Q = pred_logits.size(1), C = pred_logits.size(2);
  const int64_t T = tgt_labels.size(1);
  const scalar_t* logits = pred_logits.data_ptr<scalar_t>();  // (B, Q, C)
  const scalar_t* boxes = pred_boxes.data_ptr<scalar_t>();    // (B, Q, 4) cxcywh
  const int64_t* labels = tgt_labels.data_ptr<int64_t>();     // (B, T)
  const scalar_t* tboxes = tgt_boxes.data_ptr<scalar_t>();    // (B, T, 4) cxcywh
  const int64_t* n_tgt = num_targets.data_ptr<int64_t>();     // (B,)
  scalar_t* out = cost.data_ptr<scalar_t>();                  // (B, Q, T)
  const int64_t T_pad = round_up(T, kLanes);

  // Work units: blocks of kRows queries of one image, unit u = b * blocks + block.
  const int64_t blocks = (Q + kRows - 1) / kRows;
  const int64_t unit_work = kRows * (T + (class_mode == kSoftmax ? C : 0) + 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / unit_work);
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    ImageTargets<scalar_t> tg(T_pad);
    std::vector<scalar_t> S(kRows * T_pad);  // (kRows, n_pad) scratch
    int64_t loaded = -1;                     // the image whose targets tg holds
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / blocks, q0 = (u % blocks) * kRows;
      const int64_t R = std::min(kRows, Q - q0), n = n_tgt[b];
      scalar_t* o = out + (b * Q + q0) * T;  // (R, T)
      if (n == 0) {
        std::fill(o, o + R * T, scalar_t(0));
        continue;
      }
      if (b != loaded) {
        tg.load(tboxes + b * T * 4, labels + b * T, n, round_up(n, kLanes));
        loaded = b;
      }
      match_cost_block(logits + (b * Q + q0) * C, boxes + (b * Q + q0) * 4, R, C, T, tg, n,
                       class_mode, w_class, w_bbox, w_giou, alpha, gamma, S.data(), o);
    }
  });
}

template <typename scalar_t>
void pairwise_giou_cpu_kernel(const at::Tensor& boxes1, const at::Tensor& boxes2, at::Tensor& giou,
                              at::Tensor& iou) {
  using namespace detrkd;
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  const scalar_t* a = boxes1.data_ptr<scalar_t>();  // (B, N, 4) xyxy
  const scalar_t* bb = boxes2.data_ptr<scalar_t>();  // (B, M, 4) xyxy
  scalar_t* g = giou.data_ptr<scalar_t>();           // (B, N, M)
  scalar_t* u = iou.data_ptr<scalar_t>();            // (B, N, M)

  // boxes2 as structure of arrays (x1, y1, x2, y2, area), each (B, M).
  const int64_t BM = B * M;
  std::vector<scalar_t> soa(5 * BM);
  scalar_t *x1 = soa.data(), *y1 = x1 + BM, *x2 = y1 + BM, *y2 = x2 + BM, *area = y2 + BM;
  for (int64_t i = 0; i < BM; ++i) {
    x1[i] = bb[4 * i];
    y1[i] = bb[4 * i + 1];
    x2[i] = bb[4 * i + 2];
    y2[i] = bb[4 * i + 3];
    area[i] = box_area(x1[i], y1[i], x2[i], y2[i]);
  }

  const int64_t grain = std::max<int64_t>(1, 32768 / (M + 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = b * N + n
      const int64_t o = (row / N) * M;
      const scalar_t ax1 = a[4 * row], ay1 = a[4 * row + 1];
      const scalar_t ax2 = a[4 * row + 2], ay2 = a[4 * row + 3];
      const scalar_t aarea = box_area(ax1, ay1, ax2, ay2);
      scalar_t* g_row = g + row * M;
      scalar_t* u_row = u + row * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        scalar_t gv, uv;
        giou_iou(ax1, ay1, ax2, ay2, aarea, x1[o + m], y1[o + m], x2[o + m], y2[o + m],
                 area[o + m], gv, uv);
        g_row[m] = gv;
        u_row[m] = uv;
      }
    }
  });
}

}  // namespace

at::Tensor match_cost(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                      const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                      const at::Tensor& num_targets, int64_t class_mode, double w_class,
                      double w_bbox, double w_giou, double alpha, double gamma) {
  check_match_cost_args(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, class_mode);
  if (pred_logits.is_cuda()) {
#ifdef WITH_CUDA
    return match_cost_cuda(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                           class_mode, w_class, w_bbox, w_giou, alpha, gamma);
#else
    TORCH_CHECK(false, "match_cost: the extension was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(pred_logits.device().is_cpu(), "match_cost: unsupported device ",
              pred_logits.device());
  TORCH_CHECK(pred_logits.scalar_type() == at::kFloat || pred_logits.scalar_type() == at::kDouble,
              "match_cost on CPU supports float32 and float64 inputs, got pred_logits of dtype ",
              pred_logits.scalar_type());
  check_match_cost_values_cpu(tgt_labels, num_targets, pred_logits.size(2));
  // (B, Q, T) in the input dtype: float32, or float64 for float64 inputs.
  at::Tensor cost = at::empty({pred_logits.size(0), pred_logits.size(1), tgt_labels.size(1)},
                              pred_logits.options());
  if (cost.numel() == 0) return cost;
  AT_DISPATCH_FLOATING_TYPES(pred_logits.scalar_type(), "match_cost_cpu", [&] {
    match_cost_cpu_kernel<scalar_t>(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                                    class_mode, static_cast<scalar_t>(w_class),
                                    static_cast<scalar_t>(w_bbox), static_cast<scalar_t>(w_giou),
                                    static_cast<scalar_t>(alpha), static_cast<scalar_t>(gamma),
                                    cost);
  });
  return cost;
}

std::vector<at::Tensor> pairwise_giou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  DETRKD_CHECK_DIM(boxes1, 3);
  DETRKD_CHECK_DIM(boxes2, 3);
  TORCH_CHECK(boxes1.size(2) == 4, "boxes1 must have shape (B, N, 4), got ", boxes1.sizes());
  TORCH_CHECK(boxes2.size(2) == 4, "boxes2 must have shape (B, M, 4), got ", boxes2.sizes());
  TORCH_CHECK(boxes1.size(0) == boxes2.size(0), "boxes1 and boxes2 must have the same batch size, ",
              "got ", boxes1.sizes(), " and ", boxes2.sizes());
  TORCH_CHECK(boxes1.scalar_type() == boxes2.scalar_type(),
              "boxes1 and boxes2 must share a dtype, got ", boxes1.scalar_type(), " and ",
              boxes2.scalar_type());
  TORCH_CHECK(boxes1.scalar_type() == at::kFloat || boxes1.scalar_type() == at::kDouble,
              "pairwise_giou supports float32 and float64 boxes, got ", boxes1.scalar_type());
  TORCH_CHECK(boxes1.device() == boxes2.device(), "boxes1 and boxes2 must be on one device, got ",
              boxes1.device(), " and ", boxes2.device());
  DETRKD_CHECK_CONTIGUOUS(boxes1);
  DETRKD_CHECK_CONTIGUOUS(boxes2);
  if (boxes1.is_cuda()) {
#ifdef WITH_CUDA
    return pairwise_giou_cuda(boxes1, boxes2);
#else
    TORCH_CHECK(false, "pairwise_giou: the extension was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(boxes1.device().is_cpu(), "pairwise_giou: unsupported device ", boxes1.device());
  at::Tensor giou = at::empty({boxes1.size(0), boxes1.size(1), boxes2.size(1)}, boxes1.options());
  at::Tensor iou = at::empty_like(giou);
  if (giou.numel() == 0) return {giou, iou};
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "pairwise_giou_cpu", [&] {
    pairwise_giou_cpu_kernel<scalar_t>(boxes1, boxes2, giou, iou);
  });
  return {giou, iou};
}
