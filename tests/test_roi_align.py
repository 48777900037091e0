"""common.ops.roi_align_separable (RoIAlign as two matrix products, used by G-DetKD) against
torchvision.ops.roi_align(aligned=True) in float64: values and the gradient to the features."""
import pytest
import torch
from torchvision.ops import roi_align

from common import ops


@pytest.mark.parametrize("shape,stride,ratio", [((16, 16), 8, 2), ((13, 9), 8, 2),
                                                ((4, 4), 32, 2), ((6, 11), 16, 3)])
def test_roi_align_separable_equals_torchvision(shape, stride, ratio):
    """The separable RoIAlign is torchvision's roi_align(aligned=True), value and gradient, in
    float64: boxes inside, across and beyond the map's borders, zero-size boxes, an image
    without RoIs, RoIs in no particular image order."""
    g = torch.Generator().manual_seed(sum(shape) + stride)
    B, C, (H, W) = 3, 5, shape
    f = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    R = 60
    xy = torch.rand(R, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * stride
    wh = torch.rand(R, 2, generator=g, dtype=torch.float64) * 0.7 * torch.tensor([W, H]) * stride
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:8] = boxes[:8] * 1.5 - 2.0 * stride           # partly or wholly off the map
    boxes[8:11, 2] = boxes[8:11, 0]                       # zero width
    boxes[11:13, 3] = boxes[11:13, 1]                     # zero height
    image = torch.tensor([0, 2] * (R // 2), dtype=torch.float64)[torch.randperm(R, generator=g)]
    rois = torch.cat([image[:, None], boxes], 1)
    ref = roi_align(f, rois, 7, 1.0 / stride, ratio, aligned=True)
    got = ops.roi_align_separable(f, rois, 7, 1.0 / stride, ratio)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    g_ref, = torch.autograd.grad(ref, f, grad)
    g_got, = torch.autograd.grad(got, f, grad)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-11, atol=1e-11)
    assert g_got[1].abs().max() == 0  # image 1 has no RoI
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.roi_align_separable(f, rois, 7, 1.0 / stride, -1)
    with pytest.raises(ValueError, match="batch indices"):
        ops.roi_align_separable(f, rois[:2] + torch.tensor([5.0, 0, 0, 0, 0],
                                                          dtype=torch.float64), 7, 1.0, 2)
