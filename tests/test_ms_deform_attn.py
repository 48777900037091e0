"""Multi-scale deformable attention: the extension (csrc/ms_deform_attn*.{h,cpp,cu}) against the
pure-PyTorch fallback and a float64 reference.

The reference is ``ops.ms_deform_attn_fallback`` run in float64: it is torch's own
``F.grid_sample(align_corners=False, padding_mode='zeros')`` per level, so it shares no code
with our C++/CUDA kernels, and its gradients come from torch's autograd.
"""
import itertools
import math

import pytest
import torch

from common import ops

# (B, level shapes (H, W)) combinations: 1 to 4 levels, non-square, batch 1 to 3
LEVEL_CASES = [
    (1, [(5, 7)]),
    (2, [(6, 3), (3, 2)]),
    (3, [(4, 9), (2, 5), (1, 3)]),
    (2, [(8, 6), (4, 3), (2, 2), (1, 1)]),
]
CHANNELS = [1, 7, 32, 64, 71]


def level_table(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    hw = spatial_shapes.prod(1)
    return spatial_shapes, torch.cumsum(hw, 0) - hw


def make_inputs(B, shapes, Q=6, H=2, Dh=4, P=3, dtype=torch.float64, device="cpu", spread=1.4):
    """Random inputs; locations uniform over [-(spread-1)/2, 1 + (spread-1)/2], so some fall
    partly or wholly outside the map."""
    spatial_shapes, level_start_index = level_table(shapes, device)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    value = torch.randn(B, S, H, Dh, dtype=dtype, device=device)
    loc = torch.rand(B, Q, H, L, P, 2, dtype=dtype, device=device) * spread - (spread - 1) / 2
    attn = torch.rand(B, Q, H, L, P, dtype=dtype, device=device)
    return value, spatial_shapes, level_start_index, loc, attn


def reference(value, spatial_shapes, loc, attn, grad_out=None):
    """float64 output (and gradients of value, loc, attn for grad_out) from grid_sample."""
    v, l, a = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (value, loc, attn))
    out = ops.ms_deform_attn_fallback(v, spatial_shapes.cpu(), l, a)
    if grad_out is None:
        return out.detach()
    out.backward(grad_out.detach().to("cpu", torch.float64))
    return out.detach(), v.grad, l.grad, a.grad


def run_op(value, spatial_shapes, level_start_index, loc, attn, grad_out):
    """Output and the three gradients from the public op (the extension on CPU)."""
    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = ops.ms_deform_attn(v, spatial_shapes, level_start_index, l, a)
    out.backward(grad_out)
    return out.detach(), v.grad, l.grad, a.grad


def assert_close(actual, expected, rtol, atol, what=""):
    actual = actual.detach().to("cpu", torch.float64)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m:
                               f"{what}: {m}")


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    assert ops.backend("cpu") == "ext", (
        "common._C is not built: run 'python setup.py build_ext --inplace' (these tests check "
        "the extension)")


# ------------------------------------------------------------------------------------------
# CPU: values and gradients
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,shapes", LEVEL_CASES)
@pytest.mark.parametrize("Dh", CHANNELS)
def test_cpu_matches_float64_reference(B, shapes, Dh):
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q=5, H=2, Dh=Dh, P=2)
    grad_out = torch.randn(B, 5, 2 * Dh, dtype=torch.float64)
    ref = reference(value, ss, loc, attn, grad_out)
    names = ("output", "grad_value", "grad_loc", "grad_attn")
    # float64 extension: equal to the reference up to rounding
    for name, got, want in zip(names, run_op(value, ss, lsi, loc, attn, grad_out), ref):
        assert_close(got, want, rtol=1e-12, atol=1e-12, what=f"float64 {name}")
    # float32 extension and float32 fallback: both within float32 rounding of the reference
    f32 = [t.float() for t in (value, loc, attn, grad_out)]
    ours = run_op(f32[0], ss, lsi, f32[1], f32[2], f32[3])
    theirs = run_op_fallback(f32[0], ss, f32[1], f32[2], f32[3])
    for name, got, fb, want in zip(names, ours, theirs, ref):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=1e-5, atol=2e-5, what=f"float32 {name}")
        assert_close(fb, want, rtol=1e-5, atol=2e-5, what=f"float32 fallback {name}")


def run_op_fallback(value, spatial_shapes, loc, attn, grad_out):
    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = ops.ms_deform_attn_fallback(v, spatial_shapes, l, a)
    out.backward(grad_out)
    return out.detach(), v.grad, l.grad, a.grad


