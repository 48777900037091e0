"""Batched exact linear assignment (common.ops.linear_sum_assignment) against scipy.

The reference is scipy.optimize.linear_sum_assignment on each image's float64 block. Our solver
follows scipy's algorithm and its tie order, so the tests ask for scipy's exact indices, not only
its optimal total, on every problem, ties included; the totals are compared too, in float64, so
that a failure says whether the optimum or only the choice among optima differs.
"""
import numpy as np
import pytest
import scipy.optimize
import torch

from common import ops

pytestmark = pytest.mark.skipif(ops.backend("cpu") != "ext",
                                reason="the extension common._C is not built")


def scipy_reference(cost, sizes=None):
    """[(row_ind, col_ind)] per image, scipy on the float64 block of the valid columns."""
    host = cost.detach().cpu().double().numpy()
    sizes = [host.shape[2]] * host.shape[0] if sizes is None else sizes
    return [scipy.optimize.linear_sum_assignment(host[b, :, :k]) for b, k in enumerate(sizes)]


def assert_same_as_scipy(cost, sizes=None, what=""):
    ours = ops.linear_sum_assignment(cost, sizes)
    ref = scipy_reference(cost, sizes)
    host = cost.detach().cpu().double().numpy()
    assert len(ours) == len(ref)
    for b, ((r, c), (r_ref, c_ref)) in enumerate(zip(ours, ref)):
        assert r.dtype == torch.int64 and c.dtype == torch.int64
        assert r.device == cost.device and c.device == cost.device
        r, c = r.cpu().numpy(), c.cpu().numpy()
        assert len(r) == len(r_ref), f"{what} image {b}: {len(r)} assignments, scipy {len(r_ref)}"
        total, total_ref = host[b][r, c].sum(), host[b][r_ref, c_ref].sum()
        assert total == pytest.approx(total_ref, rel=1e-12, abs=1e-12), \
            f"{what} image {b}: total {total} is not scipy's optimum {total_ref}"
        np.testing.assert_array_equal(r, r_ref, err_msg=f"{what} image {b}: row_ind")
        np.testing.assert_array_equal(c, c_ref, err_msg=f"{what} image {b}: col_ind")
        # an assignment: distinct rows and columns inside the valid block
        assert len(set(r.tolist())) == len(r) and len(set(c.tolist())) == len(c)
    return ours


# (N, M): N > M (DETR: queries x targets), N < M, square, and the degenerate single row/column
SHAPES = [(1, 1), (1, 6), (6, 1), (2, 3), (3, 2), (5, 5), (7, 3), (3, 7), (9, 8), (8, 9),
          (16, 16), (30, 4), (4, 30), (33, 17), (40, 40), (100, 7), (7, 100), (64, 63)]


def test_hand_computed_3x3():
    # the six permutations cost 6, 5 (0->1, 1->0, 2->2), 9, 7, 11, 6: the optimum is unique
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    r, c = ops.linear_sum_assignment(cost)
    assert r.tolist() == [0, 1, 2] and c.tolist() == [1, 0, 2]
    # the same problem with a fourth, expensive query: it stays unassigned
    r, c = ops.linear_sum_assignment(torch.cat([cost, torch.full((1, 3), 9.0)]).T.contiguous())
    assert r.tolist() == [0, 1, 2] and c.tolist() == [1, 0, 2]
    # 4 queries x 2 targets (transposed inside): both targets are cheapest at query 2, but query
    # 2 -> target 0 (1.0) with query 3 -> target 1 (0.75) totals 1.75, below every alternative
    tall = torch.tensor([[3.0, 2.0], [4.0, 9.0], [1.0, 0.5], [5.0, 0.75]])
    r, c = ops.linear_sum_assignment(tall)
    assert r.tolist() == [2, 3] and c.tolist() == [0, 1]
    best = min((tall[a, 0] + tall[b, 1], a, b) for a in range(4) for b in range(4) if a != b)
    assert (best[1], best[2]) == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_unique_optimum_matches_scipy(dtype):
    g = torch.Generator().manual_seed(1)
    for N, M in SHAPES:  # continuous costs: the optimum is unique, indices must match
        assert_same_as_scipy(torch.rand(60, N, M, generator=g, dtype=torch.float64).to(dtype),
                             what=f"{N}x{M} {dtype}")


