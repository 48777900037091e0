// DETR matching cost and batched pairwise GIoU: argument checks, CPU kernels, dispatch to CUDA.
//
// match_cost builds, for every image b, only its own (Q x T) block of the Hungarian matcher's cost
// (B x Q x T_max with per-image target counts), never the (B*Q x sum T) matrix of the reference
// DETR matcher. The per-pair math lives in box_math.h and is shared with match_cost_cuda.cu.
//
// CPU kernel layout: at::parallel_for runs over blocks of kRows queries of one image. Within a
// block the queries run along the vector lanes, so the branch-free loops that the compiler
// vectorizes (`omp simd`, box_math.h's float exp/log included) run whole vectors whatever the
// number of targets: the class cost once per distinct class of the image's targets, then the L1
// and GIoU terms one target at a time. Each box is converted once, each softmax logsumexp taken
// once (match_cost_block below). The result is written target-major, the blocks' own layout,
// and returned as a (B, Q, T) view of that storage.
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

// Values the CPU kernel would otherwise read out of bounds: checked here, on the host, raising
// ValueError in Python. (The CUDA kernel cannot check without a device sync; it writes NaN
// instead, see match_cost_cuda.cu.)
void check_match_cost_values_cpu(const at::Tensor& tgt_labels, const at::Tensor& num_targets,
                                 int64_t C) {
  const int64_t B = tgt_labels.size(0), T = tgt_labels.size(1);
  const int64_t* n = num_targets.data_ptr<int64_t>();
  const int64_t* labels = tgt_labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(n[b] >= 0 && n[b] <= T, "num_targets must lie in [0, T=", T, "], got ",
                      n[b], " for image ", b);
    for (int64_t t = 0; t < n[b]; ++t) {
      const int64_t label = labels[b * T + t];
      TORCH_CHECK_VALUE(label >= 0 && label < C, "tgt_labels must lie in [0, C=", C,
                        ") for real targets, got ", label, " at image ", b, ", target ", t);
    }
  }
}

// The CPU kernel runs the queries along the vector lanes: a block of R <= kRows queries of one
// image is padded to Rp = R rounded up to kLanes (16 floats = one AVX-512 vector, two AVX2 ones),
// and every inner loop runs over those Rp queries for one target (or one class), the target's
// values broadcast. The loops thus run whole vectors whatever the number of targets; only the
// last block of an image has padded queries (unit boxes with logit 0; their costs are dropped).
constexpr int64_t kLanes = 16;

// Queries per block: the block's scratch (two (T, kRows) arrays) and the image's targets stay in
// the L1 cache while the block's passes run.
constexpr int64_t kRows = 32;

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// One image's n targets as structure of arrays (cx, cy, w, h, x1, y1, x2, y2, area), and its
// distinct classes: classes[u] is the u-th distinct label in order of first appearance and
// slot[t] the u of target t. The class cost depends on the query and the class only, so it is
// computed once per distinct class (COCO images often hold many objects of one class).
template <typename scalar_t>
struct ImageTargets {
  std::vector<scalar_t> data;  // 9 fields x T
  std::vector<int32_t> classes, slot;
  std::vector<int32_t> slot_of_class;  // (C,) scratch for the deduplication, -1 = unseen
  scalar_t *cx, *cy, *w, *h, *x1, *y1, *x2, *y2, *area;
  int64_t n = 0;  // targets
  int64_t U = 0;  // distinct classes

  ImageTargets(int64_t T, int64_t C) : data(9 * T), classes(T), slot(T), slot_of_class(C, -1) {
    scalar_t* d = data.data();
    cx = d, cy = d + T, w = d + 2 * T, h = d + 3 * T, x1 = d + 4 * T;
    y1 = d + 5 * T, x2 = d + 6 * T, y2 = d + 7 * T, area = d + 8 * T;
  }

  // Fill from image b's first n targets (labels already checked to lie in [0, C)).
  // boxes: (T, 4) cxcywh and labels: (T,) of this image.
  void load(const scalar_t* boxes, const int64_t* labels, int64_t n_targets) {
    using namespace detrkd;
    n = n_targets;
    U = 0;
    for (int64_t t = 0; t < n; ++t) {
      cx[t] = boxes[4 * t], cy[t] = boxes[4 * t + 1], w[t] = boxes[4 * t + 2];
      h[t] = boxes[4 * t + 3];
      cxcywh_to_xyxy(cx[t], cy[t], w[t], h[t], x1[t], y1[t], x2[t], y2[t]);
      area[t] = box_area(x1[t], y1[t], x2[t], y2[t]);
      const int64_t label = labels[t];
      if (slot_of_class[label] < 0) {
        slot_of_class[label] = static_cast<int32_t>(U);
        classes[U++] = static_cast<int32_t>(label);
      }
      slot[t] = slot_of_class[label];
    }
    for (int64_t u = 0; u < U; ++u) slot_of_class[classes[u]] = -1;  // reset
  }
};

