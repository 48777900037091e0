// CUDA kernels of multi-scale deformable attention (Zhu et al., Deformable DETR,
// arXiv:2010.04159, eq. 2). Arguments are checked in ms_deform_attn.cpp before these run; the
// per-point math (corner rows, bilinear weights and their derivatives) is ms_deform_attn.h, the
// same code the CPU kernels run.
//
// Work mapping. A group of G lanes (G a power of two <= 32, inside one warp) handles one
// (b, q, head). Each lane owns VEC consecutive channels per chunk and NV chunks: lane i holds
// channels (j * G + i) * VEC + e, j < NV, e < VEC, so the group reads a value row in wide,
// coalesced pieces.
//   * Vector path (Dh a multiple of VEC = 16 bytes / element size, 16-byte aligned tensors,
//     every tensor < 2^30 elements): one 16-byte load per lane and chunk (float4 for fp32, 8
//     halves for fp16/bf16, double2), G = min(Dh / VEC rounded up to a power of two, 8). For
//     the usual Dh = 32 that is 8 lanes (fp32) or 4 lanes (fp16/bf16) per (b, q, head), so a
//     warp serves 4 or 8 of them: the per-point set-up (location, corners, weights), which every
//     lane of a group repeats, is repeated 8 or 4 times instead of 32 times as in a
//     thread-per-channel kernel, and each load instruction moves 16 bytes per lane. The half
//     types' backward takes 4 halves (8 bytes) per chunk instead, i.e. 8 lanes for Dh = 32 as
//     in fp32, so that each lane's float sums for grad_value are one 16-byte vector reduction
//     (see vec_for).
//   * Scalar path (any other Dh or alignment): VEC = 1, G = the next power of two >= Dh, at
//     most 32 (the previous mapping).
// Integer arithmetic is 32-bit (index_t = int32_t) when every tensor has fewer than 2^30
// elements, and 64-bit otherwise (64-bit multiplies and divides cost several 32-bit ones).
//   forward:  every lane accumulates its channels over all L * P points in registers and writes
//             them once; no atomics. For each point it issues its four corner loads before
//             using any of them, so they are in flight together.
//   backward: every lane keeps its grad_out channels in registers for all points; per point it
//             adds A * w_c * grad_out into the four corners of grad_value with atomics (many
//             queries sample the same cells, so atomics are unavoidable without sorting; on
//             sm_90 one 16- or 8-byte vector reduction per chunk instead of 4 or 2 scalar
//             ones), and forms its partial sums of grad_attn and grad_loc; the group adds those
//             up with warp shuffles and lane 0 writes them. The official kernel instead syncs
//             the block and lets one thread sum the channels serially, per point.
//             With many queries (the encoder), backward_smem_kernel first sums the small
//             (coarse) levels in shared memory per block of queries of one (b, head), and adds
//             each touched cell to grad_value once per block: the atomics to global memory are
//             the bottleneck, and every query samples the coarse levels' few cells.
// Level table: spatial_shapes and level_start_index live on the device and are not checked on
// the host (that would synchronise). Each level is checked when read: a level whose rows
// [start, start + H * W) do not lie inside value's S rows is skipped (it samples zero and gets
// zero gradients), so a bad table can never make a kernel read or write outside the tensors.
// NaN: a NaN or infinite sampling location (or attention weight) gives a NaN output, and the
// gradients that grid_sample gives on the CPU, as the CPU kernels do (ms_deform_attn.h): corners
// outside the map are skipped but still add w * 0 to the sample, and a point with no corner
// inside takes outside_point_grads.
// Types: float, double, half and bfloat16; arithmetic in at::opmath_type (float for the half
// types). For the half types grad_value is accumulated in a float buffer and cast at the end.
// Loops are grid-stride with a capped grid (backward_smem_kernel: one block per tile); every
// pointer is computed inside its iteration.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

using detrkd::msda::bilinear_corners;
using detrkd::msda::Corners;
using detrkd::msda::outside_point_grads;
using detrkd::msda::point_grads;
using detrkd::msda::tap_weight;
using detrkd::msda::zero_dot_term;

constexpr int kBlock = 256;          // threads per block, a multiple of 32
constexpr int64_t kSmall = 1 << 30;  // below this many elements everywhere, index with int32

template <typename index_t>
struct Sizes {
  index_t B, S, Q, H, L, P, Dh;
};

// VEC elements of one tensor, aligned so that a load or store of the whole is one instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// One level of the table, in index_t.
template <typename index_t>
struct Level {
  index_t height, width, start;
};

