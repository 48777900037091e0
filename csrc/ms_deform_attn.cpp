// Multi-scale deformable attention (Zhu et al., Deformable DETR, arXiv:2010.04159, eq. 2):
// argument checks, the CPU forward and backward, and the dispatch to the CUDA kernels.
//
//   out[b, q, h, :] = sum_l sum_p  A[b, q, h, l, p] * bilinear(V_l[b, :, :, h, :], loc[b, q, h, l, p])
//
// The per-point math (corner rows, bilinear weights and their derivatives) is in
// ms_deform_attn.h, shared with the CUDA kernels. Layout (all contiguous, channels innermost):
//   value (B, S, H, Dh), loc (B, Q, H, L, P, 2), attn (B, Q, H, L, P), out (B, Q, H * Dh).
#include "ms_deform_attn.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

using detrkd::msda::bilinear_corners;
using detrkd::msda::Corners;

struct Dims {
  int64_t B, S, H, Dh, Q, L, P;
};

// Checks the inputs (and grad_output when given) and returns the sizes. Every message names the
// argument; nothing here reads device memory, so CUDA calls do not synchronise.
Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                  const at::Tensor& attn_weight, const at::Tensor* grad_output) {
  DETRKD_CHECK_DIM(value, 4);
  DETRKD_CHECK_DIM(spatial_shapes, 2);
  DETRKD_CHECK_DIM(level_start_index, 1);
  DETRKD_CHECK_DIM(sampling_loc, 6);
  DETRKD_CHECK_DIM(attn_weight, 5);
  TORCH_CHECK(value.is_floating_point(), "value must be a floating-point tensor, got ",
              value.scalar_type());
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type(),
              "sampling_loc must have value's dtype ", value.scalar_type(), ", got ",
              sampling_loc.scalar_type());
  TORCH_CHECK(attn_weight.scalar_type() == value.scalar_type(),
              "attn_weight must have value's dtype ", value.scalar_type(), ", got ",
              attn_weight.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "level_start_index must be int64, got ", level_start_index.scalar_type());

  const Dims d{value.size(0), value.size(1), value.size(2), value.size(3),
               sampling_loc.size(1), spatial_shapes.size(0), sampling_loc.size(4)};
  TORCH_CHECK(spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.size(0) == d.L, "level_start_index must have L=", d.L,
              " entries (one per level of spatial_shapes), got ", level_start_index.size(0));
  TORCH_CHECK(sampling_loc.size(0) == d.B && sampling_loc.size(2) == d.H &&
                  sampling_loc.size(3) == d.L && sampling_loc.size(5) == 2,
              "sampling_loc must be (B=", d.B, ", Q, H=", d.H, ", L=", d.L, ", P, 2), got ",
              sampling_loc.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "attn_weight must be (B, Q, H, L, P) = ", sampling_loc.sizes().slice(0, 5),
              " like sampling_loc, got ", attn_weight.sizes());
  if (grad_output != nullptr) {
    const at::Tensor& g = *grad_output;
    TORCH_CHECK(g.dim() == 3 && g.size(0) == d.B && g.size(1) == d.Q && g.size(2) == d.H * d.Dh,
                "grad_output must be (B=", d.B, ", Q=", d.Q, ", H*Dh=", d.H * d.Dh, "), got ",
                g.sizes());
    TORCH_CHECK(g.scalar_type() == value.scalar_type(), "grad_output must have value's dtype ",
                value.scalar_type(), ", got ", g.scalar_type());
  }

  const at::Device dev = value.device();
  const auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), " but value is on ", dev,
                "; all inputs must be on one device");
  };
  same_device(spatial_shapes, "spatial_shapes");
  same_device(level_start_index, "level_start_index");
  same_device(sampling_loc, "sampling_loc");
  same_device(attn_weight, "attn_weight");
  if (grad_output != nullptr) same_device(*grad_output, "grad_output");

  DETRKD_CHECK_CONTIGUOUS(value);
  DETRKD_CHECK_CONTIGUOUS(spatial_shapes);
  DETRKD_CHECK_CONTIGUOUS(level_start_index);
  DETRKD_CHECK_CONTIGUOUS(sampling_loc);
  DETRKD_CHECK_CONTIGUOUS(attn_weight);
  if (grad_output != nullptr) {
    TORCH_CHECK(grad_output->is_contiguous(),
                "grad_output must be contiguous (call .contiguous() first)");
  }

  if (dev.is_cpu()) {
    // The level table must describe value's S rows exactly, or the kernel would read past it.
    // (On CUDA this would need a device sync; the CUDA kernels instead skip any corner whose
    // row falls outside [0, S).)
    TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
                "value must be float32 or float64 on CPU, got ", value.scalar_type());
    const int64_t* shp = spatial_shapes.data_ptr<int64_t>();
    const int64_t* start = level_start_index.data_ptr<int64_t>();
    int64_t rows = 0;
    for (int64_t l = 0; l < d.L; ++l) {
      TORCH_CHECK(shp[2 * l] >= 0 && shp[2 * l + 1] >= 0, "spatial_shapes[", l,
                  "] must be non-negative (H, W), got (", shp[2 * l], ", ", shp[2 * l + 1], ")");
      TORCH_CHECK(start[l] == rows, "level_start_index[", l, "] must be ", rows,
                  " (the exclusive cumulative sum of H*W), got ", start[l]);
      rows += shp[2 * l] * shp[2 * l + 1];
    }
    TORCH_CHECK(rows == d.S, "value has S=", d.S, " rows but spatial_shapes sum to ", rows);
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// CPU forward: parallel over (b, q). For each head, the output row (Dh channels, contiguous)
// accumulates  sum_{l,p} sum_c (A * w_c) * V[corner c]  in one pass over the channels per point.
// Corners outside the map point at a row of zeros so the blend has no branches. DH > 0 fixes the
// channel count at compile time (the common 32 and 64) so the channel loops unroll completely.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int DH>
void forward_cpu(const Dims& d, const scalar_t* value, const int64_t* shapes,
                 const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                 scalar_t* out) {
  const int64_t Dh = DH > 0 ? DH : d.Dh;
  const int64_t row_stride = d.H * Dh;  // between consecutive spatial rows of one head
  const std::vector<scalar_t> zeros(Dh, scalar_t(0));
  at::parallel_for(0, d.B * d.Q, 16, [&](int64_t begin, int64_t end) {
    Corners<scalar_t> k;
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / d.Q;
      for (int64_t h = 0; h < d.H; ++h) {
        scalar_t* o = out + (bq * d.H + h) * Dh;  // (Dh,)
        for (int64_t c = 0; c < Dh; ++c) o[c] = scalar_t(0);
        // value rows of image b, head h: row r starts at v_bh + r * row_stride
        const scalar_t* v_bh = value + (b * d.S * d.H + h) * Dh;
        const int64_t point0 = (bq * d.H + h) * d.L * d.P;  // index of (b, q, h, 0, 0)
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t Hl = shapes[2 * l], Wl = shapes[2 * l + 1];
          const scalar_t* v_l = v_bh + starts[l] * row_stride;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t pt = point0 + l * d.P + p;
            if (!bilinear_corners(loc[2 * pt], loc[2 * pt + 1], Hl, Wl, k)) continue;
            const scalar_t a = attn[pt];
            const scalar_t w0 = a * k.weight[0], w1 = a * k.weight[1];
            const scalar_t w2 = a * k.weight[2], w3 = a * k.weight[3];
            const scalar_t* v0 = k.row[0] >= 0 ? v_l + k.row[0] * row_stride : zeros.data();
            const scalar_t* v1 = k.row[1] >= 0 ? v_l + k.row[1] * row_stride : zeros.data();
            const scalar_t* v2 = k.row[2] >= 0 ? v_l + k.row[2] * row_stride : zeros.data();
            const scalar_t* v3 = k.row[3] >= 0 ? v_l + k.row[3] * row_stride : zeros.data();
#pragma omp simd
            for (int64_t c = 0; c < Dh; ++c) {
              o[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// CPU backward, without atomics. For every sample point, with g = grad_out[b, q, h, :]:
//   grad_value[corner c] += A * w_c * g
//   grad_attn            = <g, sum_c w_c V_c>
//   grad_loc (x, y)      = A * (<g, sum_c dw_c/dx V_c>, <g, sum_c dw_c/dy V_c>)
// all in one pass over the channels (the three dot products are SIMD reductions).
// Threads never write the same grad_value element: each task owns one image and a chunk of
// heads. Heads stay together inside a task (the loop runs q, then head) because the rows of one
// head lie H * Dh apart: a task that walked a single head would touch one short row per
// H * Dh * sizeof(scalar_t) bytes (1 KB for 8 x 32 floats), a stride that maps every row onto a
// few cache sets and thrashes them. The chunks are only as small as needed to feed the threads.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int DH>
void backward_cpu(const Dims& d, const scalar_t* value, const int64_t* shapes,
                  const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                  const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc,
                  scalar_t* grad_attn) {
  const int64_t Dh = DH > 0 ? DH : d.Dh;
  const int64_t row_stride = d.H * Dh;
  const std::vector<scalar_t> zeros(Dh, scalar_t(0));
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::max<int64_t>(1, std::min(d.H, (threads + d.B - 1) / d.B));
  const int64_t chunk = (d.H + n_chunks - 1) / n_chunks;  // heads per task
  at::parallel_for(0, d.B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sink(Dh);  // where corners outside the map "write" their gradient
    Corners<scalar_t> k;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks;
      const int64_t h_begin = (task % n_chunks) * chunk, h_end = std::min(d.H, h_begin + chunk);
      for (int64_t q = 0; q < d.Q; ++q) {
        for (int64_t h = h_begin; h < h_end; ++h) {
          const int64_t bqh = (b * d.Q + q) * d.H + h;
          const scalar_t* g = grad_out + bqh * Dh;  // (Dh,)
          const scalar_t* v_bh = value + (b * d.S * d.H + h) * Dh;
          scalar_t* gv_bh = grad_value + (b * d.S * d.H + h) * Dh;
          for (int64_t l = 0; l < d.L; ++l) {
            const int64_t Hl = shapes[2 * l], Wl = shapes[2 * l + 1];
            const scalar_t* v_l = v_bh + starts[l] * row_stride;
            scalar_t* gv_l = gv_bh + starts[l] * row_stride;
            for (int64_t p = 0; p < d.P; ++p) {
              const int64_t pt = (bqh * d.L + l) * d.P + p;
              if (!bilinear_corners(loc[2 * pt], loc[2 * pt + 1], Hl, Wl, k)) {
                grad_attn[pt] = grad_loc[2 * pt] = grad_loc[2 * pt + 1] = scalar_t(0);
                continue;
              }
              const scalar_t a = attn[pt];
              const scalar_t* v[4];
              scalar_t* gv[4];
              scalar_t aw[4];
              for (int c = 0; c < 4; ++c) {
                const bool in = k.row[c] >= 0;
                v[c] = in ? v_l + k.row[c] * row_stride : zeros.data();
                gv[c] = in ? gv_l + k.row[c] * row_stride : sink.data();
                aw[c] = a * k.weight[c];
              }
              scalar_t ga = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : ga, gx, gy)
              for (int64_t c = 0; c < Dh; ++c) {
                const scalar_t gc = g[c];
                const scalar_t v0 = v[0][c], v1 = v[1][c], v2 = v[2][c], v3 = v[3][c];
                ga += gc * (k.weight[0] * v0 + k.weight[1] * v1 + k.weight[2] * v2 +
                            k.weight[3] * v3);
                gx += gc * (k.dweight_dx[0] * v0 + k.dweight_dx[1] * v1 +
                            k.dweight_dx[2] * v2 + k.dweight_dx[3] * v3);
                gy += gc * (k.dweight_dy[0] * v0 + k.dweight_dy[1] * v1 +
                            k.dweight_dy[2] * v2 + k.dweight_dy[3] * v3);
                gv[0][c] += aw[0] * gc;
                gv[1][c] += aw[1] * gc;
                gv[2][c] += aw[2] * gc;
                gv[3][c] += aw[3] * gc;
              }
              grad_attn[pt] = ga;
              grad_loc[2 * pt] = a * gx;
              grad_loc[2 * pt + 1] = a * gy;
            }
          }
        }
      }
    }
  });
}

// The channel counts that get a kernel with the channel loops unrolled at compile time (DH);
// any other count runs the same code with Dh read at run time (DH = 0).
#define DETRKD_DISPATCH_CHANNELS(Dh, ...)          \
  switch (Dh) {                                   \
    case 32: { constexpr int DH = 32; __VA_ARGS__; break; } \
    case 64: { constexpr int DH = 64; __VA_ARGS__; break; } \
    default: { constexpr int DH = 0; __VA_ARGS__; break; }  \
  }

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc,
                              attn_weight, nullptr);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(value, spatial_shapes, level_start_index, sampling_loc,
                                       attn_weight);
#else
    TORCH_CHECK(false, "ms_deform_attn: value is on ", value.device(),
                " but common._C was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: value must be on CPU or CUDA, got ",
              value.device());
  at::Tensor out = at::empty({d.B, d.Q, d.H * d.Dh}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    DETRKD_DISPATCH_CHANNELS(
        d.Dh, forward_cpu<scalar_t, DH>(d, value.data_ptr<scalar_t>(),
                                        spatial_shapes.data_ptr<int64_t>(),
                                        level_start_index.data_ptr<int64_t>(),
                                        sampling_loc.data_ptr<scalar_t>(),
                                        attn_weight.data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>()));
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_loc,
                                                const at::Tensor& attn_weight,
                                                const at::Tensor& grad_output) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc,
                              attn_weight, &grad_output);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(value, spatial_shapes, level_start_index, sampling_loc,
                                        attn_weight, grad_output);
#else
    TORCH_CHECK(false, "ms_deform_attn: value is on ", value.device(),
                " but common._C was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: value must be on CPU or CUDA, got ",
              value.device());
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_loc);
  at::Tensor grad_attn = at::empty_like(attn_weight);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    DETRKD_DISPATCH_CHANNELS(
        d.Dh, backward_cpu<scalar_t, DH>(
                  d, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                  level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
                  attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                  grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                  grad_attn.data_ptr<scalar_t>()));
  });
  return {grad_value, grad_loc, grad_attn};
}
