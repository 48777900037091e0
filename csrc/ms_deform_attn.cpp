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
using detrkd::msda::bilinear_taps;
using detrkd::msda::outside_point_grads;
using detrkd::msda::tap_weight;
using detrkd::msda::zero_dot_term;
using detrkd::msda::Taps;
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
    int64_t rows = 0;  // <= S throughout
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t h = shp[2 * l], w = shp[2 * l + 1];
      TORCH_CHECK(h >= 0 && w >= 0, "spatial_shapes[", l, "] must be non-negative (H, W), got (",
                  h, ", ", w, ")");
      TORCH_CHECK(start[l] == rows, "level_start_index[", l, "] must be ", rows,
                  " (the exclusive cumulative sum of H*W), got ", start[l]);
      // H * W <= S - rows, tested by division: the product itself can wrap around int64
      // ((2^32, 2^32) would count as 0 cells and pass, then index far outside value)
      TORCH_CHECK(h == 0 || w <= (d.S - rows) / h, "value has S=", d.S,
                  " rows but spatial_shapes need more: level ", l, " (H, W) = (", h, ", ", w,
                  ") does not fit in the ", d.S - rows, " rows after the levels before it");
      rows += h * w;
    }
    TORCH_CHECK(rows == d.S, "value has S=", d.S, " rows but spatial_shapes sum to ", rows);
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// CPU kernels. Both walk (b, q, head) "items" of L * P sample points in a software pipeline:
// while the channel loops of item i run, the corners of item i + 1 are already computed and
// their value rows prefetched, so the scattered row reads overlap with arithmetic instead of
// stalling it. Corners outside the map point at a row of zeros (and, in the backward, write into
// a scratch row) so the channel loops have no branches. DH > 0 fixes the channel count at
// compile time (the common 32 and 64) so those loops unroll completely.
// ---------------------------------------------------------------------------------------------

// Prefetches the n elements at p, for reading (RW = 0) or writing (RW = 1). Locality 2 asks
// for the L2 (prefetcht1), not the L1: an item's 16 points touch up to 128 cache lines, more
// than the L1 can have in flight, and the L2 can track more outstanding misses. On the CPU
// machine of bench/RESULTS.md (section 1) this was clearly faster than locality 3 at the
// encoder shape, forward and backward, clustered and uniform locations alike.
template <int RW, typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(scalar_t)); off += 64) {
    __builtin_prefetch(c + off, RW, 2);
  }
}

// One sample point made ready for the forward channel loop: four corner rows, and their
// bilinear weights already multiplied by the point's attention weight.
template <typename scalar_t>
struct ForwardTap {
  const scalar_t* v[4];
  scalar_t w[4];
};

