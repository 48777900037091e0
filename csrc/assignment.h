// Pieces of the exact linear assignment solver shared by the CPU (assignment.cpp) and CUDA
// (assignment_cuda.cu) implementations, so that both run the same arithmetic in the same order.
//
// The solver is the shortest augmenting path method of
//   D. F. Crouse, "On implementing 2D rectangular assignment algorithms",
//   IEEE Transactions on Aerospace and Electronic Systems 52(4), 2016, pp. 1679-1696,
// in the form scipy.optimize.linear_sum_assignment uses since scipy 1.4 (C++ by P. M. Larsen):
// the problem is transposed so that rows <= columns; each row is added to the matching by one
// Dijkstra search on reduced costs c[i][j] - u[i] - v[j] (u, v: dual variables, float64), and no
// initialisation heuristic is used. We follow scipy's arithmetic and its choice among columns of
// equal path cost exactly, so that our assignments are scipy's, ties included.
#pragma once
#include "common.h"

namespace detrkd {
namespace lsa {

// Length of the shortest alternating path from the current free row to column j through row i,
// given the length min_val of the path that reached row i (Crouse 2016, eq. 18 ff.):
//     min_val + c[i][j] - u[i] - v[j],
// evaluated left to right in float64, exactly as scipy does, so that ties are ties in both.
DETRKD_HD double path_cost(double min_val, double c, double u_i, double v_j) {
  return ((min_val + c) - u_i) - v_j;
}

// scipy scans the unvisited columns in the order of its `remaining` list (column nc-1 first; a
// visited column's slot is filled by the list's last column) and, among columns of equal path
// cost, keeps the first one it meets unless a later one is free (unassigned), which it prefers
// because a free column ends the search. The result: the free column with the largest position,
// else the column with the smallest position. Encoded as one key, smaller wins:
DETRKD_HD int tie_key(bool column_is_free, int position) {
  return column_is_free ? -1 - position : position;
}

// Status codes written per image (csrc/ops.h).
constexpr int kOk = 0;
constexpr int kNonFinite = 1;
constexpr int kInfeasible = 2;

}  // namespace lsa
}  // namespace detrkd