// Reads level l of the device-side table. False when its rows [start, start + H * W) are not
// inside [0, S): the level is then skipped. A valid level has H * W <= S, so corner rows
// h * W + w fit index_t.
template <typename index_t>
__device__ __forceinline__ bool load_level(const int64_t* __restrict__ shapes,
                                           const int64_t* __restrict__ starts, index_t l,
                                           index_t S, Level<index_t>& lv) {
  const int64_t h = shapes[2 * l], w = shapes[2 * l + 1], start = starts[l], s = S;
  if (!(h >= 0 && w >= 0 && start >= 0 && h <= s && w <= s && start <= s)) return false;
  // h * w cannot overflow int64 when s < 2^31; beyond that, compare by division
  const bool fits = s < (int64_t(1) << 31) ? h * w <= s - start : (w == 0 || h <= (s - start) / w);
  if (!fits) return false;
  lv.height = static_cast<index_t>(h);
  lv.width = static_cast<index_t>(w);
  lv.start = static_cast<index_t>(start);
  return true;
}

// Forward. Each pass over the points covers G * VEC * NV channels (one pass unless Dh is larger).
template <typename scalar_t, typename index_t, int G, int VEC, int NV>
__global__ void __launch_bounds__(kBlock)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                   const scalar_t* __restrict__ attn, scalar_t* __restrict__ out,
                   Sizes<index_t> n) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  constexpr int kGroups = kBlock / G;   // groups per block
  constexpr int kSpan = G * VEC * NV;   // channels per pass
  const int lane = threadIdx.x % G;
  const index_t n_groups = n.B * n.Q * n.H;
  const index_t row_stride = n.H * n.Dh;  // elements from one value row (token) to the next
  for (index_t grp = static_cast<index_t>(blockIdx.x) * kGroups +
                           static_cast<index_t>(threadIdx.x / G);
       grp < n_groups; grp += static_cast<index_t>(gridDim.x) * kGroups) {
    // grp = (b * Q + q) * H + h indexes the output row out[b, q, h*Dh : (h+1)*Dh]
    const index_t h = grp % n.H, b = grp / (n.Q * n.H);
    const scalar_t* v_bh = value + (b * n.S * n.H + h) * n.Dh;  // row r at v_bh + r * row_stride
    for (index_t c0 = 0; c0 < n.Dh; c0 += kSpan) {
      index_t ch[NV];  // first channel of this lane's chunk j
      bool has[NV];    // chunk j lies inside Dh (VEC divides Dh on the vector path)
      index_t ch_read[NV];  // ch[j] where has[j], else channel 0: a chunk that exists
      acc_t acc[NV][VEC];
      acc_t outside = 0;  // what the skipped corners add: 0, or NaN (see tap_weight)
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        ch[j] = c0 + (j * G + lane) * VEC;
        has[j] = ch[j] < n.Dh;
        ch_read[j] = has[j] ? ch[j] : index_t(0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = acc_t(0);
      }
      for (index_t l = 0; l < n.L; ++l) {
        Level<index_t> lv;
        if (!load_level(shapes, starts, l, n.S, lv)) continue;
        const scalar_t* v_l = v_bh + lv.start * row_stride;  // the level's first row
        const index_t pt0 = (grp * n.L + l) * n.P;             // index of (b, q, h, l, 0)
        // Branch-free body: the four corner loads of a point are issued back to back and are in
        // flight together. A corner outside the map (or a chunk past Dh) still loads, from row
        // 0 of this (b, head), and its value is then not used. (A zero weight would not do:
        // 0 * inf is NaN, and grid_sample ignores such corners entirely.) Not unrolled: a
        // second point's loads would cost registers (64+ on sm_90, with spills), and occupancy
        // hides the latency as well.
#pragma unroll 1
        for (index_t p = 0; p < n.P; ++p) {
          const index_t pt = pt0 + p;
          Corners<acc_t, index_t> k;
          const bool any = bilinear_corners(static_cast<acc_t>(loc[2 * pt]),
                                            static_cast<acc_t>(loc[2 * pt + 1]), lv.height,
                                            lv.width, k);
          const acc_t a = static_cast<acc_t>(attn[pt]);
          bool valid[4];  // corner c inside the map (outside it reads zero)
          pack_t v[4][NV];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            valid[c] = any && k.row[c] >= 0;
            const scalar_t* src = valid[c] ? v_l + k.row[c] * row_stride : v_bh;
#pragma unroll
            for (int j = 0; j < NV; ++j) v[c][j] = load_pack<VEC>(src + ch_read[j]);
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const acc_t w = a * tap_weight(valid[c], k.weight[c]);
            if (!valid[c]) {  // reads zero: w * 0, which is NaN for a NaN location or weight
              outside += w * acc_t(0);
              continue;
            }
#pragma unroll
            for (int j = 0; j < NV; ++j) {
              if (!has[j]) continue;
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[j][e] += w * static_cast<acc_t>(v[c][j].v[e]);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        if (!has[j]) continue;
        pack_t o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(acc[j][e] + outside);
        *reinterpret_cast<pack_t*>(out + grp * n.Dh + ch[j]) = o;
      }
    }
  }
}

// Sum of v over the G lanes of this lane's group (all 32 lanes of the warp must call it).
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  }
  return v;
}