def test_border_points_match_grid_sample():
    """Points exactly on the map's borders, on cell centres and on cell edges (where the
    bilinear weights have kinks and both sides must pick the same one-sided derivative)."""
    shapes = [(4, 8), (2, 2)]  # powers of two: every coordinate below is exact in binary
    ss, lsi = level_table(shapes)
    coords = []
    for h, w in shapes:
        # x = 0 and 1 (map borders), centres of the first/last cells, the edge between the first
        # two cells, px = -1 exactly (the last position with an in-map corner), px = W (none)
        xs = [0.0, 1.0, 0.5 / w, 1 - 0.5 / w, 1.0 / w, -0.5 / w, (w + 0.5) / w, 0.5]
        ys = [0.0, 1.0, 0.5 / h, 1 - 0.5 / h, 1.0 / h, -0.5 / h, (h + 0.5) / h, 0.5]
        coords.append(torch.tensor(list(itertools.product(xs, ys)), dtype=torch.float64))
    Q = coords[0].shape[0]  # 64 combinations per level
    B, H, P, Dh = 2, 2, 1, 5
    loc = torch.stack(coords, dim=1)  # (Q, L, 2)
    loc = loc[None, :, None, :, None, :].expand(B, Q, H, len(shapes), P, 2).contiguous()
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, Dh, dtype=torch.float64)
    attn = torch.rand(B, Q, H, len(shapes), P, dtype=torch.float64)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    ref = reference(value, ss, loc, attn, grad_out)
    ours = run_op(value, ss, lsi, loc, attn, grad_out)
    for name, got, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), ours, ref):
        assert_close(got, want, rtol=1e-12, atol=1e-12, what=name)
    # x = -0.5 / W (px = -1 exactly), y = 0.5 on level 0: the in-map corners have weight 0, so
    # the sample is 0, but its x-gradient is not (grid_sample's convention, kept by ours)
    q = 5 * 8 + 7
    assert torch.all(ours[0][:, q] == ref[0][:, q])
    assert torch.all(ours[2][:, q, :, 0, 0, 0] != 0)


def test_far_outside_points_give_zero_output_and_gradient():
    B, shapes, Q, H, L, P, Dh = 2, [(3, 5), (2, 2)], 4, 2, 2, 3, 7
    value, ss, lsi, _, attn = make_inputs(B, shapes, Q, H, Dh, P)
    # beyond (-1, W) x (-1, H) in pixels: x = -0.6 is px < -1 on both levels, x = 1.7 is px >= W;
    # huge but finite coordinates are just far outside
    far = torch.tensor([[-0.6, 0.5], [1.7, 0.5], [0.5, -0.9], [0.5, 2.0], [-3.0, 9.0],
                        [1e30, 0.5], [0.5, -1e30], [-1e30, 1e10]], dtype=torch.float64)
    loc = far[torch.randint(len(far), (B, Q, H, L, P))]
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (value, loc, attn, grad_out)]
        ours = run_op(args[0], ss, lsi, *args[1:])
        theirs = run_op_fallback(args[0], ss, *args[1:])
        for t in ours + theirs:
            assert torch.equal(t, torch.zeros_like(t))


# Non-finite sampling locations, (x, y) pairs: x only, y only, both; NaN, +inf, -inf.
NON_FINITE = [(float("nan"), 0.4), (0.3, float("nan")), (float("nan"), float("nan")),
              (float("inf"), 0.4), (0.3, float("-inf")), (float("-inf"), float("inf"))]


