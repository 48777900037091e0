#include "ops.h"
at::Tensor match_cost(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, int64_t, double, double, double, double, double) {
  TORCH_CHECK(false, "match_cost: not implemented yet");
}
std::vector<at::Tensor> pairwise_giou(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "pairwise_giou: not implemented yet");
}