// *p[i] += d[i] for i < N, atomically per element. On sm_90 a float chunk goes out as 128-bit
// (or 64-bit) vector reductions, `red.global.add.v4.f32` (PTX ISA 8.1): one instruction and one
// memory request per 4 floats, where older GPUs need 4 scalar atomics. `red` (unlike `atom`)
// returns nothing, so the thread never waits for it. p must be 16-byte (v4) or 8-byte (v2)
// aligned; the callers' chunks are.
template <int N, typename T>
__device__ __forceinline__ void atomic_add_chunk(T* p, const T (&d)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = std::is_same_v<T, float> && N % 2 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(
                       __cvta_generic_to_global(p + i)),
                   "f"(d[i]), "f"(d[i + 1]), "f"(d[i + 2]), "f"(d[i + 3]));
    }
  } else if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" ::"l"(
                       __cvta_generic_to_global(p + i)),
                   "f"(d[i]), "f"(d[i + 1]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(p + i, d[i]);
  }
}

// s[e] += d[e] for e < N in shared memory, atomically per element. NVIDIA GPUs have no native
// float add on shared memory: atomicAdd there compiles to a compare-and-swap loop per element,
// each waiting for the previous one. Here the N first attempts (read, add, compare-and-swap) are
// issued together, so their latencies overlap, and only an element that another thread changed
// in between (another query of the block on the same cell, at the same moment) goes round
// again. The comparison is on bit patterns, so a NaN sum cannot make it loop forever.
template <int N>
__device__ __forceinline__ void shared_add_chunk(float* s, const float (&d)[N]) {
  unsigned int* u = reinterpret_cast<unsigned int*>(s);
  unsigned int seen[N], found[N];
#pragma unroll
  for (int e = 0; e < N; ++e) seen[e] = *reinterpret_cast<volatile unsigned int*>(u + e);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    found[e] = atomicCAS(u + e, seen[e], __float_as_uint(__uint_as_float(seen[e]) + d[e]));
  }
#pragma unroll
  for (int e = 0; e < N; ++e) {
    while (found[e] != seen[e]) {
      seen[e] = found[e];
      found[e] = atomicCAS(u + e, seen[e], __float_as_uint(__uint_as_float(seen[e]) + d[e]));
    }
  }
}

// One chunk of VEC channels starting at `ch` for one sample point: dot[c] += <g, V[corner c]>
// over the chunk, and add(c, ch, d) with d = wa[c] * g for every corner c inside the map
// (wa = attention x bilinear weight): `add` sums d into grad_value's chunk of that corner, by
// global atomics or into shared memory. off[c] is the corner's element offset in value where
// row[c] >= 0, else the offset of an existing row whose value is loaded but not used (the loads
// are unconditional, so the four are in flight together).
template <typename scalar_t, typename acc_t, typename index_t, int VEC, typename AddFn>
__device__ __forceinline__ void backward_chunk(const scalar_t* __restrict__ value,
                                               const index_t (&row)[4], const index_t (&off)[4],
                                               const acc_t (&wa)[4], const acc_t (&g)[VEC],
                                               index_t ch, acc_t (&dot)[4], AddFn&& add) {
  Pack<scalar_t, VEC> v[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) v[c] = load_pack<VEC>(value + off[c] + ch);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (row[c] < 0) continue;
    acc_t d[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      dot[c] += g[e] * static_cast<acc_t>(v[c].v[e]);
      d[e] = wa[c] * g[e];
    }
    add(c, ch, d);
  }
}