// Forward, parallel over (b, q):
//   out[b, q, h, :] = sum_{l, p} sum_c (A * w_c) * V[corner c]     (one pass per point)
// An item's corners and weights are computed for all its points at once, in a loop that the
// compiler vectorizes (bilinear_taps has no branches), into structure-of-arrays scratch; then
// a short scalar loop turns them into row pointers and issues the prefetches.
template <typename scalar_t, int DH>
void forward_cpu(const Dims& d, const scalar_t* value, const int64_t* shapes,
                 const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                 scalar_t* out) {
  const int64_t Dh = DH > 0 ? DH : d.Dh;
  const int64_t LP = d.L * d.P;
  const int64_t row_stride = d.H * Dh;  // between consecutive spatial rows of one head
  const std::vector<scalar_t> zeros(Dh, scalar_t(0));
  // Per point j = l * P + p of an item: its level's height, width and first row offset.
  std::vector<int64_t> level_h(LP), level_w(LP), level_offset(LP);
  for (int64_t j = 0; j < LP; ++j) {
    const int64_t l = j / d.P;
    level_h[j] = shapes[2 * l], level_w[j] = shapes[2 * l + 1];
    level_offset[j] = starts[l] * row_stride;
  }
  at::parallel_for(0, d.B * d.Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<ForwardTap<scalar_t>> taps(2 * LP);  // items i and i + 1
    std::vector<int64_t> rows(4 * LP);      // (4, LP): corner c of point j at c * LP + j; -1
                                            // outside the map
    std::vector<scalar_t> weights(4 * LP);  // (4, LP): A * w_c, 0 outside the map
    // Prepares item bqh = (b * Q + q) * H + h: its points are bqh * LP ... + LP - 1.
    const auto gather = [&](int64_t bqh, ForwardTap<scalar_t>* tap) {
      const int64_t b = bqh / (d.Q * d.H), h = bqh % d.H;
      const scalar_t* v_bh = value + (b * d.S * d.H + h) * Dh;  // row r: v_bh + r * row_stride
      const scalar_t* xy = loc + 2 * bqh * LP;                  // (LP, 2)
      const scalar_t* a = attn + bqh * LP;                       // (LP,)
      const int64_t *lh = level_h.data(), *lw = level_w.data();
      const int64_t n = LP;  // a local copy: the stores below could alias the captured LP
      int64_t *R0 = rows.data(), *R1 = R0 + n, *R2 = R1 + n, *R3 = R2 + n;
      scalar_t *A0 = weights.data(), *A1 = A0 + n, *A2 = A1 + n, *A3 = A2 + n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const Taps<scalar_t, int64_t> t = bilinear_taps(xy[2 * j], xy[2 * j + 1], lh[j], lw[j]);
        // corner c of point j at rows[c * LP + j]; row -1 and weight 0 outside the map (NaN
        // for a NaN location or attention weight, which the sample must keep: tap_weight)
        R0[j] = t.in0 ? t.row0 : -1;
        R1[j] = t.in1 ? t.row1 : -1;
        R2[j] = t.in2 ? t.row2 : -1;
        R3[j] = t.in3 ? t.row3 : -1;
        A0[j] = a[j] * tap_weight(t.in0, t.w0);
        A1[j] = a[j] * tap_weight(t.in1, t.w1);
        A2[j] = a[j] * tap_weight(t.in2, t.w2);
        A3[j] = a[j] * tap_weight(t.in3, t.w3);
      }
      const int64_t* R = rows.data();
      const scalar_t* A = weights.data();
      for (int64_t j = 0; j < LP; ++j) {
        ForwardTap<scalar_t>& t = tap[j];
        const scalar_t* v_l = v_bh + level_offset[j];
        for (int c = 0; c < 4; ++c) {
          const bool in = R[c * LP + j] >= 0;
          t.v[c] = in ? v_l + R[c * LP + j] * row_stride : zeros.data();
          t.w[c] = A[c * LP + j];
          if (in) prefetch_row<0>(t.v[c], Dh);
        }
      }
    };
    const int64_t first = begin * d.H, last = end * d.H;
    gather(first, taps.data());
    for (int64_t i = first; i < last; ++i) {
      const ForwardTap<scalar_t>* tap = taps.data() + ((i - first) & 1) * LP;
      if (i + 1 < last) gather(i + 1, taps.data() + ((i + 1 - first) & 1) * LP);
      scalar_t* o = out + i * Dh;  // (Dh,) = out[b, q, h * Dh : (h + 1) * Dh]
      for (int64_t c = 0; c < Dh; ++c) o[c] = scalar_t(0);
      for (int64_t j = 0; j < LP; ++j) {
        const ForwardTap<scalar_t>& t = tap[j];
        const scalar_t *v0 = t.v[0], *v1 = t.v[1], *v2 = t.v[2], *v3 = t.v[3];
        const scalar_t w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) {
          o[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
        }
      }
    }
  });
}

// One sample point made ready for the backward channel loop.
template <typename scalar_t>
struct BackwardTap {
  const scalar_t* v[4];  // corner rows of value (zeros outside the map)
  scalar_t* gv[4];       // the same rows of grad_value (a scratch row outside the map)
  Corners<scalar_t> k;   // bilinear weights and their derivatives
  scalar_t a;            // attention weight
  bool any;              // false: no corner inside the map (outside_point_grads)
};

