#include "ops.h"
at::Tensor ms_deform_attn_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "ms_deform_attn: not implemented yet");
}
std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "ms_deform_attn: not implemented yet");
}
