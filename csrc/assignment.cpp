// Exact batched rectangular linear assignment (Hungarian matching): argument checks, the CPU
// solver, and dispatch to the CUDA solver (assignment_cuda.cu).
//
// Problem, per image b: choose K = min(N, M_b) cells of the N x M_b block of cost[b] (M_b =
// num_cols[b] valid columns), at most one per row and column, with the smallest total cost.
//
// Algorithm (assignment.h): scipy's shortest augmenting path solver (Crouse 2016), on the
// orientation with rows <= columns (DETR's Q x T block is transposed to T x Q). For each row in
// turn, a Dijkstra search over the columns finds the cheapest way to extend the matching by one;
// the duals u (rows) and v (columns) keep all reduced costs non-negative. Per search step:
//
//   relax:   spc[j] = min(spc[j], path_cost(min_val, C[i][j], u[i], v[j]))  for unvisited j
//   select:  j* = the unvisited column of smallest spc (scipy's tie rule, assignment.h)
//   then either j* is free (the path ends there: augment) or the search continues from the row
//   assigned to j*.
//
// What makes it fast on one core without changing a single result of scipy's:
//   * relax runs over the columns in natural order, 8 (AVX-512) or 4 (AVX2) doubles at a time;
//     a visited column is marked by spc = NaN, which fails every comparison, so it is neither
//     updated nor selected, with no mask. The value of spc kept for each column is scipy's.
//   * select finds the columns with spc == min, reading only the 64-column chunks whose minimum
//     (kept by relax) is it: almost always one column; when several tie, assignment.h's tie_key
//     picks the one scipy's scan order picks.
//   * scipy's `path` array (the row that last lowered spc[j]) is not stored during relax: it is
//     only needed for the few columns on the augmenting path, and recomputed for them afterwards
//     from the same float64 expressions.
//   * the dual updates touch only the visited rows and columns, kept in short lists.
//   * the working matrix is a padded copy (rows <= columns, row stride a multiple of 8, padding
//     +inf), transposed 8 x 8 at a time with AVX when needed; the finiteness check rides along.
//   * work arrays are thread_local and reused without O(columns) re-initialisation per image;
//     images run in parallel (at::parallel_for).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "assignment.h"
#include "ops.h"

#ifdef WITH_CUDA
std::vector<at::Tensor> linear_sum_assignment_cuda(const at::Tensor& cost,
                                                   const at::Tensor& num_cols);
#endif

