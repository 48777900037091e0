// Python bindings of common._C. The public, documented API is common/ops.py.
#include <torch/extension.h>
#include "ops.h"

static bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "detrkd ops: multi-scale deformable attention, matching cost, GIoU, assignment";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward);
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward);
  m.def("match_cost", &match_cost);
  m.def("pairwise_giou", &pairwise_giou);
  m.def("linear_sum_assignment", &linear_sum_assignment);
  m.def("linear_sum_assignment_cpu", &linear_sum_assignment_cpu);
}