// Scratch of one thread: the class costs G (U, Rp), the pair costs S (n, Rp), the block's
// prediction boxes as structure of arrays (9 fields x kRows) and, for softmax, each query's
// logsumexp (kRows).
template <typename scalar_t>
struct BlockScratch {
  std::vector<scalar_t> G, S, pred, lse;
  scalar_t *pcx, *pcy, *pw, *ph, *px1, *py1, *px2, *py2, *parea;
  explicit BlockScratch(int64_t T) : G(T * kRows), S(T * kRows), pred(9 * kRows), lse(kRows) {
    scalar_t* d = pred.data();
    pcx = d, pcy = d + kRows, pw = d + 2 * kRows, ph = d + 3 * kRows, px1 = d + 4 * kRows;
    py1 = d + 5 * kRows, px2 = d + 6 * kRows, py2 = d + 7 * kRows, parea = d + 8 * kRows;
  }
};

// One block of R <= kRows queries of one image against its n >= 1 targets:
//   0. the prediction boxes as structure of arrays (corners and area once per box);
//   1. gather:  G[u, r] = logit[r, classes_u]                  (softmax also: lse_r per query)
//   2. class:   G[u, r] = focal(G[u, r])  or  -exp(G[u, r] - lse_r)      (box_math.h)
//   3. boxes:   S[t, r] = w_class * G[slot_t, r] + w_bbox * L1 - w_giou * GIoU   (box_math.h)
//   4. out[t * Q + r] = S[t, r] for t < n, 0 for the padded targets t in [n, T).
// Passes 2 and 3 are plain loops over r that the compiler vectorizes (`omp simd`), box_math.h's
// float exp/log included. logits: (R, C), boxes: (R, 4) cxcywh, out: the block's first entry in
// the image's target-major (T, Q) storage.
template <typename scalar_t>
void match_cost_block(const scalar_t* logits, const scalar_t* boxes, int64_t R, int64_t C,
                      int64_t T, int64_t Q, const ImageTargets<scalar_t>& tg, int64_t class_mode,
                      scalar_t w_class, scalar_t w_bbox, scalar_t w_giou, scalar_t alpha,
                      scalar_t gamma, BlockScratch<scalar_t>& sc, scalar_t* out) {
  using namespace detrkd;
  const int64_t Rp = round_up(R, kLanes), n = tg.n, U = tg.U;
  scalar_t* G = sc.G.data();  // (U, Rp)
  scalar_t* S = sc.S.data();  // (n, Rp)

  // 0. Prediction boxes; padded queries get the unit box.
  for (int64_t r = 0; r < Rp; ++r) {
    const bool real = r < R;
    sc.pcx[r] = real ? boxes[4 * r] : scalar_t(0.5);
    sc.pcy[r] = real ? boxes[4 * r + 1] : scalar_t(0.5);
    sc.pw[r] = real ? boxes[4 * r + 2] : scalar_t(1);
    sc.ph[r] = real ? boxes[4 * r + 3] : scalar_t(1);
    cxcywh_to_xyxy(sc.pcx[r], sc.pcy[r], sc.pw[r], sc.ph[r], sc.px1[r], sc.py1[r], sc.px2[r],
                   sc.py2[r]);
    sc.parea[r] = box_area(sc.px1[r], sc.py1[r], sc.px2[r], sc.py2[r]);
  }

  // 1. Gather each distinct class's logit for every query (strided scalar loads: forced into
  //    vector gather instructions they ran slower here); padded queries read logit 0.
  for (int64_t u = 0; u < U; ++u) {
    const scalar_t* x = logits + tg.classes[u];  // column classes_u of the (R, C) logits
    scalar_t* g = G + u * Rp;                     // (Rp,)
    for (int64_t r = 0; r < R; ++r) g[r] = x[r * C];
    std::fill(g + R, g + Rp, scalar_t(0));
  }

  // 2. Class cost.
  if (class_mode == kSoftmax) {
    // -softmax(x)[c] = -exp(x[c] - logsumexp(x)), the logsumexp once per query.
    scalar_t* lse = sc.lse.data();
    for (int64_t r = 0; r < Rp; ++r) {
      if (r >= R) {
        lse[r] = 0;
        continue;
      }
      const scalar_t* x = logits + r * C;  // (C,)
      scalar_t mx = x[0];
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < C; ++c) mx = x[c] > mx ? x[c] : mx;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += dk_exp(x[c] - mx);
      lse[r] = logsumexp_from(mx, sum);  // NaN if a logit is NaN
    }
    for (int64_t u = 0; u < U; ++u) {
      scalar_t* g = G + u * Rp;
#pragma omp simd
      for (int64_t r = 0; r < Rp; ++r) g[r] = softmax_class_cost(g[r], lse[r]);
    }
  } else {  // focal: its exp and two logs are most of the arithmetic
    const int64_t count = U * Rp;
    if (gamma == scalar_t(2)) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) G[i] = focal_class_cost<true>(G[i], alpha, gamma);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) G[i] = focal_class_cost<false>(G[i], alpha, gamma);
    }
  }

  // 3. Box costs, one target at a time, its box broadcast over the queries.
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* g = G + tg.slot[t] * Rp;  // (Rp,) class cost of target t's class
    scalar_t* s = S + t * Rp;                  // (Rp,)
    const scalar_t tcx = tg.cx[t], tcy = tg.cy[t], tw = tg.w[t], th = tg.h[t];
    const scalar_t tx1 = tg.x1[t], ty1 = tg.y1[t], tx2 = tg.x2[t], ty2 = tg.y2[t];
    const scalar_t tarea = tg.area[t];
