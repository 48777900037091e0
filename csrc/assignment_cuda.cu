// Exact batched rectangular linear assignment on the GPU: one thread block per image.
//
// The same algorithm, arithmetic and tie order as the CPU solver (assignment.cpp, which explains
// it; shared pieces in assignment.h), so both return scipy's assignment:
//   * relax: the block's threads split the columns; each keeps its best (spc, tie_key, column)
//     while it updates spc[j] = min(spc[j], path_cost(...)) in float64;
//   * select: one block-wide lexicographic argmin of (spc, tie_key) with warp shuffles;
//   * the short serial part (recording the step, the dual update on the visited rows and
//     columns, the augmentation) is done by thread 0.
// Duals and path costs are float64 (as scipy's): float32 duals would accumulate rounding over
// the augmentations and break exact equality with scipy, and H100-class GPUs run fp64 at half
// the fp32 rate, which this latency-bound kernel does not feel.
//
// Memory: the work arrays of an image (28 bytes per column + 52 per row) and, when it fits, the
// image's cost block (staged once, transposed so that rows <= columns, with coalesced reads) live
// in shared memory; what does not fit lives in a global scratch buffer / is read from the input.
// Results and status are written on the device: no host synchronisation, current stream.
// num_cols is trusted to lie in [0, M] (the Python wrapper checks it on the host; here it is
// clamped, since reading it would need a device-to-host copy).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <vector>

#include "assignment.h"

