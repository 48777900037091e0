#include "ops.h"
std::vector<at::Tensor> linear_sum_assignment(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_sum_assignment: not implemented yet");
}