def _poisoned_inputs(dtype):
    """Inputs whose sampling locations include every NON_FINITE pair, each at one point of one
    query-head of one level, next to ordinary points (inside, on the border, outside)."""
    B, shapes, Q, H, P, Dh = 2, [(4, 5), (2, 3)], 6, 2, 3, 5
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q, H, Dh, P)
    poisoned = []
    for i, (x, y) in enumerate(NON_FINITE):  # (b, q, h, l, p), all different query-heads
        where = (i % B, i, i % H, i % 2, i % P)
        loc[where] = torch.tensor([x, y], dtype=torch.float64)
        poisoned.append(where)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    return [t.to(dtype) for t in (value, loc, attn, grad_out)], ss, lsi, poisoned, Dh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_and_inf_locations_follow_grid_sample(dtype):
    """A NaN or infinite sampling location is not "outside the map": grid_sample samples NaN
    there, so the query-head's output is NaN. Its gradients are grid_sample's too: NaN for the
    attention weight and for each coordinate whose weights use a NaN fraction (a NaN x makes
    the y-gradient NaN, while the x-gradient stays 0), and grad_value gets nothing from it."""
    (value, loc, attn, grad_out), ss, lsi, poisoned, Dh = _poisoned_inputs(dtype)
    ours = run_op(value, ss, lsi, loc, attn, grad_out)
    ref = reference(value, ss, loc, attn, grad_out)  # float64 grid_sample
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, got, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), ours, ref):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    # what the reference says, spelled out, so that a change in it cannot go unnoticed
    out, g_value, g_loc, g_attn = ours
    nan_rows = torch.zeros(out.shape[:2] + (2,), dtype=torch.bool)  # (B, Q, H)
    for (b, q, h, lvl, p), (x, y) in zip(poisoned, NON_FINITE):
        nan_rows[b, q, h] = True
        assert torch.isnan(g_attn[b, q, h, lvl, p])
        gx, gy = g_loc[b, q, h, lvl, p].tolist()
        assert math.isnan(gx) == (not math.isfinite(y)) and math.isnan(gy) == (not math.isfinite(x))
        assert (gx == 0 or math.isnan(gx)) and (gy == 0 or math.isnan(gy))
    nan_out = torch.isnan(out.view(*out.shape[:2], 2, Dh))
    assert torch.equal(nan_out, nan_rows[..., None].expand_as(nan_out))
    assert torch.isfinite(g_value).all()
    # the fallback (grid_sample itself, plus its NaN term for CUDA's grid_sample) agrees
    theirs = run_op_fallback(value, ss, loc, attn, grad_out)
    for name, fb, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), theirs, ref):
        torch.testing.assert_close(fb.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"fallback {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_attention_weights_values_and_grad_output_propagate(dtype):
    """NaN in an attention weight (at a point inside the map and at one wholly outside it), in
    a value cell, or in the upstream gradient: the output and gradients are NaN where
    grid_sample's are (the fallback), never a silent 0."""
    B, shapes, Q, H, P, Dh = 2, [(4, 5), (2, 3)], 5, 2, 2, 6
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q, H, Dh, P)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5, 0.5])   # inside: NaN weight
    attn[0, 0, 0, 0, 0] = float("nan")
    loc[1, 1, 1, 1, 1] = torch.tensor([-3.0, 0.5])  # wholly outside: NaN weight
    attn[1, 1, 1, 1, 1] = float("nan")
    loc[0, 2, 1, 0, 0] = torch.tensor([0.1, 0.1])   # reads cell (0, 0) of level 0...
    value[0, 0, 1, 3] = float("nan")                # ...which holds a NaN in channel 3
    loc[1, 3, 0, 1, 1] = torch.tensor([1.5, 0.5])   # wholly outside, and
    grad_out[1, 3, 2] = float("nan")                # NaN upstream gradient for its query-head
    args = [t.to(dtype) for t in (value, loc, attn, grad_out)]
    ours = run_op(args[0], ss, lsi, *args[1:])
    theirs = run_op_fallback(args[0], ss, *args[1:])
    ref = reference(value, ss, loc, attn, grad_out)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    names = ("output", "grad_value", "grad_loc", "grad_attn")
    for name, got, fb, want in zip(names, ours, theirs, ref):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(fb.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"fallback {name}: {m}")
    out, _, g_loc, g_attn = ours
    assert torch.isnan(out[0, 0, :Dh]).all() and torch.isnan(out[1, 1, Dh:]).all()
    assert torch.isnan(out[0, 2, Dh + 3])
    assert torch.isnan(g_attn[1, 3, 0, 1, 1]) and torch.isnan(g_loc[1, 3, 0, 1, 1]).all()


@pytest.mark.parametrize("Dh", [1, 3])
def test_gradcheck_float64(Dh):
    value, ss, lsi, loc, attn = make_inputs(2, [(3, 4), (2, 3)], Q=3, H=2, Dh=Dh, P=2,
                                            spread=1.2)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]

    def f(v, l, a):
        return ops.ms_deform_attn(v, ss, lsi, l, a)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_large_batch_and_empty_queries():
    # no batch chunking: 65 images (the official op needed B divisible by min(B, 64))
    value, ss, lsi, loc, attn = make_inputs(65, [(2, 3), (1, 2)], Q=2, H=1, Dh=2, P=2)
    grad_out = torch.randn(65, 2, 2, dtype=torch.float64)
    for got, want in zip(run_op(value, ss, lsi, loc, attn, grad_out),
                         reference(value, ss, loc, attn, grad_out)):
        assert_close(got, want, rtol=1e-12, atol=1e-12)
    # zero queries: empty output, zero grad_value
    value, ss, lsi, loc, attn = make_inputs(2, [(2, 3)], Q=0, H=2, Dh=3, P=2)
    out, gv, gl, ga = run_op(value, ss, lsi, loc, attn, torch.zeros(2, 0, 6, dtype=torch.float64))
    assert out.shape == (2, 0, 6) and gl.shape == loc.shape and ga.shape == attn.shape
    assert torch.equal(gv, torch.zeros_like(value))