namespace detrkd {
namespace lsa {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kPad = 8;  // row stride of the working matrix is a multiple of this

// ------------------------------------------------------------------------------------------
// A few float64 vector operations, in three widths. Only the operations the solver needs, with
// the semantics it relies on: min(a, b) = a < b ? a : b per lane (so a NaN in b is kept: it is
// the "visited" mark), eq(a, b) = bit mask of the lanes where a == b.
// ------------------------------------------------------------------------------------------

struct Scalar {
  static constexpr int W = 1;
  double x;
  static Scalar set1(double a) { return {a}; }
  static Scalar load(const double* p) { return {*p}; }
  static Scalar load(const float* p) { return {static_cast<double>(*p)}; }
  void store(double* p) const { *p = x; }
  friend Scalar operator+(Scalar a, Scalar b) { return {a.x + b.x}; }
  friend Scalar operator-(Scalar a, Scalar b) { return {a.x - b.x}; }
  static Scalar min(Scalar a, Scalar b) { return {a.x < b.x ? a.x : b.x}; }
  double reduce_min() const { return x; }
  static unsigned eq(Scalar a, Scalar b) { return a.x == b.x ? 1u : 0u; }
};

#if defined(__AVX512F__)
struct Simd {
  static constexpr int W = 8;
  __m512d x;
  static Simd set1(double a) { return {_mm512_set1_pd(a)}; }
  static Simd load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Simd load(const float* p) { return {_mm512_cvtps_pd(_mm256_loadu_ps(p))}; }
  void store(double* p) const { _mm512_storeu_pd(p, x); }
  friend Simd operator+(Simd a, Simd b) { return {_mm512_add_pd(a.x, b.x)}; }
  friend Simd operator-(Simd a, Simd b) { return {_mm512_sub_pd(a.x, b.x)}; }
  static Simd min(Simd a, Simd b) { return {_mm512_min_pd(a.x, b.x)}; }  // a < b ? a : b
  double reduce_min() const {  // lanes are never NaN here
    alignas(64) double lane[8];
    _mm512_store_pd(lane, x);
    return *std::min_element(lane, lane + 8);
  }
  static unsigned eq(Simd a, Simd b) { return _mm512_cmp_pd_mask(a.x, b.x, _CMP_EQ_OQ); }
};
#define DETRKD_LSA_SIMD 1
#elif defined(__AVX2__)
struct Simd {
  static constexpr int W = 4;
  __m256d x;
  static Simd set1(double a) { return {_mm256_set1_pd(a)}; }
  static Simd load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Simd load(const float* p) { return {_mm256_cvtps_pd(_mm_loadu_ps(p))}; }
  void store(double* p) const { _mm256_storeu_pd(p, x); }
  friend Simd operator+(Simd a, Simd b) { return {_mm256_add_pd(a.x, b.x)}; }
  friend Simd operator-(Simd a, Simd b) { return {_mm256_sub_pd(a.x, b.x)}; }
  static Simd min(Simd a, Simd b) { return {_mm256_min_pd(a.x, b.x)}; }  // a < b ? a : b
  double reduce_min() const {
    __m128d m = _mm_min_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return std::min(_mm_cvtsd_f64(m), _mm_cvtsd_f64(_mm_unpackhi_pd(m, m)));
  }
  static unsigned eq(Simd a, Simd b) {
    return static_cast<unsigned>(_mm256_movemask_pd(_mm256_cmp_pd(a.x, b.x, _CMP_EQ_OQ)));
  }
};
#define DETRKD_LSA_SIMD 1
#else
using Simd = Scalar;
#define DETRKD_LSA_SIMD 0
#endif

// ------------------------------------------------------------------------------------------
// Work arrays of one image, reused from call to call by each thread.
// ------------------------------------------------------------------------------------------

struct Workspace {
  std::vector<float> c32;  // working matrix, nr x ld (float32 input)
  std::vector<double> c64; // working matrix, nr x ld (float64 input)
  std::vector<double> u, v, spc;               // duals (nr), (ld); shortest path costs (ld)
  std::vector<double> chunk_min;               // lane-wise minima of spc per chunk (relax)
  std::vector<int32_t> row4col, col4row;       // the matching: (ld), (nr); -1 = free
  std::vector<int32_t> remaining, pos;         // scipy's scan order and its inverse (nc)
  // One search: visited rows with the min_val their relax used, and scanned columns with their
  // final spc; step k relaxed from visit_row[k] and then scanned scan_col[k].
  std::vector<int32_t> visit_row, scan_col, touched, path;
  std::vector<double> visit_min, scan_spc;
  std::vector<int32_t> order;  // output order (transposed case)
  // Between images v is 0 and row4col is -1 everywhere (solve_image resets the few entries an
  // image changed), and remaining / pos hold scipy's initial order for order_nc columns (every
  // search restores it), so an image costs no O(columns) initialisation.
  int64_t order_nc = -1;