namespace detrkd {
namespace lsa {
namespace {

constexpr int kMaxThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// The work arrays of one image (see assignment.cpp's Workspace for their meaning).
struct Work {
  double *spc, *v, *u, *visit_min, *scan_spc;
  int *row4col, *remaining, *pos, *col4row, *visit_row, *scan_col, *touched, *path;
};

template <typename T>
__host__ __device__ inline T* take(char* base, size_t& offset, size_t count) {
  offset = (offset + 15) / 16 * 16;
  T* p = base != nullptr ? reinterpret_cast<T*>(base + offset) : nullptr;
  offset += count * sizeof(T);
  return p;
}

// Lays the work arrays for nr rows and nc columns out from base; returns the bytes used (call
// with base = nullptr to size them).
__host__ __device__ inline size_t carve(char* base, int nr, int nc, Work& w) {
  size_t off = 0;
  w.spc = take<double>(base, off, nc);
  w.v = take<double>(base, off, nc);
  w.u = take<double>(base, off, nr);
  w.visit_min = take<double>(base, off, nr);
  w.scan_spc = take<double>(base, off, nr);
  w.row4col = take<int>(base, off, nc);
  w.remaining = take<int>(base, off, nc);
  w.pos = take<int>(base, off, nc);
  w.col4row = take<int>(base, off, nr);
  w.visit_row = take<int>(base, off, nr);
  w.scan_col = take<int>(base, off, nr);
  w.touched = take<int>(base, off, 2 * static_cast<size_t>(nr));
  w.path = take<int>(base, off, 2 * static_cast<size_t>(nr));
  return (off + 15) / 16 * 16;
}

// (spc, tie_key, column) candidates: smaller spc wins, then smaller tie_key (assignment.h).
struct Candidate {
  double value;
  int key;
  int col;
};

__device__ inline void keep_better(Candidate& a, const Candidate& b) {
  if (b.value < a.value || (b.value == a.value && b.key < a.key)) a = b;
}

__device__ inline Candidate warp_argmin(Candidate c) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Candidate other;
    other.value = __shfl_xor_sync(kFullMask, c.value, offset);
    other.key = __shfl_xor_sync(kFullMask, c.key, offset);
    other.col = __shfl_xor_sync(kFullMask, c.col, offset);
    keep_better(c, other);
  }
  return c;
}

// cost (B, N, M), num_cols (B,) -> row_out, col_out (B, K), status (B,). One block per image.
template <typename S>
__global__ void __launch_bounds__(kMaxThreads)
lsa_kernel(const S* __restrict__ cost, int N, int M, const int64_t* __restrict__ num_cols,
           int64_t* __restrict__ row_out, int64_t* __restrict__ col_out,
           int* __restrict__ status_out, int K, char* __restrict__ global_work,
           size_t work_bytes, bool work_in_smem, bool stage_cost) {
  extern __shared__ __align__(16) char smem[];
  __shared__ Candidate warp_best[kMaxThreads / 32];
  __shared__ double s_min_val;
  __shared__ int s_next_row, s_status;

  const int b = blockIdx.x, tid = threadIdx.x, nthreads = blockDim.x;
  const S* in = cost + static_cast<int64_t>(b) * N * M;
  int64_t* rows = row_out + static_cast<int64_t>(b) * K;
  int64_t* cols = col_out + static_cast<int64_t>(b) * K;
  const int64_t k_given = num_cols[b];
  const int k = static_cast<int>(k_given < 0 ? 0 : (k_given > M ? M : k_given));
  const bool transposed = k < N;  // rows <= columns: DETR's Q x T block becomes T x Q
  const int nr = transposed ? k : N, nc = transposed ? N : k;

  Work w;
  char* base = work_in_smem ? smem : global_work + static_cast<size_t>(b) * work_bytes;
  const size_t used = carve(base, min(N, M), max(N, M), w);
  S* Cs = reinterpret_cast<S*>(smem + (work_in_smem ? used : 0));
  auto C = [&](int i, int j) -> double {  // entry (i, j) of the rows <= columns problem
    if (stage_cost) return static_cast<double>(Cs[static_cast<int64_t>(i) * nc + j]);
    return static_cast<double>(transposed ? in[static_cast<int64_t>(j) * M + i]
                                          : in[static_cast<int64_t>(i) * M + j]);
  };
  auto finish = [&](int status) {  // no assignment: every slot -1
    for (int e = tid; e < K; e += nthreads) rows[e] = cols[e] = -1;
    if (tid == 0) status_out[b] = status;
  };
  if (nr == 0 || nc == 0) {
    finish(kOk);
    return;
  }

  // ---- stage the valid block (coalesced reads along the input's rows), check it is finite ----
  bool bad = false;
  const int64_t n_valid = static_cast<int64_t>(N) * k;
  for (int64_t e = tid; e < n_valid; e += nthreads) {
    const int q = static_cast<int>(e / k), t = static_cast<int>(e % k);
    const S x = in[static_cast<int64_t>(q) * M + t];
    bad |= !isfinite(x);
    if (stage_cost) Cs[transposed ? static_cast<int64_t>(t) * nc + q : e] = x;
  }
  for (int j = tid; j < nc; j += nthreads) {
    w.v[j] = 0.0;
    w.row4col[j] = -1;
    w.remaining[j] = nc - 1 - j;  // scipy's scan order: column nc-1 first
    w.pos[nc - 1 - j] = j;
  }
  for (int i = tid; i < nr; i += nthreads) {
    w.u[i] = 0.0;
    w.col4row[i] = -1;
  }
  if (__syncthreads_or(bad)) {
    finish(kNonFinite);
    return;
  }

  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  const double nan = __longlong_as_double(0x7ff8000000000000LL);
  for (int cur_row = 0; cur_row < nr; ++cur_row) {
    // ---- Dijkstra search for the shortest augmenting path from cur_row ----
    int i = cur_row, steps = 0, n_touched = 0, num_remaining = nc;
    double min_val = 0.0;
    while (true) {
      const double u_i = w.u[i];
      Candidate best{inf, INT_MAX, -1};
      for (int j = tid; j < nc; j += nthreads) {
        double s;
        if (steps == 0) {  // min_val = u_i = 0: path_cost = c - v; replaces the old spc (and NaNs)
          const double r = C(i, j) - w.v[j];
          s = r < inf ? r : inf;
        } else {
          const double r = path_cost(min_val, C(i, j), u_i, w.v[j]);
          const double old = w.spc[j];
          s = r < old ? r : old;  // a visited column keeps its NaN
        }
        w.spc[j] = s;
        if (s <= best.value) {  // NaN never passes
          keep_better(best, Candidate{s, tie_key(w.row4col[j] < 0, w.pos[j]), j});
        }
      }
      best = warp_argmin(best);
      if ((tid & 31) == 0) warp_best[tid >> 5] = best;
      __syncthreads();
      if (tid < 32) {
        best = tid < (nthreads >> 5) ? warp_best[tid] : Candidate{inf, INT_MAX, -1};
        best = warp_argmin(best);
        if (tid == 0) {  // record the step (thread 0 keeps the search's bookkeeping)
          if (!(best.value < inf)) {
            s_status = kInfeasible;
          } else {
            const int j = best.col;
            w.visit_row[steps] = i;
            w.visit_min[steps] = min_val;
            w.scan_col[steps] = j;
            w.scan_spc[steps] = w.spc[j];
            w.spc[j] = nan;  // visited
            const int p = w.pos[j], last = w.remaining[num_remaining - 1];
            w.remaining[p] = last;  // scipy's list: the last entry takes j's slot
            w.pos[last] = p;
            --num_remaining;
            w.touched[n_touched++] = p;
            w.touched[n_touched++] = num_remaining;
            s_min_val = best.value;
            s_next_row = w.row4col[j];  // -1: j is free, the path ends there
            s_status = kOk;
          }
        }
      }
      __syncthreads();
      if (s_status != kOk) {
        finish(s_status);
        return;
      }
      min_val = s_min_val;
      ++steps;
      if (s_next_row < 0) break;
      i = s_next_row;
    }

    if (tid == 0) {
      // ---- predecessors along the path, dual update, augmentation (assignment.cpp) ----
      int s = steps - 1, path_len = 0;
      while (true) {
        const int j = w.scan_col[s];
        double best_r = inf;
        int best_k = 0;
        for (int kk = 0; kk <= s; ++kk) {
          const int row = w.visit_row[kk];
          const double r = path_cost(w.visit_min[kk], C(row, j), w.u[row], w.v[j]);
          if (r < best_r) {
            best_r = r;
            best_k = kk;
          }
        }
        w.path[2 * path_len] = j;
        w.path[2 * path_len + 1] = w.visit_row[best_k];
        ++path_len;
        if (best_k == 0) break;
        s = best_k - 1;
      }
      w.u[cur_row] += min_val;
      for (int kk = 1; kk < steps; ++kk) w.u[w.visit_row[kk]] += min_val - w.scan_spc[kk - 1];
      for (int kk = 0; kk < steps; ++kk) w.v[w.scan_col[kk]] -= min_val - w.scan_spc[kk];
      for (int e = 0; e < path_len; ++e) {
        w.row4col[w.path[2 * e]] = w.path[2 * e + 1];
        w.col4row[w.path[2 * e + 1]] = w.path[2 * e];
      }
      for (int e = 0; e < n_touched; ++e) {  // restore scipy's scan list
        const int p = w.touched[e];
        w.remaining[p] = nc - 1 - p;
        w.pos[nc - 1 - p] = p;
      }
    }
    __syncthreads();
  }

  // ---- results, as scipy orders them ----
  if (transposed) {  // our columns are the input's rows: list them in ascending order
    for (int r = tid; r < nr; r += nthreads) {
      const int j = w.col4row[r];
      int rank = 0;
      for (int r2 = 0; r2 < nr; ++r2) rank += w.col4row[r2] < j;
      rows[rank] = j;
      cols[rank] = r;
    }
  } else {
    for (int r = tid; r < nr; r += nthreads) {
      rows[r] = r;
      cols[r] = w.col4row[r];
    }
  }
  for (int e = nr + tid; e < K; e += nthreads) rows[e] = cols[e] = -1;
  if (tid == 0) status_out[b] = kOk;
}

}  // namespace
}  // namespace lsa
}  // namespace detrkd