def test_cpu_results_do_not_depend_on_thread_count():
    """Forward writes each output once; backward gives each thread whole (image, head-chunk)
    slices of grad_value, so the summation order, and the bits, are the same for any count."""
    value, ss, lsi, loc, attn = make_inputs(1, [(6, 5), (3, 3)], Q=40, H=4, Dh=32, P=4,
                                            dtype=torch.float32)
    grad_out = torch.randn(1, 40, 4 * 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_op(value, ss, lsi, loc, attn, grad_out)
        torch.set_num_threads(2)
        two = run_op(value, ss, lsi, loc, attn, grad_out)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Bad input: a clear Python error naming the argument, never a crash
# ------------------------------------------------------------------------------------------

def _good(dtype=torch.float32):
    return make_inputs(2, [(3, 4), (2, 2)], Q=3, H=2, Dh=4, P=2, dtype=dtype)


@pytest.mark.parametrize("case,exc,pattern", [
    ("value_rank", ValueError, "value must have 4 dimensions"),
    ("loc_rank", ValueError, "sampling_locations must have 6 dimensions"),
    ("attn_shape", ValueError, "attention_weights shape"),
    ("loc_heads", ValueError, "sampling_locations shape"),
    ("shapes_dtype", TypeError, "spatial_shapes must have dtype torch.int64"),
    ("start_dtype", TypeError, "level_start_index must have dtype torch.int64"),
    ("value_int", TypeError, "value must be a floating-point tensor"),
    ("mixed_dtype", TypeError, "must share a dtype"),
    ("half_on_cpu", TypeError, "float32 and float64"),
    ("S_mismatch", ValueError, "value has S="),
    ("start_wrong", ValueError, "level_start_index"),
    ("levels_mismatch", ValueError, "level_start_index has 1 entries"),
    ("mixed_devices", ValueError, "one device"),
    ("not_tensor", TypeError, "value must be a torch.Tensor"),
])
def test_bad_input_raises_python_error(case, exc, pattern):
    v, ss, lsi, loc, a = _good()
    if case == "value_rank":
        v = v[0]
    elif case == "loc_rank":
        loc = loc[..., 0]
    elif case == "attn_shape":
        a = a[:, :, :, :, :1]
    elif case == "loc_heads":
        loc = torch.cat([loc, loc], dim=2)
        a = torch.cat([a, a], dim=2)
    elif case == "shapes_dtype":
        ss = ss.int()
    elif case == "start_dtype":
        lsi = lsi.int()
    elif case == "value_int":
        v = v.long()
    elif case == "mixed_dtype":
        loc = loc.double()
    elif case == "half_on_cpu":
        v, loc, a = v.half(), loc.half(), a.half()
    elif case == "S_mismatch":
        v = v[:, :-1]
    elif case == "start_wrong":
        lsi = lsi + 1
    elif case == "levels_mismatch":
        lsi = lsi[:1]
    elif case == "mixed_devices":
        loc = loc.to("meta")
    elif case == "not_tensor":
        v = v.tolist()
    with pytest.raises(exc, match=pattern):
        ops.ms_deform_attn(v, ss, lsi, loc, a)


# Level tables that must be refused. In int64, (2^32, 2^32) has 0 cells (2^64 wraps around), so
# the table sums to S and its starts look consistent; four levels of 2^62 cells wrap the sum the
# same way. A kernel that trusted them would index far outside value (the extension crashed).
BAD_TABLES = {  # case: (spatial_shapes, level_start_index, what the error names)
    "hw_wraps": ([(2 ** 32, 2 ** 32), (2, 3)], [0, 0], "spatial_shapes"),
    "sum_wraps": ([(2 ** 31, 2 ** 31)] * 4 + [(2, 3)], [0, 2 ** 62, -2 ** 63, -2 ** 62, 0],
                  "spatial_shapes"),
    "empty_level": ([(0, 7), (2, 3)], [0, 0], r"spatial_shapes\[0\] must be a positive"),
    # -6 cells: the sum is S again and the starts follow it
    "negative": ([(-2, 3), (2, 3), (2, 3)], [0, -6, 0], r"spatial_shapes\[0\] must be a positive"),
    "starts_wrong": ([(1, 2), (1, 4)], [0, 3], "level_start_index"),
}


@pytest.mark.parametrize("backend", ["ext", "fallback"])
@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_level_table_is_refused(backend, case, monkeypatch):
    """A clear ValueError naming the argument, from either backend, before any kernel runs."""
    shapes, starts, pattern = BAD_TABLES[case]
    if backend == "fallback":
        monkeypatch.setattr(ops, "_ext_for", lambda device: None)
    B, S, Q, H, P, Dh = 2, 6, 3, 2, 2, 4
    value = torch.randn(B, S, H, Dh)
    loc = torch.rand(B, Q, H, len(shapes), P, 2)
    attn = torch.rand(B, Q, H, len(shapes), P)
    ss, lsi = torch.tensor(shapes), torch.tensor(starts)
    with pytest.raises(ValueError, match=pattern):
        ops.ms_deform_attn(value, ss, lsi, loc, attn)


@pytest.mark.parametrize("case", ["hw_wraps", "sum_wraps"])
def test_wrapping_level_table_to_raw_extension_raises(case):
    from common import _C
    shapes, starts, _ = BAD_TABLES[case]
    B, S, Q, H, P, Dh = 2, 6, 3, 2, 2, 4
    value = torch.randn(B, S, H, Dh)
    loc = torch.rand(B, Q, H, len(shapes), P, 2)
    attn = torch.rand(B, Q, H, len(shapes), P)
    ss, lsi = torch.tensor(shapes), torch.tensor(starts)
    with pytest.raises(RuntimeError, match=r"level 0 \(H, W\) = .* does not fit"):
        _C.ms_deform_attn_forward(value, ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"level 0 \(H, W\) = .* does not fit"):
        _C.ms_deform_attn_backward(value, ss, lsi, loc, attn, torch.zeros(B, Q, H * Dh))


@pytest.mark.parametrize("case,pattern", [
    ("value_noncontiguous", "value must be contiguous"),
    ("loc_noncontiguous", "sampling_loc must be contiguous"),
    ("attn_noncontiguous", "attn_weight must be contiguous"),
    ("value_rank", "value must have 4 dimensions"),
    ("attn_shape", "attn_weight must be"),
    ("loc_dtype", "sampling_loc must have value's dtype"),
    ("shapes_dtype", "spatial_shapes must be int64"),
    ("S_mismatch", "value has S="),
    ("start_wrong", "level_start_index\\[1\\] must be"),
    ("negative_shape", "spatial_shapes\\[0\\] must be non-negative"),
    ("mixed_devices", "sampling_loc is on meta"),
    ("half_on_cpu", "float32 or float64 on CPU"),
])
def test_bad_input_to_raw_extension_raises(case, pattern):
    """The C++ entry points check their arguments too (TORCH_CHECK -> RuntimeError)."""
    from common import _C
    v, ss, lsi, loc, a = _good()
    if case == "value_noncontiguous":
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "loc_noncontiguous":
        loc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "attn_noncontiguous":
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "value_rank":
        v = v[0]
    elif case == "attn_shape":
        a = a[..., :1].contiguous()
    elif case == "loc_dtype":
        loc = loc.double()
    elif case == "shapes_dtype":
        ss = ss.int()
    elif case == "S_mismatch":
        v = v[:, :-1].contiguous()
    elif case == "start_wrong":
        lsi = lsi + torch.tensor([0, 1])
    elif case == "negative_shape":
        ss = torch.tensor([[-3, -4], [2, 2]])
    elif case == "mixed_devices":
        loc = loc.to("meta")
    elif case == "half_on_cpu":
        v, loc, a = v.half(), loc.half(), a.half()
    with pytest.raises(RuntimeError, match=pattern):
        _C.ms_deform_attn_forward(v, ss, lsi, loc, a)
    g = torch.zeros(v.shape[0], loc.shape[1], v.shape[-2] * v.shape[-1], dtype=v.dtype) \
        if v.dim() == 4 else torch.zeros(1)
    with pytest.raises(RuntimeError, match=pattern):
        _C.ms_deform_attn_backward(v, ss, lsi, loc, a, g)


def test_bad_grad_output_to_raw_backward_raises():
    from common import _C
    v, ss, lsi, loc, a = _good()
    with pytest.raises(RuntimeError, match="grad_output must be"):
        _C.ms_deform_attn_backward(v, ss, lsi, loc, a, torch.zeros(2, 3, 7))
    with pytest.raises(RuntimeError, match="grad_output must have value's dtype"):
        _C.ms_deform_attn_backward(v, ss, lsi, loc, a, torch.zeros(2, 3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_output must be contiguous"):
        _C.ms_deform_attn_backward(v, ss, lsi, loc, a, torch.zeros(2, 8, 3).transpose(1, 2))


# ------------------------------------------------------------------------------------------
# CUDA (run by the lead on a GPU machine; skipped here)
# ------------------------------------------------------------------------------------------

def _off_cell_lines(loc, shapes, margin=1e-3):
    """Move sampling points that lie within ``margin`` pixels of a cell-centre line of their
    level (where the bilinear weights, hence grad_loc, jump) off that line: there an fp32
    kernel and a float64 reference may round onto different sides. Needed only when a test
    draws so many points that some land that close by chance."""
    loc = loc.clone()
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            x = loc[..., lvl, :, axis]
            px = x * size - 0.5
            near = (px - px.round()).abs() < margin
            x[near] += 4 * margin / size
    return loc


def _cuda_case(B, shapes, Q, H, Dh, P, dtype, off_lines=False):
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q, H, Dh, P, dtype=torch.float64)
    if off_lines:
        loc = _off_cell_lines(loc, shapes)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    # round the inputs to dtype first, so the float64 reference sees exactly what the kernel sees
    value, loc, attn, grad_out = (t.to(dtype).double() for t in (value, loc, attn, grad_out))
    ref = reference(value, ss, loc, attn, grad_out)
    got = run_op(value.to("cuda", dtype), ss.cuda(), lsi.cuda(), loc.to("cuda", dtype),
                 attn.to("cuda", dtype), grad_out.to("cuda", dtype))
    for t in got:
        assert t.device.type == "cuda" and t.dtype == dtype
    return got, ref


@pytest.mark.cuda
@pytest.mark.parametrize("B,shapes", LEVEL_CASES)
@pytest.mark.parametrize("Dh", CHANNELS + [257])  # 257: several passes over the channels
def test_cuda_float32_matches_float64_reference(B, shapes, Dh):
    got, ref = _cuda_case(B, shapes, Q=7, H=3, Dh=Dh, P=2, dtype=torch.float32)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda float32 {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize("Dh", [7, 32, 71])
def test_cuda_half_types_accumulate_in_float32(dtype, ulp, Dh):
    """With inputs already rounded to the half type, fp32 arithmetic leaves only the final
    rounding of each result: within one unit in the last place (ulp = 2^-10 for fp16, 2^-7 for
    bf16) of the float64 reference. Accumulating 4 corners x 8 points x L levels in the half
    type itself, or grad_value's atomics over many queries, would miss this bound."""
    got, ref = _cuda_case(2, [(8, 6), (4, 3), (2, 2)], Q=40, H=2, Dh=Dh, P=8, dtype=dtype)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        g = g.double().cpu()
        bound = ulp * r.abs() + 1e-6 * r.abs().max()
        excess = ((g - r).abs() - bound).max()
        assert excess <= 0, f"{dtype} {name}: error exceeds one ulp by {float(excess)}"


@pytest.mark.cuda
def test_cuda_border_and_outside_points():
    shapes = [(4, 8), (2, 2)]
    xs = [0.0, 1.0, 1 / 16, 1 / 8, -1 / 16, 17 / 16, -0.6, 1.7, 0.5]
    pts = torch.tensor(list(itertools.product(xs, xs)), dtype=torch.float64)  # (81, 2)
    B, H, P, Dh = 2, 2, 1, 32
    Q = pts.shape[0]
    loc = pts[None, :, None, None, None, :].expand(B, Q, H, 2, P, 2).contiguous()
    ss, lsi = level_table(shapes)
    value = torch.randn(B, 36, H, Dh, dtype=torch.float64)
    attn = torch.rand(B, Q, H, 2, P, dtype=torch.float64)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    ref = reference(value, ss, loc, attn, grad_out)
    got = run_op(value.float().cuda(), ss.cuda(), lsi.cuda(), loc.float().cuda(),
                 attn.float().cuda(), grad_out.float().cuda())
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("Q,Dh", [(6, 5), (6, 32), (6, 256), (24000, 32)])
def test_cuda_nan_and_inf_locations_follow_grid_sample(Q, Dh):
    """As on the CPU: NaN output for a query-head with a NaN or infinite location, and
    grid_sample's (CPU) gradients; across the lane mappings (scalar, vector, the backward's
    channel loop) and the shared-memory backward (Q = 24000). A NaN attention weight at a point
    outside the map and a NaN upstream gradient there give NaN too."""
    B, shapes, H, P = 2, [(13, 19), (9, 7), (30, 40), (2, 3)], 4, 2
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q, H, Dh, P)
    loc = _off_cell_lines(loc, shapes)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    for i, (x, y) in enumerate(NON_FINITE):
        loc[i % B, i, i % H, i % 4, i % P] = torch.tensor([x, y], dtype=torch.float64)
    loc[1, 3, 2, 3, 1] = torch.tensor([-3.0, 0.5])
    attn[1, 3, 2, 3, 1] = float("nan")
    loc[0, 5, 1, 1, 0] = torch.tensor([1.5, 0.5])
    grad_out[0, 5, Dh + 1] = float("nan")
    value, loc, attn, grad_out = (t.float().double() for t in (value, loc, attn, grad_out))
    ref = reference(value, ss, loc, attn, grad_out)
    got = run_op(value.float().cuda(), ss.cuda(), lsi.cuda(), loc.float().cuda(),
                 attn.float().cuda(), grad_out.float().cuda())
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        scale = float(r[r.isfinite()].abs().max())
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-5, atol=2e-5 * max(1.0, scale),
                                   equal_nan=True, msg=lambda m: f"cuda {name}: {m}")


@pytest.mark.cuda
def test_cuda_grid_stride_loops():
    """More (b, q, head) groups than the capped grid has threads, so every thread loops: the
    pointer arithmetic must stay local to each iteration (mmcv #1823's bug)."""
    got, ref = _cuda_case(2, [(4, 4)], Q=20000, H=1, Dh=32, P=1, dtype=torch.float32)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda {name}")


@pytest.mark.cuda
def test_cuda_bad_input_raises():
    from common import _C
    v, ss, lsi, loc, a = (t.cuda() for t in _good())
    with pytest.raises(ValueError, match="one device"):
        ops.ms_deform_attn(v, ss, lsi, loc.cpu(), a)
    with pytest.raises(RuntimeError, match="spatial_shapes is on cpu"):
        _C.ms_deform_attn_forward(v, ss.cpu(), lsi, loc, a)
    with pytest.raises(RuntimeError, match="value must be contiguous"):
        _C.ms_deform_attn_forward(v.transpose(1, 2).contiguous().transpose(1, 2), ss, lsi, loc, a)
    with pytest.raises(RuntimeError, match="attn_weight must have value's dtype"):
        _C.ms_deform_attn_forward(v, ss, lsi, loc, a.half())


# The CUDA kernels pick a lane mapping per shape: 16-byte vector chunks when Dh is a multiple of
# 16 bytes / element size and the tensors are 16-byte aligned (G = 1..8 lanes per (b, q, head),
# 1, 2 or 4 chunks per lane, several passes or a loop beyond), scalar lanes otherwise, and 64-bit
# indexing for tensors of 2^30 elements or more. These cases reach each mapping's edges: lanes
# whose chunk lies past Dh (fp32 Dh = 12, 24, 40; fp16 Dh = 24, 72), several chunks per lane
# (128), passes and the backward's chunk loop (256).
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,Dh", [(torch.float32, d) for d in (4, 8, 12, 24, 40, 128, 256)]
                         + [(torch.float64, d) for d in (2, 6, 32)])