  template <typename S>
  std::vector<S>& matrix();
};
template <>
std::vector<float>& Workspace::matrix<float>() { return c32; }
template <>
std::vector<double>& Workspace::matrix<double>() { return c64; }

Workspace& thread_workspace() {
  thread_local Workspace ws;
  return ws;
}

// Grow-only resize (never shrinks, so steady-state calls allocate nothing); new entries = fill.
template <typename T>
T* reserve(std::vector<T>& x, int64_t n, T fill = T()) {
  if (static_cast<int64_t>(x.size()) < n) x.resize(n, fill);
  return x.data();
}

int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// ------------------------------------------------------------------------------------------
// Building the working matrix C (nr x ld, nr <= nc, ld = padded(nc), +inf beyond column nc).
// Each returns false when a valid entry is not finite.
//
// Finiteness rides along the copy: x - x is 0 for a finite x and NaN for inf or NaN, so OR-ing
// the bits of x - x over all entries leaves 0 exactly when every entry is finite (a bitwise
// reduction that the compiler vectorises, unlike std::isfinite).
// ------------------------------------------------------------------------------------------

template <typename S>
using Bits = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;

template <typename S>
inline Bits<S> nonfinite_bits(S x) {
  const S d = x - x;
  Bits<S> b;
  std::memcpy(&b, &d, sizeof(S));
  return b;
}

// Same orientation: C[i][j] = cost[i][j], i < n_rows, j < n_cols (row stride ldi of the input).
template <typename S>
bool copy_rows(const S* in, int64_t ldi, int64_t n_rows, int64_t n_cols, S* C, int64_t ld) {
  Bits<S> bad = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    const S* src = in + i * ldi;
    S* dst = C + i * ld;
    for (int64_t j = 0; j < n_cols; ++j) {
      dst[j] = src[j];
      bad |= nonfinite_bits(src[j]);
    }
    std::fill(dst + n_cols, dst + ld, std::numeric_limits<S>::infinity());
  }
  return bad == 0;
}

// Transposed: C[t][q] = cost[q][t] for the first n_t columns (t) of the input's rows q in
// [q_begin, q_end). Scalar version, 8 input rows at a time so that the stores run along C's rows.
template <typename S>
bool transpose_scalar(const S* in, int64_t ldi, int64_t q_begin, int64_t q_end, int64_t n_t,
                      S* C, int64_t ld) {
  Bits<S> bad = 0;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kPad) {
    const int64_t nq = std::min<int64_t>(kPad, q_end - q0);
    for (int64_t t = 0; t < n_t; ++t) {
      S* dst = C + t * ld + q0;
      for (int64_t a = 0; a < nq; ++a) {
        const S x = in[(q0 + a) * ldi + t];
        dst[a] = x;
        bad |= nonfinite_bits(x);
      }
    }
  }
  return bad == 0;
}

#if defined(__AVX2__) || defined(__AVX512F__)
// 8 x 8 float transpose in registers (the usual unpack / shuffle / permute network).
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// float32 transpose, 8 x 8 tiles; the last tile of columns t is read with a lane mask (never
// past the row, masked lanes read 0), the last (< 8) rows q by the scalar code. Finiteness as
// above: OR of the bits of x - x.
bool transpose_avx(const float* in, int64_t ldi, int64_t n_q, int64_t n_t, float* C, int64_t ld) {
  const int64_t q_full = n_q / kPad * kPad;
  __m256 bad = _mm256_setzero_ps();
  for (int64_t q0 = 0; q0 < q_full; q0 += kPad) {
    for (int64_t t0 = 0; t0 < n_t; t0 += kPad) {
      const int64_t w = std::min<int64_t>(kPad, n_t - t0);
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w)), lanes);
      __m256 r[8];
      for (int a = 0; a < 8; ++a) {
        r[a] = _mm256_maskload_ps(in + (q0 + a) * ldi + t0, mask);
        bad = _mm256_or_ps(bad, _mm256_sub_ps(r[a], r[a]));
      }
      transpose8x8(r);
      for (int64_t a = 0; a < w; ++a) _mm256_storeu_ps(C + (t0 + a) * ld + q0, r[a]);
    }
  }
  bool finite = _mm256_testz_si256(_mm256_castps_si256(bad), _mm256_castps_si256(bad));
  // the remaining rows q_full..n_q-1
  return transpose_scalar(in, ldi, q_full, n_q, n_t, C, ld) && finite;
}
#endif

template <typename S>
bool transpose(const S* in, int64_t ldi, int64_t n_q, int64_t n_t, S* C, int64_t ld,
               bool scalar) {
  for (int64_t t = 0; t < n_t; ++t)  // +inf padding
    std::fill(C + t * ld + n_q, C + t * ld + ld, std::numeric_limits<S>::infinity());
#if defined(__AVX2__) || defined(__AVX512F__)
  if constexpr (std::is_same_v<S, float>) {
    if (!scalar) return transpose_avx(in, ldi, n_q, n_t, C, ld);
  }
#endif
  (void)scalar;
  return transpose_scalar(in, ldi, 0, n_q, n_t, C, ld);
}

// ------------------------------------------------------------------------------------------
// The two passes of one Dijkstra step.
// ------------------------------------------------------------------------------------------

