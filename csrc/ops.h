// Declarations of every function common._C exports. Each op lives in its own .cpp file
// (argument checks, CPU kernel, dispatch to CUDA) and, when CUDA is built, a .cu file.
#pragma once
#include <ATen/ATen.h>
#include <vector>

// Multi-scale deformable attention, official Deformable-DETR contract (csrc/ms_deform_attn.cpp).
//   value (B,S,H,Dh), spatial_shapes (L,2) int64 (H_l,W_l), level_start_index (L,) int64,
//   sampling_loc (B,Q,H,L,P,2) x,y in [0,1] over the padded map, attn_weight (B,Q,H,L,P)
//   -> output (B,Q,H*Dh)
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_loc, const at::Tensor& attn_weight);
// -> {grad_value, grad_sampling_loc, grad_attn_weight}
std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_loc,
                                                const at::Tensor& attn_weight,
                                                const at::Tensor& grad_output);

// DETR matching cost on each image's own block (csrc/match_cost.cpp).
//   pred_logits (B,Q,C), pred_boxes (B,Q,4) cxcywh, tgt_labels (B,T) int64, tgt_boxes (B,T,4)
//   cxcywh, num_targets (B,) int64; class_mode 0 = focal (alpha, gamma), 1 = softmax
//   -> cost (B,Q,T) float32, zero where t >= num_targets[b]
at::Tensor match_cost(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                      const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                      const at::Tensor& num_targets, int64_t class_mode, double w_class,
                      double w_bbox, double w_giou, double alpha, double gamma);

// Batched pairwise GIoU and IoU of xyxy boxes: a (B,N,4), b (B,M,4) -> {giou, iou} (B,N,M).
std::vector<at::Tensor> pairwise_giou(const at::Tensor& boxes1, const at::Tensor& boxes2);

// Exact batched rectangular assignment (csrc/assignment.cpp).
//   cost (B,N,M) float32/float64, num_cols (B,) int64 (valid columns per image)
//   -> {row_ind (B,K), col_ind (B,K), status (B,) int32}, K = min(N, M); rows of image b
//   beyond min(N, num_cols[b]) are -1; status 0 = ok, 1 = non-finite cost, 2 = infeasible.
std::vector<at::Tensor> linear_sum_assignment(const at::Tensor& cost, const at::Tensor& num_cols);
// CPU only: the per-image (row_ind, col_ind) pairs directly; validate raises ValueError for a
// non-finite or infeasible image (common/ops.py's message).
std::vector<std::tuple<at::Tensor, at::Tensor>> linear_sum_assignment_cpu(
    const at::Tensor& cost, const std::vector<int64_t>& num_cols, bool validate);