def test_cuda_vector_chunk_mappings(dtype, Dh):
    got, ref = _cuda_case(2, [(6, 5), (3, 3), (1, 2)], Q=9, H=3, Dh=Dh, P=3, dtype=dtype)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda {dtype} Dh={Dh} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize("Dh", [8, 16, 24, 72])
def test_cuda_half_vector_chunk_mappings(dtype, ulp, Dh):
    got, ref = _cuda_case(2, [(8, 6), (4, 3), (2, 2)], Q=40, H=2, Dh=Dh, P=4, dtype=dtype)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        g = g.double().cpu()
        bound = ulp * r.abs() + 1e-6 * r.abs().max()
        excess = ((g - r).abs() - bound).max()
        assert excess <= 0, f"{dtype} Dh={Dh} {name}: error exceeds one ulp by {float(excess)}"


@pytest.mark.cuda
def test_cuda_unaligned_tensors_take_the_scalar_path():
    """value and grad_output 4 bytes past a 16-byte boundary (a contiguous view with a storage
    offset): 16-byte loads would fault or misread, so the kernels must fall back to scalar
    lanes and still match the reference."""
    B, shapes, Q, H, Dh, P = 2, [(5, 4), (2, 3)], 11, 2, 32, 2
    value, ss, lsi, loc, attn = make_inputs(B, shapes, Q, H, Dh, P, dtype=torch.float64)
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64)
    value, loc, attn, grad_out = (t.float().double() for t in (value, loc, attn, grad_out))
    ref = reference(value, ss, loc, attn, grad_out)

    def offset_by_one(t):
        buf = torch.empty(t.numel() + 1, dtype=torch.float32, device="cuda")
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 == 4
        return view

    from common import _C  # directly: the public op's autograd would copy into aligned memory
    args = (offset_by_one(value), ss.cuda(), lsi.cuda(), loc.float().cuda(), attn.float().cuda())
    got = [_C.ms_deform_attn_forward(*args),
           *_C.ms_deform_attn_backward(*args, offset_by_one(grad_out))]
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda unaligned {name}")