// relax from row i: spc[j] = min(spc[j], path_cost(min_val, Ci[j], u_i, v[j])) for every column
// (a visited column keeps its NaN), and return the smallest spc of an unvisited column. The
// lane-wise minima of each chunk of kChunk columns are kept in chunk_min, so that select only
// reads the chunks that hold the minimum.
// kFirst, the search's first step: spc still holds the previous search's values; they are
// replaced (min with +inf, as after scipy's reset to +inf), which also clears the NaN marks.
// There min_val = 0 and u_i = 0 (the row was never visited), so path_cost = c - v exactly (up to
// the sign of a zero result, which no comparison or later non-zero result can see).
constexpr int64_t kChunk = 64;

template <class V, typename S, bool kFirst>
double relax(const S* Ci, const double* v, double* spc, double* chunk_min, int64_t ld,
             double min_val, double u_i) {
  const V mv = V::set1(min_val), u = V::set1(u_i), inf = V::set1(kInf);
  V lowest = inf;
  for (int64_t j0 = 0; j0 < ld; j0 += kChunk) {
    const int64_t j1 = std::min(j0 + kChunk, ld);
    V chunk_lowest = inf;
    for (int64_t j = j0; j < j1; j += V::W) {
      V s;
      if constexpr (kFirst) {
        s = V::min(V::load(Ci + j) - V::load(v + j), inf);
      } else {  // path_cost (assignment.h), lane-wise, same order of operations
        const V r = ((mv + V::load(Ci + j)) - u) - V::load(v + j);
        s = V::min(r, V::load(spc + j));
      }
      s.store(spc + j);
      chunk_lowest = V::min(s, chunk_lowest);
    }
    chunk_lowest.store(chunk_min + j0 / kChunk * V::W);
    lowest = V::min(chunk_lowest, lowest);
  }
  return lowest.reduce_min();
}

// select: among the columns with spc == lowest (unvisited ones: NaN never compares equal; the
// +inf padding never equals a finite lowest), the one scipy would pick (tie_key).
template <class V>
int32_t select(const double* spc, const double* chunk_min, int64_t ld, double lowest,
               const int32_t* row4col, const int32_t* pos) {
  const V target = V::set1(lowest);
  int32_t best = -1;
  int best_key = 0;
  for (int64_t j0 = 0; j0 < ld; j0 += kChunk) {
    if (V::eq(V::load(chunk_min + j0 / kChunk * V::W), target) == 0) continue;
    const int64_t j1 = std::min(j0 + kChunk, ld);
    for (int64_t j = j0; j < j1; j += V::W) {
      for (unsigned m = V::eq(V::load(spc + j), target); m != 0; m &= m - 1) {
        const int32_t col = static_cast<int32_t>(j + __builtin_ctz(m));
        const int key = tie_key(row4col[col] < 0, pos[col]);
        if (best < 0 || key < best_key) {
          best = col;
          best_key = key;
        }
      }
    }
  }
  return best;
}

// ------------------------------------------------------------------------------------------
// The solver for one image. C: nr x ld working matrix (nr <= nc). On return ws.col4row[0..nr)
// and ws.row4col[0..nc) hold the optimal matching. Returns kOk or kInfeasible.
// ------------------------------------------------------------------------------------------