// Backward, without atomics. For every sample point, with g = grad_out[b, q, h, :]:
//   grad_value[corner c] += A * w_c * g
//   grad_attn            = <g, sum_c w_c V_c>
//   grad_loc (x, y)      = A * (<g, sum_c dw_c/dx V_c>, <g, sum_c dw_c/dy V_c>)
// all in one pass over the channels (the three dot products are SIMD reductions).
// Threads never write the same grad_value element: each task owns one image and a chunk of
// heads, so there are no atomics and the result does not depend on the thread count. Heads stay
// together inside a task (the loop runs q, then head) as in the forward: the rows of one head
// lie H * Dh apart, and walking one head at a time (or a head-major copy of value) measured
// slower here. The chunks are only as small as needed to feed the threads.
template <typename scalar_t, int DH>
void backward_cpu(const Dims& d, const scalar_t* value, const int64_t* shapes,
                  const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                  const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc,
                  scalar_t* grad_attn) {
  const int64_t Dh = DH > 0 ? DH : d.Dh;
  const int64_t LP = d.L * d.P;
  const int64_t row_stride = d.H * Dh;
  const std::vector<scalar_t> zeros(Dh, scalar_t(0));
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::max<int64_t>(1, std::min(d.H, (threads + d.B - 1) / d.B));
  const int64_t chunk = (d.H + n_chunks - 1) / n_chunks;  // heads per task
  at::parallel_for(0, d.B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sink(Dh);  // where corners outside the map "write" their gradient
    std::vector<BackwardTap<scalar_t>> taps(2 * LP);
    const auto gather = [&](int64_t bqh, BackwardTap<scalar_t>* tap) {
      const int64_t b = bqh / (d.Q * d.H), h = bqh % d.H;
      const int64_t head_offset = (b * d.S * d.H + h) * Dh;  // row r: + r * row_stride
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t level_offset = head_offset + starts[l] * row_stride;
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t pt = bqh * LP + l * d.P + p;
          BackwardTap<scalar_t>& t = tap[l * d.P + p];
          t.any = bilinear_corners(loc[2 * pt], loc[2 * pt + 1], shapes[2 * l],
                                   shapes[2 * l + 1], t.k);
          t.a = attn[pt];
          for (int c = 0; c < 4; ++c) {
            const bool in = t.any && t.k.row[c] >= 0;
            const int64_t off = level_offset + t.k.row[c] * row_stride;
            t.v[c] = in ? value + off : zeros.data();
            t.gv[c] = in ? grad_value + off : sink.data();
            if (in) {
              prefetch_row<0>(t.v[c], Dh);
              prefetch_row<1>(t.gv[c], Dh);
            }
          }
        }
      }
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks;
      const int64_t h_begin = (task % n_chunks) * chunk, h_end = std::min(d.H, h_begin + chunk);
      const int64_t nh = h_end - h_begin;
      // items j = 0 .. Q * nh - 1 walk q, then the chunk's heads
      const auto item = [&](int64_t j) { return (b * d.Q + j / nh) * d.H + h_begin + j % nh; };
      if (nh <= 0 || d.Q == 0) continue;
      gather(item(0), taps.data());
      for (int64_t j = 0; j < d.Q * nh; ++j) {
        const int64_t bqh = item(j);
        BackwardTap<scalar_t>* tap = taps.data() + (j & 1) * LP;
        if (j + 1 < d.Q * nh) gather(item(j + 1), taps.data() + ((j + 1) & 1) * LP);
        const scalar_t* g = grad_out + bqh * Dh;  // (Dh,)
        scalar_t g_zero = 0;      // <g, 0>: 0, or NaN if g has a NaN or inf
        bool have_g_zero = false;  // computed on the item's first point outside the map
        for (int64_t i = 0; i < LP; ++i) {
          const BackwardTap<scalar_t>& t = tap[i];
          const int64_t pt = bqh * LP + i;
          if (!t.any) {  // zero gradients, or NaN as grid_sample's (outside_point_grads)
            if (!have_g_zero) {
#pragma omp simd reduction(+ : g_zero)
              for (int64_t c = 0; c < Dh; ++c) g_zero += zero_dot_term(g[c]);
              have_g_zero = true;
            }
            outside_point_grads(t.k, g_zero, t.a, grad_attn[pt], grad_loc[2 * pt],
                                grad_loc[2 * pt + 1]);
            continue;
          }
          const Corners<scalar_t>& k = t.k;
          const scalar_t *v0 = t.v[0], *v1 = t.v[1], *v2 = t.v[2], *v3 = t.v[3];
          scalar_t *gv0 = t.gv[0], *gv1 = t.gv[1], *gv2 = t.gv[2], *gv3 = t.gv[3];
          const scalar_t aw0 = t.a * k.weight[0], aw1 = t.a * k.weight[1];
          const scalar_t aw2 = t.a * k.weight[2], aw3 = t.a * k.weight[3];
          scalar_t ga = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : ga, gx, gy)
          for (int64_t c = 0; c < Dh; ++c) {
            const scalar_t gc = g[c];
            ga += gc * (k.weight[0] * v0[c] + k.weight[1] * v1[c] + k.weight[2] * v2[c] +
                        k.weight[3] * v3[c]);
            gx += gc * (k.dweight_dx[0] * v0[c] + k.dweight_dx[1] * v1[c] +
                        k.dweight_dx[2] * v2[c] + k.dweight_dx[3] * v3[c]);
            gy += gc * (k.dweight_dy[0] * v0[c] + k.dweight_dy[1] * v1[c] +
                        k.dweight_dy[2] * v2[c] + k.dweight_dy[3] * v3[c]);
            gv0[c] += aw0 * gc;
            gv1[c] += aw1 * gc;
            gv2[c] += aw2 * gc;
            gv3[c] += aw3 * gc;
          }
          grad_attn[pt] = ga;
          grad_loc[2 * pt] = t.a * gx;
          grad_loc[2 * pt + 1] = t.a * gy;
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