// Backward. grad_value_acc is grad_value itself (float, double) or a float buffer (half types).
// NV > 0: the lane's NV chunks cover Dh (the host guarantees Dh <= G * VEC * NV) and its
// grad_out channels stay in registers; NV == 0: any Dh, the lane loops over its chunks.
template <typename scalar_t, typename index_t, int G, int VEC, int NV>
__global__ void __launch_bounds__(kBlock)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                    const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                    scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn,
                    Sizes<index_t> n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kGroups = kBlock / G;
  constexpr int kHeld = NV > 0 ? NV : 1;  // chunks held in registers (unused when NV == 0)
  const int lane = threadIdx.x % G;
  const index_t n_groups = n.B * n.Q * n.H;
  const index_t row_stride = n.H * n.Dh;
  // The loop bound depends on the block only, so all lanes of a warp run the same iterations
  // and reach every shuffle together; groups past the end are inactive but still shuffle.
  for (index_t base = static_cast<index_t>(blockIdx.x) * kGroups; base < n_groups;
       base += static_cast<index_t>(gridDim.x) * kGroups) {
    const index_t slot = base + static_cast<index_t>(threadIdx.x / G);
    const bool active = slot < n_groups;
    // (b * Q + q) * H + h; an inactive slot computes with the last group (no index overflows)
    const index_t grp = active ? slot : n_groups - 1;
    const index_t h = grp % n.H, b = grp / (n.Q * n.H);
    const index_t head_offset = (b * n.S * n.H + h) * n.Dh;  // value row r: + r * row_stride
    const scalar_t* g_row = grad_out + grp * n.Dh;
    index_t ch[kHeld];
    bool has[kHeld];
    acc_t g[kHeld][VEC];  // this lane's grad_out channels (zero where not has)
    acc_t g_zero = 0;     // this lane's part of <grad_out, 0>: 0, or NaN (outside_point_grads)
    if constexpr (NV > 0) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        ch[j] = (j * G + lane) * VEC;
        has[j] = active && ch[j] < n.Dh;
        Pack<scalar_t, VEC> gp;
        if (has[j]) gp = load_pack<VEC>(g_row + ch[j]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[j][e] = has[j] ? static_cast<acc_t>(gp.v[e]) : acc_t(0);
          g_zero += zero_dot_term(g[j][e]);
        }
      }
    } else if (active) {
      for (index_t c = lane * VEC; c < n.Dh; c += G * VEC) {
        const Pack<scalar_t, VEC> gp = load_pack<VEC>(g_row + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) g_zero += zero_dot_term(static_cast<acc_t>(gp.v[e]));
      }
    }
    for (index_t l = 0; l < n.L; ++l) {
      Level<index_t> lv;
      const bool level_ok = load_level(shapes, starts, l, n.S, lv);
      const index_t level_offset = head_offset + (level_ok ? lv.start : index_t(0)) * row_stride;
      const index_t pt0 = (grp * n.L + l) * n.P;
      for (index_t p = 0; p < n.P; ++p) {
        const index_t pt = pt0 + p;
        Corners<acc_t, index_t> k;
        const bool usable = active && level_ok;  // (k is filled only then)
        const bool any =
            usable &&
            bilinear_corners(static_cast<acc_t>(loc[2 * pt]), static_cast<acc_t>(loc[2 * pt + 1]),
                             lv.height, lv.width, k);
        acc_t ga = 0, gx = 0, gy = 0;  // this lane's share of grad_attn, grad_loc x and y
        if (usable && !any) {  // no corner inside the map: 0, or NaN as grid_sample's
          outside_point_grads(k, g_zero, static_cast<acc_t>(attn[pt]), ga, gx, gy);
        } else if (any) {
          const acc_t a = static_cast<acc_t>(attn[pt]);
          index_t off[4];
          acc_t wa[4], dot[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            off[c] = k.row[c] >= 0 ? level_offset + k.row[c] * row_stride : head_offset;
            wa[c] = a * k.weight[c];
            dot[c] = acc_t(0);
          }
          const auto to_global = [&](int c, index_t chunk, const acc_t (&d)[VEC]) {
            atomic_add_chunk<VEC>(grad_value_acc + off[c] + chunk, d);
          };
          if constexpr (NV > 0) {
#pragma unroll
            for (int j = 0; j < NV; ++j) {
              if (has[j]) backward_chunk<scalar_t, acc_t, index_t, VEC>(
                  value, k.row, off, wa, g[j], ch[j], dot, to_global);
            }
          } else {
            for (index_t c = lane * VEC; c < n.Dh; c += G * VEC) {
              const Pack<scalar_t, VEC> gp = load_pack<VEC>(g_row + c);
              acc_t gc[VEC];
#pragma unroll
              for (int e = 0; e < VEC; ++e) gc[e] = static_cast<acc_t>(gp.v[e]);
              backward_chunk<scalar_t, acc_t, index_t, VEC>(value, k.row, off, wa, gc, c, dot,
                                                            to_global);
            }
          }
          point_grads(k, dot, a, ga, gx, gy);  // linear in dot, so partial sums add up
        }
        ga = group_sum<G>(ga);
        gx = group_sum<G>(gx);
        gy = group_sum<G>(gy);
        if (active && lane == 0) {
          grad_attn[pt] = static_cast<scalar_t>(ga);
          grad_loc[2 * pt] = static_cast<scalar_t>(gx);
          grad_loc[2 * pt + 1] = static_cast<scalar_t>(gy);
        }
      }
    }
  }
}