#pragma omp simd
    for (int64_t r = 0; r < Rp; ++r) {
      s[r] = pair_match_cost(g[r], sc.pcx[r], sc.pcy[r], sc.pw[r], sc.ph[r], sc.px1[r],
                             sc.py1[r], sc.px2[r], sc.py2[r], sc.parea[r], tcx, tcy, tw, th, tx1,
                             ty1, tx2, ty2, tarea, w_class, w_bbox, w_giou);
    }
  }

  // 4. Into the output, whose storage is target-major (see match_cost_cpu_kernel): row t of
  //    this block is R consecutive entries; the padded targets t in [n, T) are 0.
  for (int64_t t = 0; t < T; ++t) {
    scalar_t* o = out + t * Q;  // (R,) = cost[b, q0 : q0 + R, t]
    if (t < n)
      std::copy(S + t * Rp, S + t * Rp + R, o);
    else
      std::fill(o, o + R, scalar_t(0));
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
  scalar_t* out = cost.data_ptr<scalar_t>();                  // storage (B, T, Q)

  // Work units: blocks of kRows queries of one image, unit u = b * blocks + block.
  const int64_t blocks = (Q + kRows - 1) / kRows;
  const int64_t unit_work = kRows * (T + (class_mode == kSoftmax ? C : 0) + 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / unit_work);
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    ImageTargets<scalar_t> tg(T, C);
    BlockScratch<scalar_t> scratch(T);
    int64_t loaded = -1;  // the image whose targets tg holds
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / blocks, q0 = (u % blocks) * kRows;
      const int64_t R = std::min(kRows, Q - q0), n = n_tgt[b];
      scalar_t* o = out + b * T * Q + q0;  // cost[b, q0, 0] in the (T, Q) storage of image b
      if (n == 0) {
        for (int64_t t = 0; t < T; ++t) std::fill(o + t * Q, o + t * Q + R, scalar_t(0));
        continue;
      }
      if (b != loaded) {
        tg.load(tboxes + b * T * 4, labels + b * T, n);
        loaded = b;
      }
      match_cost_block(logits + (b * Q + q0) * C, boxes + (b * Q + q0) * 4, R, C, T, Q, tg,
                       class_mode, w_class, w_bbox, w_giou, alpha, gamma, scratch, o);
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
  // (B, Q, T) in the input dtype (float32, or float64 for float64 inputs), as a view of
  // target-major (B, T, Q) storage: each image's cost comes out of the kernel one target row at
  // a time, and it is the layout in which linear_sum_assignment solves DETR's T < Q problems
  // (it reads either layout; see assignment.cpp).
  at::Tensor cost = at::empty({pred_logits.size(0), tgt_labels.size(1), pred_logits.size(1)},
                              pred_logits.options()).transpose(1, 2);
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