// Called by linear_sum_assignment (assignment.cpp) after its argument checks.
std::vector<at::Tensor> linear_sum_assignment_cuda(const at::Tensor& cost,
                                                   const at::Tensor& num_cols) {
  using namespace detrkd::lsa;
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2), K = std::min(N, M);
  auto opts = cost.options().dtype(at::kLong);
  at::Tensor row_ind = at::empty({B, K}, opts);
  at::Tensor col_ind = at::empty({B, K}, opts);
  at::Tensor status = at::empty({B}, cost.options().dtype(at::kInt));
  if (B == 0) return {row_ind, col_ind, status};

  const int nr_max = static_cast<int>(std::min(N, M)), nc_max = static_cast<int>(std::max(N, M));
  Work sizing;
  const size_t work_bytes = carve(nullptr, nr_max, nc_max, sizing);
  const size_t cost_bytes = static_cast<size_t>(nr_max) * nc_max * cost.element_size();
  // leave room for the kernel's static shared memory
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        cost.device().index()));
  const size_t smem_limit = static_cast<size_t>(smem_optin) - 1024;
  const bool work_in_smem = work_bytes <= smem_limit;
  const size_t work_smem = work_in_smem ? work_bytes : 0;
  const bool stage_cost = work_smem + cost_bytes <= smem_limit;
  const size_t smem = work_smem + (stage_cost ? cost_bytes : 0);
  at::Tensor scratch;
  if (!work_in_smem) scratch = at::empty({static_cast<int64_t>(B * work_bytes)}, cost.options().dtype(at::kByte));
  // about 4 columns per thread, one warp at least, 256 threads at most
  const int threads = std::min(kMaxThreads, std::max(32, (nc_max / 4 + 31) / 32 * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment_cuda", [&] {
    auto kernel = lsa_kernel<scalar_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(B), threads, smem, stream>>>(
        cost.data_ptr<scalar_t>(), static_cast<int>(N), static_cast<int>(M),
        num_cols.data_ptr<int64_t>(), row_ind.data_ptr<int64_t>(), col_ind.data_ptr<int64_t>(),
        status.data_ptr<int>(), static_cast<int>(K),
        work_in_smem ? nullptr : static_cast<char*>(scratch.data_ptr()), work_bytes,
        work_in_smem, stage_cost);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_ind, col_ind, status};
}
