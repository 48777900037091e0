// DETR matching cost and batched pairwise GIoU: argument checks, CPU kernels, dispatch to CUDA.
//
// match_cost builds, for every image b, only its own (Q x T) block of the Hungarian matcher's cost
// (B x Q x T_max with per-image target counts), never the (B*Q x sum T) matrix of the reference
// DETR matcher. The per-pair math lives in box_math.h and is shared with match_cost_cuda.cu.
//
// CPU kernel layout: the targets of the batch are first copied into structure-of-arrays form
// (cx, cy, w, h, x1, y1, x2, y2, area, label; each (B, T) padded to whole vectors), then
// at::parallel_for runs over the B*Q query rows; per row the prediction's box is converted once,
// the softmax logsumexp (if any) is taken once, and the loop over the row's targets is a plain,
// branch-free loop over contiguous arrays that the compiler vectorizes (`omp simd`), box_math.h's
// float exp/log included.
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

// The targets of the batch as structure of arrays, each (B, T_pad): contiguous per image, and
// padded from T to T_pad (a multiple of kLanes) with a harmless box and label 0, so that the row
// loop below always runs whole vectors.
template <typename scalar_t>
struct TargetArrays {
  int64_t stride;  // T_pad
  std::vector<scalar_t> data;
  std::vector<int32_t> label;
  const scalar_t *cx, *cy, *w, *h, *x1, *y1, *x2, *y2, *area;
};

// 8 floats = one AVX2 vector. (With AVX-512 the compiler runs 16 at a time plus one 8-wide step.)
constexpr int64_t kLanes = 8;

// How many query rows ahead the focal path prefetches its logits.
constexpr int64_t kPrefetchRows = 4;

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

template <typename scalar_t>
TargetArrays<scalar_t> make_target_arrays(const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                                          const at::Tensor& num_targets) {
  using namespace detrkd;
  const int64_t B = tgt_labels.size(0), T = tgt_labels.size(1);
  const int64_t* labels = tgt_labels.data_ptr<int64_t>();   // (B, T)
  const scalar_t* boxes = tgt_boxes.data_ptr<scalar_t>();   // (B, T, 4) cxcywh
  const int64_t* n_tgt = num_targets.data_ptr<int64_t>();   // (B,)
  TargetArrays<scalar_t> tg;
  tg.stride = round_up(T, kLanes);
  const int64_t size = B * tg.stride;
  tg.data.assign(9 * size, scalar_t(0));
  tg.label.assign(size, 0);
  scalar_t* d = tg.data.data();
  scalar_t *cx = d, *cy = d + size, *w = d + 2 * size, *h = d + 3 * size, *x1 = d + 4 * size;
  scalar_t *y1 = d + 5 * size, *x2 = d + 6 * size, *y2 = d + 7 * size, *area = d + 8 * size;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < tg.stride; ++t) {
      const int64_t i = b * tg.stride + t;
      if (t < n_tgt[b]) {  // a real target; its label was checked to lie in [0, C)
        const scalar_t* box = boxes + 4 * (b * T + t);
        cx[i] = box[0], cy[i] = box[1], w[i] = box[2], h[i] = box[3];
        tg.label[i] = static_cast<int32_t>(labels[b * T + t]);
      } else {  // padding: the unit box at (0.5, 0.5), label 0; its costs are thrown away
        cx[i] = cy[i] = scalar_t(0.5), w[i] = h[i] = scalar_t(1);
        tg.label[i] = 0;
      }
      cxcywh_to_xyxy(cx[i], cy[i], w[i], h[i], x1[i], y1[i], x2[i], y2[i]);
      area[i] = box_area(x1[i], y1[i], x2[i], y2[i]);
    }
  }
  tg.cx = cx, tg.cy = cy, tg.w = w, tg.h = h, tg.x1 = x1, tg.y1 = y1, tg.x2 = x2, tg.y2 = y2;
  tg.area = area;
  return tg;
}

// One query against the first n_pad targets of its image (n_pad a multiple of kLanes):
// out[t] = w_class * class_cost(logit[label_t]) + w_bbox * L1 - w_giou * GIoU.
// class_cost is a small lambda (focal or softmax); the loop body has no branch, so it vectorizes.
template <typename scalar_t, typename ClassCost>
inline void match_cost_row(const ClassCost& class_cost, const scalar_t* logit, const scalar_t* pbox,
                           const TargetArrays<scalar_t>& tg, int64_t o, int64_t n_pad,
                           scalar_t w_class, scalar_t w_bbox, scalar_t w_giou, scalar_t* out) {
  using namespace detrkd;
  const scalar_t pcx = pbox[0], pcy = pbox[1], pw = pbox[2], ph = pbox[3];
  scalar_t px1, py1, px2, py2;
  cxcywh_to_xyxy(pcx, pcy, pw, ph, px1, py1, px2, py2);
  const scalar_t parea = box_area(px1, py1, px2, py2);
  const int32_t* label = tg.label.data() + o;
  const scalar_t *cx = tg.cx + o, *cy = tg.cy + o, *w = tg.w + o, *h = tg.h + o;
  const scalar_t *x1 = tg.x1 + o, *y1 = tg.y1 + o, *x2 = tg.x2 + o, *y2 = tg.y2 + o;
  const scalar_t* area = tg.area + o;
#pragma omp simd
  for (int64_t t = 0; t < n_pad; ++t) {
    const scalar_t cls = class_cost(logit[label[t]]);
    out[t] = pair_match_cost(cls, pcx, pcy, pw, ph, px1, py1, px2, py2, parea, cx[t], cy[t], w[t],
                             h[t], x1[t], y1[t], x2[t], y2[t], area[t], w_class, w_bbox, w_giou);
  }
}