// Backward with the small levels summed in shared memory first (float accumulation, vector
// path, one chunk per lane: the encoder's usual case).
//
// grad_value's atomics are this op's bottleneck: 4 corners x Dh channels per sample point, one
// memory request per corner and group even as 16-byte vector reductions. A coarse level has few
// cells (13 x 19 for Deformable DETR's 1/64 level) and every query samples it, so in a block
// that handles many queries of one (b, head) most of its corners hit cells that other queries
// of the block hit too. Such a level gets an accumulator of H_l * W_l x Dh floats in shared
// memory: the block adds its points there (block-local atomics, shared_add_chunk), then adds
// each touched cell chunk to grad_value once. Levels whose accumulators do not fit (the fine
// levels) go straight to grad_value as in backward_kernel.
//
// Mapping: block `tile` handles kTileQ consecutive queries of one (b, head), tile =
// (b * n_qtiles + t) * H + h (one block per tile, no grid-stride loop); group i of the block
// takes queries i, i + kGroups, ... of the tile.
// The level table is on the device, so which levels are kept in shared memory is decided here
// (thread 0, the same for every block): from the last level (the coarsest) down, each valid level
// whose H * W * Dh floats still fit in `capacity`.
constexpr int kSmemLevels = 16;     // only levels 0..15 may be kept in shared memory
constexpr int kSmemTileQ = 128;     // queries per tile (at least one per group)
constexpr int kSmemBytes = 40 << 10;  // 40 KiB per block: 4 blocks per SM on A100 and H100
constexpr int kSmemBlocksPerSM = 4;   // registers capped to let 4 blocks (1024 threads) run