@pytest.mark.cuda
def test_cuda_bad_device_level_table_skips_the_level():
    """A level table on the GPU is not checked on the host (that would synchronise). A level
    whose rows fall outside value's S rows (too large, or a negative start) must be skipped,
    never read or written out of bounds: the result equals the reference without that level."""
    B, Q, H, Dh, P = 2, 10, 2, 32, 2
    good = [(4, 5), (2, 3)]
    value, ss, lsi, loc, attn = make_inputs(B, good, Q, H, Dh, P, dtype=torch.float64)
    value, loc, attn = (t.float().double() for t in (value, loc, attn))
    grad_out = torch.randn(B, Q, H * Dh, dtype=torch.float64).float().double()
    rows = good[0][0] * good[0][1]  # level 0 alone
    ref = reference(value[:, :rows], ss[:1], loc[:, :, :, :1].contiguous(),
                    attn[:, :, :, :1].contiguous(), grad_out)
    for bad_shape, bad_start in [((1000, 1000), 20), ((2, 3), -4), ((2, 3), 22),
                                 ((2 ** 40, 2 ** 40), 20), ((-2, 3), 20)]:
        ss_bad = torch.tensor([list(good[0]), list(bad_shape)], dtype=torch.int64)
        lsi_bad = torch.tensor([0, bad_start], dtype=torch.int64)
        out, g_value, g_loc, g_attn = run_op(
            value.float().cuda(), ss_bad.cuda(), lsi_bad.cuda(), loc.float().cuda(),
            attn.float().cuda(), grad_out.float().cuda())
        torch.cuda.synchronize()
        what = f"bad level {bad_shape} at {bad_start}"
        assert_close(out, ref[0], rtol=1e-5, atol=2e-5, what=f"{what}: output")
        assert_close(g_value[:, :rows], ref[1], rtol=1e-5, atol=2e-5, what=f"{what}: grad_value")
        assert not g_value[:, rows:].any(), what
        assert_close(g_loc[:, :, :, :1], ref[2], rtol=1e-5, atol=2e-5, what=f"{what}: grad_loc")
        assert_close(g_attn[:, :, :, :1], ref[3], rtol=1e-5, atol=2e-5, what=f"{what}: grad_attn")
        assert not g_loc[:, :, :, 1:].any() and not g_attn[:, :, :, 1:].any(), what