template <class V, typename S>
int solve(const S* C, int64_t nr, int64_t nc, int64_t ld, Workspace& ws) {
  double* u = reserve(ws.u, nr);
  double* v = reserve(ws.v, ld, 0.0);
  double* spc = reserve(ws.spc, ld);
  double* chunk_min = reserve(ws.chunk_min, (ld + kChunk - 1) / kChunk * 8);
  int32_t* row4col = reserve(ws.row4col, ld, -1);
  int32_t* col4row = reserve(ws.col4row, nr);
  int32_t* remaining = reserve(ws.remaining, nc);
  int32_t* pos = reserve(ws.pos, nc);
  int32_t* visit_row = reserve(ws.visit_row, nr);
  int32_t* scan_col = reserve(ws.scan_col, nr);
  int32_t* touched = reserve(ws.touched, 2 * nr);
  double* visit_min = reserve(ws.visit_min, nr);
  double* scan_spc = reserve(ws.scan_spc, nr);
  int32_t* path = reserve(ws.path, 2 * nr);
  std::fill(u, u + nr, 0.0);
  std::fill(col4row, col4row + nr, -1);
  if (ws.order_nc != nc) {  // scipy fills its scan list in reverse column order
    for (int32_t p = 0; p < nc; ++p) {
      remaining[p] = static_cast<int32_t>(nc - 1 - p);
      pos[nc - 1 - p] = p;
    }
    ws.order_nc = nc;
  }

  for (int64_t cur_row = 0; cur_row < nr; ++cur_row) {
    // ---- Dijkstra search from cur_row for the shortest augmenting path ----
    int64_t i = cur_row;
    double min_val = 0.0;
    int64_t steps = 0, n_touched = 0, num_remaining = nc;
    int32_t sink = -1;
    while (sink < 0) {
      const double lowest =
          steps == 0 ? relax<V, S, true>(C + i * ld, v, spc, chunk_min, ld, min_val, u[i])
                     : relax<V, S, false>(C + i * ld, v, spc, chunk_min, ld, min_val, u[i]);
      if (!(lowest < kInf)) {  // no finite path: every column is forbidden
        ws.order_nc = -1;        // (the scan list is left mid-search)
        return kInfeasible;
      }
      const int32_t j = select<V>(spc, chunk_min, ld, lowest, row4col, pos);
      visit_row[steps] = static_cast<int32_t>(i);
      visit_min[steps] = min_val;
      scan_col[steps] = j;
      scan_spc[steps] = spc[j];
      ++steps;
      spc[j] = kNaN;  // visited
      // remove j from scipy's scan list: the last entry takes its slot
      const int32_t p = pos[j], last = remaining[num_remaining - 1];
      remaining[p] = last;
      pos[last] = p;
      --num_remaining;
      touched[n_touched++] = p;
      touched[n_touched++] = static_cast<int32_t>(num_remaining);
      min_val = lowest;
      if (row4col[j] < 0)
        sink = j;
      else
        i = row4col[j];
    }

    // ---- the path's predecessors (scipy's `path`), recomputed with the search's duals ----
    // Column scan_col[s] was relaxed by steps 0..s; its predecessor row is the first of them
    // that reached its final spc (scipy only updates on a strict decrease).
    auto predecessor_step = [&](int64_t s) {
      const int32_t j = scan_col[s];
      double best = kInf;
      int64_t best_k = 0;
      for (int64_t k = 0; k <= s; ++k) {
        const int32_t row = visit_row[k];
        const double r = path_cost(visit_min[k], static_cast<double>(C[row * ld + j]), u[row], v[j]);
        if (r < best) {
          best = r;
          best_k = k;
        }
      }
      return best_k;
    };
    // Walk back from the sink. Step k >= 1 visited the row assigned to column scan_col[k - 1],
    // so the path continues with that column.
    int64_t s = steps - 1;
    int64_t path_len = 0;  // path[2e], path[2e + 1]: (column, row) pairs from the sink back
    while (true) {
      const int64_t k = predecessor_step(s);
      path[2 * path_len] = scan_col[s];
      path[2 * path_len + 1] = visit_row[k];
      ++path_len;
      if (k == 0) break;
      s = k - 1;
    }

    // ---- dual update (scipy's order of operations) ----
    u[cur_row] += min_val;
    for (int64_t k = 1; k < steps; ++k) u[visit_row[k]] += min_val - scan_spc[k - 1];
    for (int64_t k = 0; k < steps; ++k) v[scan_col[k]] -= min_val - scan_spc[k];

    // ---- augment along the path ----
    for (int64_t e = 0; e < path_len; ++e) {
      const int32_t j = path[2 * e], row = path[2 * e + 1];
      row4col[j] = row;
      col4row[row] = j;
    }

    // ---- restore scipy's scan list for the next search ----
    for (int64_t e = 0; e < n_touched; ++e) {
      const int32_t p = touched[e];
      remaining[p] = static_cast<int32_t>(nc - 1 - p);
      pos[nc - 1 - p] = p;
    }
  }
  return kOk;
}