def test_detr_like_costs_match_scipy():
    """Costs as the DETR matcher builds them (softmax class + 5 L1 + 2 GIoU) on random boxes."""
    g = torch.Generator().manual_seed(2)
    for Q, T in [(300, 7), (100, 30), (20, 40)]:
        B = 8
        boxes = lambda n: torch.cat([torch.rand(B, n, 2, generator=g) * 0.8 + 0.1,
                                     torch.rand(B, n, 2, generator=g) * 0.3 + 0.02], -1)
        cost = ops.match_cost_fallback(torch.randn(B, Q, 91, generator=g), boxes(Q),
                                       torch.randint(0, 91, (B, T), generator=g), boxes(T),
                                       torch.full((B,), T), "softmax", 1.0, 5.0, 2.0)
        assert_same_as_scipy(cost.contiguous(), what=f"DETR {Q}x{T}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_match_scipy_tie_order(dtype):
    """Integer costs from a tiny range have many optimal assignments: scipy's choice is kept."""
    g = torch.Generator().manual_seed(3)
    for N, M in SHAPES:
        for high in (2, 4):
            cost = torch.randint(0, high, (60, N, M), generator=g).to(dtype)
            assert_same_as_scipy(cost, what=f"ties {N}x{M} in [0,{high}) {dtype}")
    for N, M in [(5, 5), (7, 3), (3, 7), (100, 7)]:  # constant: scipy returns a fixed pattern
        for value in (0.0, 1.0, -2.5):
            assert_same_as_scipy(torch.full((3, N, M), value, dtype=dtype), what="constant")


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_large_and_small_magnitudes(scale):
    g = torch.Generator().manual_seed(4)
    for N, M in [(20, 5), (5, 20), (12, 12), (100, 7)]:
        cost = torch.rand(40, N, M, generator=g, dtype=torch.float64) * scale
        assert_same_as_scipy(cost, what=f"scale {scale}")
        assert_same_as_scipy(cost.float(), what=f"scale {scale} fp32")
        # a large common offset with small differences
        assert_same_as_scipy(scale + cost * 1e-3, what=f"offset {scale}")
        # negative costs
        assert_same_as_scipy(-cost, what=f"negative {scale}")


def test_ragged_sizes_and_empty_images():
    g = torch.Generator().manual_seed(5)
    for N, M in [(30, 12), (6, 12), (12, 12)]:
        B = 40
        sizes = torch.randint(0, M + 1, (B,), generator=g).tolist()
        sizes[0], sizes[1] = 0, M
        cost = torch.rand(B, N, M, generator=g)
        for b, k in enumerate(sizes):  # padding holds garbage, also non-finite: never read
            cost[b, :, k:] = float("nan") if b % 2 else -1e9
        ours = assert_same_as_scipy(cost, sizes, what=f"ragged {N}x{M}")
        r, c = ours[0]
        assert r.numel() == 0 and c.numel() == 0  # zero columns: empty result
        assert_same_as_scipy(cost, torch.tensor(sizes), what="sizes as a tensor")


def test_empty_shapes():
    for shape in [(3, 0, 5), (3, 5, 0), (0, 4, 4)]:
        out = ops.linear_sum_assignment(torch.rand(shape))
        assert len(out) == shape[0]
        assert all(r.numel() == 0 and c.numel() == 0 for r, c in out)
    r, c = ops.linear_sum_assignment(torch.rand(0, 3))
    assert r.numel() == 0 and c.numel() == 0


def test_unbatched_and_half_input():
    g = torch.Generator().manual_seed(6)
    cost = torch.rand(9, 4, generator=g)
    r, c = ops.linear_sum_assignment(cost)
    r_ref, c_ref = scipy.optimize.linear_sum_assignment(cost.double().numpy())
    assert r.tolist() == r_ref.tolist() and c.tolist() == c_ref.tolist()
    half = cost.to(torch.bfloat16)  # solved in float32, so on the rounded values
    r, c = ops.linear_sum_assignment(half)
    r_ref, c_ref = scipy.optimize.linear_sum_assignment(half.double().numpy())
    total = half.double().numpy()
    assert total[r, c].sum() == pytest.approx(total[r_ref, c_ref].sum(), abs=1e-12)


def test_scalar_path_and_threads_agree(monkeypatch):
    """The scalar code (DETRKD_LSA_SCALAR=1), the SIMD code and 2 threads give scipy's answer."""
    g = torch.Generator().manual_seed(7)
    problems = [torch.rand(30, 50, 9, generator=g), torch.rand(30, 9, 50, generator=g).double(),
                torch.randint(0, 3, (30, 25, 11), generator=g).float(),
                torch.randint(0, 3, (30, 11, 25), generator=g).double()]
    monkeypatch.setenv("DETRKD_LSA_SCALAR", "1")
    for cost in problems:
        assert_same_as_scipy(cost, what="scalar path")
    monkeypatch.delenv("DETRKD_LSA_SCALAR")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for cost in problems:
            assert_same_as_scipy(cost, what="2 threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_cost_raises(bad_value, dtype):
    for N, M in [(10, 4), (4, 10), (9, 9)]:  # transposed, as is, square
        cost = torch.rand(3, N, M, dtype=dtype)
        cost[2, N - 1, M - 1] = bad_value
        with pytest.raises(ValueError, match=r"cost of image 2 contains NaN or inf"):
            ops.linear_sum_assignment(cost)
        with pytest.raises(ValueError, match=r"cost of image 2 contains NaN or inf"):
            ops.linear_sum_assignment_fallback(cost, [M] * 3)
        # validate=False: no error, the status says it (row_ind of that image stays -1)
        out = ops.linear_sum_assignment(cost, validate=False)
        assert len(out) == 3 and (out[2][0] == -1).all()
        for b, (r_ref, c_ref) in enumerate(scipy_reference(cost[:2])):  # the others are solved
            assert out[b][0].tolist() == r_ref.tolist() and out[b][1].tolist() == c_ref.tolist()


def test_bad_input_raises():
    cost = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="cost must have"):
        ops.linear_sum_assignment(torch.rand(5))
    with pytest.raises(ValueError, match="cost must have"):
        ops.linear_sum_assignment(torch.rand(1, 2, 5, 3))
    with pytest.raises(TypeError, match="cost must be a floating-point"):
        ops.linear_sum_assignment(torch.ones(2, 5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        ops.linear_sum_assignment(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="sizes has 3 entries"):
        ops.linear_sum_assignment(cost, [3, 3, 3])
    with pytest.raises(ValueError, match="sizes must lie in"):
        ops.linear_sum_assignment(cost, [3, 4])
    with pytest.raises(ValueError, match="sizes must lie in"):
        ops.linear_sum_assignment(cost, [-1, 2])
    # the extension's own checks (a caller skipping the Python wrapper gets an error, no crash)
    from common import _C
    n = torch.tensor([3, 3])
    with pytest.raises(RuntimeError, match="num_cols\\[1\\] = 4 is outside"):
        _C.linear_sum_assignment(cost, torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="num_cols must be int64"):
        _C.linear_sum_assignment(cost, n.int())
    with pytest.raises(RuntimeError, match="num_cols has 3 entries"):
        _C.linear_sum_assignment(cost, torch.tensor([3, 3, 3]))
    with pytest.raises(RuntimeError, match="cost must be float32 or float64"):
        _C.linear_sum_assignment(cost.half(), n)
    with pytest.raises(RuntimeError, match="cost must have 3 dimensions"):
        _C.linear_sum_assignment(cost[0], n)
    with pytest.raises(RuntimeError, match="cost must be contiguous"):  # neither layout
        _C.linear_sum_assignment(torch.rand(2, 3, 6)[:, :, ::2], n)
    # a non-contiguous cost through the wrapper is fine
    assert_same_as_scipy(torch.rand(4, 3, 6).transpose(1, 2), what="non-contiguous")
    assert_same_as_scipy(torch.rand(4, 3, 12)[:, :, ::2], what="strided")


@pytest.mark.parametrize("N,M,sizes", [(30, 7, [7, 3, 0, 5]),     # N > M: DETR's queries x targets
                                       (5, 9, [9, 4, 5, 6]),      # N < M, and N > some sizes
                                       (6, 6, [6, 6, 1, 0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_major_cost_is_read_as_is(N, M, sizes, dtype):
    # match_cost's CPU output is a (B, N, M) view of (B, M, N) storage; the CPU solver reads it
    # without a copy to row-major. Same pairs as scipy, for both orientations of the problem.
    g = torch.Generator().manual_seed(N * M)
    storage = torch.rand(len(sizes), M, N, generator=g, dtype=dtype)
    cost = storage.transpose(1, 2)
    assert not cost.is_contiguous()
    assert_same_as_scipy(cost, sizes, what="column-major")
    bad = storage.clone()
    bad[1, 0, N - 1] = float("nan")  # cost[1, N - 1, 0], inside image 1's block
    with pytest.raises(ValueError, match=r"cost of image 1 contains NaN or inf"):
        ops.linear_sum_assignment(bad.transpose(1, 2), sizes)


# ------------------------------------------------------------------------------------------
# CUDA: the same checks on the GPU solver (run when a GPU is present)
# ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_scipy(dtype):
    g = torch.Generator().manual_seed(11)
    for N, M in SHAPES + [(300, 100), (900, 20), (1000, 1000)]:
        B = 60 if N * M < 5000 else 4
        cost = torch.rand(B, N, M, generator=g, dtype=torch.float64).to(dtype)
        assert_same_as_scipy(cost.cuda(), what=f"cuda {N}x{M} {dtype}")
        ties = torch.randint(0, 3, (B, N, M), generator=g).to(dtype)
        assert_same_as_scipy(ties.cuda(), what=f"cuda ties {N}x{M} {dtype}")
    for value in (0.0, 1.5):
        assert_same_as_scipy(torch.full((2, 7, 5), value, dtype=dtype).cuda(), what="constant")
    for scale in (1e6, 1e-6):
        assert_same_as_scipy((torch.rand(20, 30, 6, generator=g, dtype=torch.float64) * scale)
                             .to(dtype).cuda(), what=f"cuda scale {scale}")


@pytest.mark.cuda
def test_cuda_large_columns_use_global_memory():
    """Problems too large for shared memory (the working arrays then live in global memory)."""
    g = torch.Generator().manual_seed(12)
    for N, M in [(12000, 3), (3, 12000), (5000, 60)]:
        cost = torch.rand(2, N, M, generator=g)
        assert_same_as_scipy(cost.cuda(), what=f"cuda {N}x{M}")


@pytest.mark.cuda
def test_cuda_ragged_empty_and_async():
    g = torch.Generator().manual_seed(13)
    B, N, M = 30, 40, 12
    sizes = torch.randint(0, M + 1, (B,), generator=g).tolist()
    sizes[0] = 0
    cost = torch.rand(B, N, M, generator=g)
    for b, k in enumerate(sizes):
        cost[b, :, k:] = float("nan")
    ours = assert_same_as_scipy(cost.cuda(), sizes, what="cuda ragged")
    assert ours[0][0].numel() == 0
    for shape in [(3, 0, 5), (3, 5, 0)]:
        assert all(r.numel() == 0 for r, _ in ops.linear_sum_assignment(torch.rand(shape).cuda()))
    # validate=False returns device tensors without waiting; results equal the validated ones
    out = ops.linear_sum_assignment(cost.cuda(), sizes, validate=False)
    for (r, c), (r2, c2) in zip(out, ours):
        assert r.is_cuda and torch.equal(r, r2) and torch.equal(c, c2)


@pytest.mark.cuda
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_cuda_non_finite_cost_raises(bad_value):
    cost = torch.rand(3, 10, 4)
    cost[1, 3, 2] = bad_value
    with pytest.raises(ValueError, match=r"cost of image 1 contains NaN or inf"):
        ops.linear_sum_assignment(cost.cuda())
    with pytest.raises(ValueError, match=r"cost of image 1 contains NaN or inf"):
        ops.linear_sum_assignment(cost.transpose(1, 2).contiguous().cuda())