template <typename scalar_t, int G, int VEC>
__global__ void __launch_bounds__(kBlock, kSmemBlocksPerSM)
    backward_smem_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                         const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                         const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                         float* __restrict__ grad_value_acc, scalar_t* __restrict__ grad_loc,
                         scalar_t* __restrict__ grad_attn, Sizes<int32_t> n, int32_t capacity) {
  using index_t = int32_t;
  using acc_t = float;
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, float>, "float accumulation only");
  constexpr int kGroups = kBlock / G;
  constexpr int kTileQ = kGroups > kSmemTileQ ? kGroups : kSmemTileQ;  // a multiple of kGroups
  extern __shared__ float s_grad[];  // [capacity]: each kept level's [H_l * W_l][Dh] sums
  __shared__ index_t s_base[kSmemLevels];  // level l's first float in s_grad, or -1 (global)
  __shared__ index_t s_used;               // floats of s_grad in use
  const int lane = threadIdx.x % G;
  const index_t row_stride = n.H * n.Dh;
  const index_t n_qtiles = (n.Q + kTileQ - 1) / kTileQ;

  if (threadIdx.x == 0) {
    index_t used = 0;
    for (index_t l = (n.L < kSmemLevels ? n.L : kSmemLevels) - 1; l >= 0; --l) {
      Level<index_t> lv;
      index_t base = -1;
      if (load_level(shapes, starts, l, n.S, lv)) {
        const int64_t need = static_cast<int64_t>(lv.height) * lv.width * n.Dh;
        if (need <= capacity - used) {
          base = used;
          used += static_cast<index_t>(need);
        }
      }
      s_base[l] = base;
    }
    s_used = used;
  }
  __syncthreads();
  const index_t used = s_used;

  {
    const index_t tile = blockIdx.x;  // < n_tiles: the grid has one block per tile
    const index_t h = tile % n.H, bt = tile / n.H;
    const index_t t = bt % n_qtiles, b = bt / n_qtiles;
    const index_t head_offset = (b * n.S * n.H + h) * n.Dh;  // value row r: + r * row_stride
    for (index_t i = threadIdx.x; i < used; i += kBlock) s_grad[i] = 0.f;
    __syncthreads();

    // kTileQ is a multiple of kGroups, so all lanes of a warp run the same iterations and reach
    // every shuffle together; queries past Q are inactive but still shuffle.
    for (index_t qi = threadIdx.x / G; qi < kTileQ; qi += kGroups) {
      const index_t q = t * kTileQ + qi;
      const bool active = q < n.Q;
      const index_t grp = (b * n.Q + (active ? q : n.Q - 1)) * n.H + h;  // (b, q, h)
      const index_t ch = lane * VEC;
      const bool has = active && ch < n.Dh;  // this lane's chunk lies inside Dh
      acc_t g[VEC];                          // its grad_out channels (zero where not has)
      acc_t g_zero = 0;  // this lane's part of <grad_out, 0>: 0, or NaN (outside_point_grads)
      {
        Pack<scalar_t, VEC> gp;
        if (has) gp = load_pack<VEC>(grad_out + grp * n.Dh + ch);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[e] = has ? static_cast<acc_t>(gp.v[e]) : acc_t(0);
          g_zero += zero_dot_term(g[e]);
        }
      }
      for (index_t l = 0; l < n.L; ++l) {
        Level<index_t> lv;
        const bool level_ok = load_level(shapes, starts, l, n.S, lv);
        const index_t base = l < kSmemLevels ? s_base[l] : index_t(-1);  // block-uniform
        const index_t level_offset =
            head_offset + (level_ok ? lv.start : index_t(0)) * row_stride;
        const index_t pt0 = (grp * n.L + l) * n.P;
        for (index_t p = 0; p < n.P; ++p) {
          const index_t pt = pt0 + p;
          Corners<acc_t, index_t> k;
          const bool usable = active && level_ok;  // (k is filled only then)
          const bool any = usable &&
                           bilinear_corners(static_cast<acc_t>(loc[2 * pt]),
                                            static_cast<acc_t>(loc[2 * pt + 1]), lv.height,
                                            lv.width, k);
          acc_t ga = 0, gx = 0, gy = 0;  // this lane's share of grad_attn, grad_loc x and y
          if (usable && !any) {  // no corner inside the map: 0, or NaN as grid_sample's
            outside_point_grads(k, g_zero, static_cast<acc_t>(attn[pt]), ga, gx, gy);
          } else if (any && has) {
            const acc_t a = static_cast<acc_t>(attn[pt]);
            index_t off[4];
            acc_t wa[4], dot[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              off[c] = k.row[c] >= 0 ? level_offset + k.row[c] * row_stride : head_offset;
              wa[c] = a * k.weight[c];
              dot[c] = acc_t(0);
            }
            if (base >= 0) {
              // corner c's chunk in the level's shared accumulator: cell k.row[c], channel chunk
              float* s_level = s_grad + base;
              backward_chunk<scalar_t, acc_t, index_t, VEC>(
                  value, k.row, off, wa, g, ch, dot,
                  [&](int c, index_t chunk, const acc_t (&d)[VEC]) {
                    shared_add_chunk<VEC>(s_level + k.row[c] * n.Dh + chunk, d);
                  });
            } else {
              backward_chunk<scalar_t, acc_t, index_t, VEC>(
                  value, k.row, off, wa, g, ch, dot,
                  [&](int c, index_t chunk, const acc_t (&d)[VEC]) {
                    atomic_add_chunk<VEC>(grad_value_acc + off[c] + chunk, d);
                  });
            }
            point_grads(k, dot, a, ga, gx, gy);  // linear in dot, so partial sums add up
          }
          ga = group_sum<G>(ga);
          gx = group_sum<G>(gx);
          gy = group_sum<G>(gy);
          if (active && lane == 0) {
            grad_attn[pt] = static_cast<scalar_t>(ga);
            grad_loc[2 * pt] = static_cast<scalar_t>(gx);
            grad_loc[2 * pt + 1] = static_cast<scalar_t>(gy);
          }
        }
      }
    }
    __syncthreads();  // every point of the tile is in s_grad

    // Flush: each kept level's accumulator into grad_value's rows of this (b, head), one vector
    // reduction per chunk of VEC channels; all-zero chunks (cells no point touched) are skipped
    // (adding +0 would change nothing). Consecutive threads take consecutive chunks of a row.
    const index_t chunks_per_row = n.Dh / VEC;  // VEC divides Dh on the vector path
    for (index_t l = 0; l < n.L && l < kSmemLevels; ++l) {
      const index_t base = s_base[l];
      Level<index_t> lv;
      if (base < 0 || !load_level(shapes, starts, l, n.S, lv)) continue;
      const index_t n_chunks = lv.height * lv.width * chunks_per_row;  // fits: <= capacity
      for (index_t i = threadIdx.x; i < n_chunks; i += kBlock) {
        const index_t cell = i / chunks_per_row, chunk = (i - cell * chunks_per_row) * VEC;
        const float* src = s_grad + base + i * VEC;  // = base + cell * Dh + chunk
        float d[VEC];
        bool touched = false;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          d[e] = src[e];
          touched |= d[e] != 0.f;
        }
        if (touched) {
          atomic_add_chunk<VEC>(
              grad_value_acc + head_offset + (lv.start + cell) * row_stride + chunk, d);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: choosing and launching a configuration
// ---------------------------------------------------------------------------------------------

int next_pow2(int64_t x) {
  int g = 1;
  while (g < x && g < (1 << 30)) g *= 2;
  return g;
}

// A launch configuration: G lanes per (b, q, head), VEC channels per chunk, NV chunks per lane
// (NV == 0: backward loops over any number of chunks), 32- or 64-bit indexing.
struct Plan {
  bool small;  // int32 indexing
  int G, VEC, NV;
};

// Elements per lane and chunk on the vector path: 16 bytes, except in the half types' backward,
// which takes 4 (8 bytes). Its grad_value sums are float, and 4 floats are one 16-byte vector
// reduction; with 8 lanes of 4 channels a group's reductions cover whole 32-byte sectors, as in
// fp32. With 8 halves per lane a lane needs two reductions, each covering half of every sector
// it touches: twice the memory requests for the same bytes, which made the half backward slower
// than fp32's.
template <typename scalar_t>
constexpr int vec_for(bool backward) {
  return backward && sizeof(scalar_t) == 2 ? 4 : 16 / static_cast<int>(sizeof(scalar_t));
}

// `aligned`: the tensors read or written in chunks start on 16-byte boundaries. `backward`:
// NV may be 0 (the backward's loop); the forward instead makes several passes with NV = 4.
template <typename scalar_t>
Plan plan_for(int64_t Dh, bool small, bool aligned, bool backward) {
  const int kVec = vec_for<scalar_t>(backward);
  if (!small) return Plan{false, std::min(next_pow2(Dh), 32), 1, backward ? 0 : 1};
  const bool vector = aligned && Dh % kVec == 0;
  const int VEC = vector ? kVec : 1;
  const int64_t chunks = Dh / VEC;  // chunks per (b, q, head)
  const int gmax = vector ? 8 : 32;
  const int G = std::min<int64_t>(next_pow2(chunks), gmax);
  const int64_t per_lane = (chunks + G - 1) / G;
  const int NV = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : (backward ? 0 : 4);
  return Plan{true, G, VEC, NV};
}

template <int G_, int VEC_, int NV_>
struct Cfg {
  static constexpr int G = G_, VEC = VEC_, NV = NV_;
};

// Calls f(Cfg<G, VEC, NV>{}) for the plan's G and NV. Below GMAX lanes a group covers Dh in one
// chunk per lane (NV = 1); at GMAX, NV is one of NVs.
template <int VEC, int GMAX, int... NVs, typename F>
void dispatch_config(int G, int NV, F&& f) {
  if (G < GMAX) {
    switch (G) {
      case 1: f(Cfg<1, VEC, 1>{}); return;
      case 2: f(Cfg<2, VEC, 1>{}); return;
      case 4: f(Cfg<4, VEC, 1>{}); return;
      case 8: if constexpr (GMAX > 8) { f(Cfg<8, VEC, 1>{}); return; } break;
      case 16: if constexpr (GMAX > 16) { f(Cfg<16, VEC, 1>{}); return; } break;
      default: break;
    }
  } else if (((NV == NVs ? (f(Cfg<GMAX, VEC, NVs>{}), true) : false) || ...)) {
    return;
  }
  TORCH_CHECK(false, "ms_deform_attn: internal error, no kernel for G=", G, " VEC=", VEC,
              " NV=", NV);
}

// Calls f(index_t{}, Cfg{}) for the plan (forward: NV in {1, 2, 4}; backward: also 0).
template <typename scalar_t, bool kBackward, typename F>
void dispatch_plan(const Plan& plan, F&& f) {
  constexpr int kVec = vec_for<scalar_t>(kBackward);
  if (!plan.small) {
    constexpr int kNV = kBackward ? 0 : 1;
    dispatch_config<1, 32, kNV>(plan.G, plan.NV, [&](auto cfg) { f(int64_t{}, cfg); });
  } else if (plan.VEC > 1) {
    const auto g = [&](auto cfg) { f(int32_t{}, cfg); };
    if constexpr (kBackward) dispatch_config<kVec, 8, 1, 2, 4, 0>(plan.G, plan.NV, g);
    else dispatch_config<kVec, 8, 1, 2, 4>(plan.G, plan.NV, g);
  } else {
    const auto g = [&](auto cfg) { f(int32_t{}, cfg); };
    if constexpr (kBackward) dispatch_config<1, 32, 1, 2, 4, 0>(plan.G, plan.NV, g);
    else dispatch_config<1, 32, 1, 2, 4>(plan.G, plan.NV, g);
  }
}

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Blocks for `groups` groups of G lanes, capped at 32 per multiprocessor (the loops are
// grid-stride).
int64_t blocks_for(int64_t groups, int G) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32, per_block = kBlock / G;
  return std::max<int64_t>(1, std::min((groups + per_block - 1) / per_block, cap));
}

template <typename index_t>
Sizes<index_t> sizes_of(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& sampling_loc) {
  return Sizes<index_t>{static_cast<index_t>(value.size(0)),  static_cast<index_t>(value.size(1)),
                        static_cast<index_t>(sampling_loc.size(1)),
                        static_cast<index_t>(value.size(2)),
                        static_cast<index_t>(spatial_shapes.size(0)),
                        static_cast<index_t>(sampling_loc.size(4)),
                        static_cast<index_t>(value.size(3))};
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// int32 indexing is safe: no tensor (nor the output B * Q * H * Dh, nor B * Q * H * L) reaches
// 2^30 elements, so no index nor grid-stride step overflows.
bool fits_int32(const at::Tensor& value, const at::Tensor& sampling_loc) {
  const int64_t groups = sampling_loc.size(0) * sampling_loc.size(1) * value.size(2);
  return value.numel() < kSmall && sampling_loc.numel() < kSmall &&
         groups * value.size(3) < kSmall && groups * sampling_loc.size(3) < kSmall;
}

// Launches backward_smem_kernel (shared-memory accumulation of the small levels) when its case
// applies: float accumulation, the vector path with one chunk per lane, int32 indexing, and
// tiles enough to fill the GPU (a decoder's few hundred queries are not: it keeps
// backward_kernel). Returns whether it did.
template <typename scalar_t>
bool launch_backward_smem(const Plan& plan, const at::Tensor& value,
                          const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                          const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                          const at::Tensor& grad_output, const at::Tensor& grad_value_acc,
                          const at::Tensor& grad_loc, const at::Tensor& grad_attn,
                          cudaStream_t stream) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, float>) {
    return false;
  } else {
    if (!(plan.small && plan.VEC > 1 && plan.NV == 1)) return false;
    const int64_t tile_q = std::max<int64_t>(kSmemTileQ, kBlock / plan.G);
    const int64_t tiles =
        value.size(0) * value.size(2) * ((sampling_loc.size(1) + tile_q - 1) / tile_q);
    const int64_t sms = sm_count();
    if (tiles < 4 * sms) return false;
    const int64_t blocks = tiles;  // < 2^30 (int32 indexing): within the grid's x limit
    const auto launch = [&](auto cfg) {
      using C = decltype(cfg);
      backward_smem_kernel<scalar_t, C::G, C::VEC><<<blocks, kBlock, kSmemBytes, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
          attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value_acc.data_ptr<float>(), grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>(), sizes_of<int32_t>(value, spatial_shapes, sampling_loc),
          static_cast<int32_t>(kSmemBytes / sizeof(float)));
    };
    constexpr int kVec = vec_for<scalar_t>(true);
    switch (plan.G) {
      case 1: launch(Cfg<1, kVec, 1>{}); break;
      case 2: launch(Cfg<2, kVec, 1>{}); break;
      case 4: launch(Cfg<4, kVec, 1>{}); break;
      case 8: launch(Cfg<8, kVec, 1>{}); break;
      default: TORCH_CHECK(false, "ms_deform_attn: internal error, no kernel for G=", plan.G);
    }
    return true;
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), Q = sampling_loc.size(1), H = value.size(2),
                Dh = value.size(3);
  // (S == 0: no rows to sample; the kernels assume row 0 of each (b, head) exists)
  if (B * Q * H == 0 || Dh == 0 || value.size(1) == 0) {
    return at::zeros({B, Q, H * Dh}, value.options());
  }
  at::Tensor out = at::empty({B, Q, H * Dh}, value.options());  // every entry written
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        const Plan plan = plan_for<scalar_t>(Dh, fits_int32(value, sampling_loc),
                                             aligned16(value) && aligned16(out), false);
        const int64_t blocks = blocks_for(B * Q * H, plan.G);
        dispatch_plan<scalar_t, false>(plan, [&](auto index, auto cfg) {
          using index_t = decltype(index);
          using C = decltype(cfg);
          forward_kernel<scalar_t, index_t, C::G, C::VEC, C::NV><<<blocks, kBlock, 0, stream>>>(
              value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
              attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              sizes_of<index_t>(value, spatial_shapes, sampling_loc));
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc,
                                                     const at::Tensor& attn_weight,
                                                     const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const bool half_type =
      value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // grad_value is summed with atomics: in float for the half types, then cast once.
  at::Tensor grad_value_acc =
      at::zeros_like(value, half_type ? value.options().dtype(at::kFloat) : value.options());
  const int64_t n_groups = value.size(0) * sampling_loc.size(1) * value.size(2);
  const int64_t Dh = value.size(3);
  const bool work = n_groups > 0 && Dh > 0 && value.size(1) > 0;
  // with work, the kernel writes every entry of grad_loc and grad_attn
  at::Tensor grad_loc = work ? at::empty_like(sampling_loc) : at::zeros_like(sampling_loc);
  at::Tensor grad_attn = work ? at::empty_like(attn_weight) : at::zeros_like(attn_weight);
  if (work) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const Plan plan = plan_for<scalar_t>(
              Dh, fits_int32(value, sampling_loc),
              aligned16(value) && aligned16(grad_output) && aligned16(grad_value_acc), true);
          const bool use_smem = launch_backward_smem<scalar_t>(
              plan, value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
              grad_output, grad_value_acc, grad_loc, grad_attn, stream);
          if (!use_smem) {
            const int64_t blocks = blocks_for(n_groups, plan.G);
            dispatch_plan<scalar_t, true>(plan, [&](auto index, auto cfg) {
              using index_t = decltype(index);
              using C = decltype(cfg);
              backward_kernel<scalar_t, index_t, C::G, C::VEC, C::NV>
                  <<<blocks, kBlock, 0, stream>>>(
                      value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                      level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
                      attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                      grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
                      grad_attn.data_ptr<scalar_t>(),
                      sizes_of<index_t>(value, spatial_shapes, sampling_loc));
            });
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_value = half_type ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_loc, grad_attn};
}