// One image: build the working matrix, solve, write (row_ind, col_ind) like scipy. Returns the
// status. out_rows / out_cols have K slots, already filled with -1.
// cost: the image's N x M block, row-major, or column-major (storage M x N, entry (i, j) at
// j * N + i: match_cost's CPU output). The working matrix has the rows <= columns orientation,
// so it is a copy of rows when the block's storage already runs that way, else a transpose.
template <typename S>
int solve_image(const S* cost, int64_t N, int64_t M, int64_t nc_valid, bool column_major,
                bool scalar, int64_t* out_rows, int64_t* out_cols) {
  if (N == 0 || nc_valid == 0) return kOk;
  Workspace& ws = thread_workspace();
  const bool transposed = nc_valid < N;  // DETR's usual case: more queries than targets
  const int64_t nr = transposed ? nc_valid : N, nc = transposed ? N : nc_valid;
  const int64_t ld = padded(nc);
  S* C = reserve(ws.matrix<S>(), nr * ld);
  bool finite;
  if (!column_major)
    finite = transposed ? transpose(cost, M, N, nc_valid, C, ld, scalar)
                        : copy_rows(cost, M, N, nc_valid, C, ld);
  else  // storage rows are the block's columns
    finite = transposed ? copy_rows(cost, N, nc_valid, N, C, ld)
                        : transpose(cost, N, nc_valid, N, C, ld, scalar);
  if (!finite) return kNonFinite;

  const int status = (DETRKD_LSA_SIMD && !scalar) ? solve<Simd, S>(C, nr, nc, ld, ws)
                                                  : solve<Scalar, S>(C, nr, nc, ld, ws);
  const int32_t* col4row = ws.col4row.data();
  if (status == kOk && transposed) {  // our columns are the input's rows: ascending, as scipy
    int32_t* order = reserve(ws.order, nr);
    std::iota(order, order + nr, 0);
    std::sort(order, order + nr, [&](int32_t a, int32_t b) { return col4row[a] < col4row[b]; });
    for (int64_t k = 0; k < nr; ++k) {
      out_rows[k] = col4row[order[k]];
      out_cols[k] = order[k];
    }
  } else if (status == kOk) {
    for (int64_t i = 0; i < nr; ++i) {
      out_rows[i] = i;
      out_cols[i] = col4row[i];
    }
  }
  for (int64_t i = 0; i < nr; ++i) {  // only assigned columns had v or row4col changed
    if (col4row[i] >= 0) {
      ws.v[col4row[i]] = 0.0;
      ws.row4col[col4row[i]] = -1;
    }
  }
  return status;
}

}  // namespace
}  // namespace lsa
}  // namespace detrkd

namespace {

// The CPU solver reads each image's block row-major, or column-major: cost.transpose(1, 2)
// contiguous, as match_cost returns it on the CPU.
bool column_major(const at::Tensor& cost) {
  return !cost.is_contiguous() && cost.transpose(1, 2).is_contiguous();
}

// Checks shared by both entry points below. The messages name the argument, as ops.py's do.
void check_assignment_args(const at::Tensor& cost) {
  DETRKD_CHECK_DIM(cost, 3);
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "linear_sum_assignment: cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(cost.size(1) < (int64_t{1} << 30) && cost.size(2) < (int64_t{1} << 30),
              "linear_sum_assignment: cost has too many rows or columns: ", cost.sizes());
  TORCH_CHECK(cost.is_contiguous() || (cost.device().is_cpu() && column_major(cost)),
              "linear_sum_assignment: cost must be contiguous (call .contiguous() first), or on "
              "the CPU a transposed view of contiguous (B, M, N) storage, got strides ",
              cost.strides());
}

void check_num_cols(const int64_t* ncols, int64_t B, int64_t M) {
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ncols[b] >= 0 && ncols[b] <= M, "linear_sum_assignment: num_cols[", b, "] = ",
                ncols[b], " is outside [0, M=", M, "]");
}

// Solve every image of cost (B, N, M) on the CPU, in parallel over images. Image b writes its
// min(N, ncols[b]) pairs to rows_of(b) / cols_of(b) and its status to st[b].
template <typename RowsOf, typename ColsOf>
void solve_batch_cpu(const at::Tensor& cost, const int64_t* ncols, RowsOf rows_of, ColsOf cols_of,
                     int32_t* st) {
  using namespace detrkd::lsa;
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  // DETRKD_LSA_SCALAR=1 runs the scalar code paths (the readable reference of the SIMD ones;
  // the tests hold them equal).
  const char* env = std::getenv("DETRKD_LSA_SCALAR");
  const bool scalar = env != nullptr && env[0] != '\0' && env[0] != '0';
  const bool col_major = column_major(cost);
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment", [&] {
    const scalar_t* base = cost.data_ptr<scalar_t>();  // image b at base + b * N * M
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        st[b] = solve_image<scalar_t>(base + b * N * M, N, M, ncols[b], col_major, scalar,
                                      rows_of(b), cols_of(b));
    });
  });
}

}  // namespace