@pytest.mark.cuda
def test_cuda_64bit_indexing():
    """value with 2^30 elements takes the 64-bit-index kernels (generic scalar lanes, several
    passes over Dh = 256 in the forward, a loop over the channels in the backward). Reference:
    grid_sample in float32 on the GPU (the inputs are bf16, so float32 is exact enough to judge
    bf16 results to within their rounding; float64 on the CPU would need 8 GB per copy of value).
    bf16, not fp16: on a 1024 x 1024 level the location gradients carry a factor W = H = 1024
    and exceed fp16's range (65504), so fp16 would legitimately give inf there."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with 40 GiB")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Q, H, P, Dh, dtype = 1, 512, 4, 4, 256, torch.bfloat16
    ss, lsi = level_table([(1024, 1024)], device="cuda")
    value = torch.randn(B, 2 ** 20, H, Dh, device="cuda", dtype=dtype, generator=g)
    assert value.numel() == 2 ** 30
    loc = (torch.rand(B, Q, H, 1, P, 2, device="cuda", generator=g) * 1.2 - 0.1).to(dtype)
    attn = torch.rand(B, Q, H, 1, P, device="cuda", generator=g).to(dtype)
    grad_out = torch.randn(B, Q, H * Dh, device="cuda", dtype=dtype, generator=g)
    got = run_op(value, ss, lsi, loc, attn, grad_out)
    v, l, a = (t.float().requires_grad_() for t in (value, loc, attn))
    out = ops.ms_deform_attn_fallback(v, ss, l, a)
    out.backward(grad_out.float())
    ref = (out.detach(), v.grad, l.grad, a.grad)
    del v, l, a, out
    for name, x, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        # rounding to bf16 (8 significant bits) errs by at most 2^-8 of the value
        excess = ((x.float() - r).abs() - (2.0 ** -8 * r.abs() + 1e-5 * r.abs().max())).max()
        assert excess <= 0, f"64-bit {name}: error exceeds bf16 rounding by {float(excess)}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,ulp", [(torch.float32, None), (torch.float16, 2.0 ** -10),
                                       (torch.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize("Dh", [4, 12, 32])
def test_cuda_backward_shared_memory_levels(dtype, ulp, Dh):
    """Many queries with Dh <= 32 take the backward that sums small levels in shared memory,
    per block of 128 queries (256 for Dh = 4) of one (b, head), before adding them to
    grad_value. It runs when there are at least 4 such tiles per multiprocessor: here
    B * H * ceil(Q / 256) = 752, enough for GPUs of up to 188 SMs. Levels are kept from the last
    one down while their cells x Dh floats fit the 40 KiB accumulator: with Dh = 32 and 12,
    (2, 3), (9, 7) and (13, 19) are kept and (30, 40) is not (mixed levels); with Dh = 4 all
    are. Dh = 12 leaves lanes of a group without channels. Results must match the float64
    reference as for the per-query kernel; with the half types, grad_value's float sums of
    hundreds of terms per cell add an absolute error of about 1e-5 of the largest value."""
    shapes = [(13, 19), (9, 7), (30, 40), (2, 3)]
    got, ref = _cuda_case(2, shapes, Q=24000, H=4, Dh=Dh, P=2, dtype=dtype, off_lines=True)
    for name, g, r in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, ref):
        if ulp is None:
            assert_close(g, r, rtol=1e-5, atol=2e-5, what=f"cuda shared-memory {name}")
            continue
        g = g.double().cpu()
        bound = ulp * r.abs() + 1e-5 * r.abs().max()
        excess = ((g - r).abs() - bound).max()
        assert excess <= 0, f"{dtype} Dh={Dh} {name}: error exceeds one ulp by {float(excess)}"