template <typename scalar_t>
void match_cost_cpu_kernel(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                           const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                           const at::Tensor& num_targets, int64_t class_mode, scalar_t w_class,
                           scalar_t w_bbox, scalar_t w_giou, scalar_t alpha, scalar_t gamma,
                           at::Tensor& cost) {
  using namespace detrkd;
  const int64_t B = pred_logits.size(0), Q = pred_logits.size(1), C = pred_logits.size(2);
  const int64_t T = tgt_labels.size(1);
  const scalar_t* logits = pred_logits.data_ptr<scalar_t>();  // (B, Q, C)
  const scalar_t* boxes = pred_boxes.data_ptr<scalar_t>();    // (B, Q, 4) cxcywh
  const int64_t* n_tgt = num_targets.data_ptr<int64_t>();     // (B,)
  scalar_t* out = cost.data_ptr<scalar_t>();                  // (B, Q, T)
  const TargetArrays<scalar_t> tg = make_target_arrays<scalar_t>(tgt_labels, tgt_boxes,
                                                                 num_targets);
  const bool square_gamma = gamma == scalar_t(2);

  // Softmax: each row's logsumexp runs over a copy of the row padded to whole vectors (pads
  // repeat logit 0, so the max is unchanged, and are masked out of the sum).
  const int64_t C_pad = round_up(std::max<int64_t>(C, 1), kLanes);
  std::vector<scalar_t> class_mask(C_pad, scalar_t(0));
  std::fill(class_mask.begin(), class_mask.begin() + C, scalar_t(1));
  const scalar_t* mask = class_mask.data();

  // Rows of roughly equal work: T pairs plus, for softmax, C exps.
  const int64_t row_work = T + (class_mode == kSoftmax ? C : 0) + 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / row_work);
  at::parallel_for(0, B * Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(tg.stride);  // one padded row of costs, (T_pad,)
    std::vector<scalar_t> padded_logit(class_mode == kSoftmax ? C_pad : 0);  // (C_pad,)
    int64_t b = begin / Q, q = begin % Q;
    for (int64_t row = begin; row < end; ++row, ++q) {  // row = b * Q + q
      if (q == Q) q = 0, ++b;
      const int64_t n = n_tgt[b];
      const int64_t n_pad = round_up(n, kLanes);
      const scalar_t* logit = logits + row * C;  // (C,)
      const scalar_t* pbox = boxes + 4 * row;    // (4,)
      const int64_t o = b * tg.stride;           // this image's targets in tg
      scalar_t* out_row = out + row * T;         // (T,)
      if (n == 0) {
        std::fill(out_row, out_row + T, scalar_t(0));
        continue;
      }
      if (class_mode == kFocal) {
        // The focal cost reads only a few scattered logits of each row, which the hardware
        // prefetcher does not foresee; asking for the row a few rows ahead hides the memory
        // latency (at 16 x 900 x 91 the logits do not fit in L2).
        if (row + kPrefetchRows < end) {
          const char* ahead = reinterpret_cast<const char*>(logits + (row + kPrefetchRows) * C);
          for (int64_t byte = 0; byte < C * int64_t(sizeof(scalar_t)); byte += 64) {
            __builtin_prefetch(ahead + byte);
          }
        }
        if (square_gamma) {
          auto focal = [=](scalar_t x) { return focal_class_cost<true>(x, alpha, gamma); };
          match_cost_row(focal, logit, pbox, tg, o, n_pad, w_class, w_bbox, w_giou,
                         scratch.data());
        } else {
          auto focal = [=](scalar_t x) { return focal_class_cost<false>(x, alpha, gamma); };
          match_cost_row(focal, logit, pbox, tg, o, n_pad, w_class, w_bbox, w_giou,
                         scratch.data());
        }
      } else {
        // logsumexp over the C classes, once per query: max, then sum of exp(x - max).
        scalar_t* x = padded_logit.data();
        std::copy(logit, logit + C, x);
        std::fill(x + C, x + C_pad, logit[0]);
        scalar_t mx = x[0];
#pragma omp simd reduction(max : mx)
        for (int64_t c = 0; c < C_pad; ++c) mx = x[c] > mx ? x[c] : mx;
        scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C_pad; ++c) sum += mask[c] * dk_exp(x[c] - mx);
        const scalar_t lse = mx + dk_log(sum);
        auto softmax = [=](scalar_t x) { return softmax_class_cost(x, lse); };
        match_cost_row(softmax, logit, pbox, tg, o, n_pad, w_class, w_bbox, w_giou,
                       scratch.data());
      }
      std::copy(scratch.data(), scratch.data() + n, out_row);
      std::fill(out_row + n, out_row + T, scalar_t(0));  // padded targets
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