std::vector<at::Tensor> linear_sum_assignment(const at::Tensor& cost, const at::Tensor& num_cols) {
  check_assignment_args(cost);
  DETRKD_CHECK_DIM(num_cols, 1);
  TORCH_CHECK(num_cols.scalar_type() == at::kLong,
              "linear_sum_assignment: num_cols must be int64, got ", num_cols.scalar_type());
  TORCH_CHECK(num_cols.size(0) == cost.size(0), "linear_sum_assignment: num_cols has ",
              num_cols.size(0), " entries, expected one per image (B=", cost.size(0), ")");
  TORCH_CHECK(cost.device() == num_cols.device(),
              "linear_sum_assignment: cost and num_cols must be on one device, got ",
              cost.device(), " and ", num_cols.device());
  DETRKD_CHECK_CONTIGUOUS(num_cols);
#ifdef WITH_CUDA
  if (cost.is_cuda()) return linear_sum_assignment_cuda(cost, num_cols);
#endif
  TORCH_CHECK(cost.device().is_cpu(), "linear_sum_assignment: unsupported device ",
              cost.device(), " (the extension was built without CUDA kernels)");

  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2), K = std::min(N, M);
  const int64_t* ncols = num_cols.data_ptr<int64_t>();
  check_num_cols(ncols, B, M);
  auto opts = cost.options().dtype(at::kLong);
  at::Tensor row_ind = at::full({B, K}, -1, opts);
  at::Tensor col_ind = at::full({B, K}, -1, opts);
  at::Tensor status = at::zeros({B}, cost.options().dtype(at::kInt));
  int64_t* rows = row_ind.data_ptr<int64_t>();
  int64_t* cols = col_ind.data_ptr<int64_t>();
  solve_batch_cpu(
      cost, ncols, [&](int64_t b) { return rows + b * K; }, [&](int64_t b) { return cols + b * K; },
      status.data_ptr<int32_t>());
  return {row_ind, col_ind, status};
}

std::vector<std::tuple<at::Tensor, at::Tensor>> linear_sum_assignment_cpu(
    const at::Tensor& cost, const std::vector<int64_t>& num_cols, bool validate) {
  using namespace detrkd::lsa;
  check_assignment_args(cost);
  TORCH_CHECK(cost.device().is_cpu(), "linear_sum_assignment_cpu: cost must be on the CPU, got ",
              cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(static_cast<int64_t>(num_cols.size()) == B, "linear_sum_assignment: num_cols has ",
              num_cols.size(), " entries, expected one per image (B=", B, ")");
  check_num_cols(num_cols.data(), B, M);
  // The per-image results are allocated here and written by the solver in place: no (B, K)
  // intermediate to split afterwards (at DETR's sizes that split cost as much as a solve).
  std::vector<std::tuple<at::Tensor, at::Tensor>> out;
  out.reserve(B);
  std::vector<int64_t*> rows(B), cols(B);
  auto opts = cost.options().dtype(at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k = std::min(N, num_cols[b]);
    out.emplace_back(at::empty({k}, opts), at::empty({k}, opts));
    rows[b] = std::get<0>(out.back()).data_ptr<int64_t>();
    cols[b] = std::get<1>(out.back()).data_ptr<int64_t>();
  }
  std::vector<int32_t> status(B, kOk);
  solve_batch_cpu(
      cost, num_cols.data(), [&](int64_t b) { return rows[b]; }, [&](int64_t b) { return cols[b]; },
      status.data());
  std::vector<int64_t> bad;
  for (int64_t b = 0; b < B; ++b) {
    if (status[b] == kOk) continue;
    bad.push_back(b);
    std::get<0>(out[b]).fill_(-1);  // as the batched entry point: -1 where nothing was solved
    std::get<1>(out[b]).fill_(-1);
  }
  if (validate && !bad.empty()) {
    TORCH_CHECK_VALUE(false, "cost of image ", bad[0], " ",
                      status[bad[0]] == kNonFinite ? "contains NaN or inf" : "is infeasible",
                      " (images with a problem: ", at::IntArrayRef(bad), ")");
  }
  return out;
}
