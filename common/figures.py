"""Figures for ``--visualize``: one look shared by every method script.

Each method's ``visualize`` decides *what* to show (QSKD's groups and masks, CLoCKDistill's cell
weights, DETRDistill's matched pairs, G-DetKD's RoIs); this module draws it, always the same way:

    to_pil(image, size)          an ImageNet-normalised (3,H,W) tensor back to an RGB picture of
                                 its unpadded (h,w) part, enlarged by a whole factor (``zoom``)
    draw_boxes(img, boxes, ...)  normalised cxcywh boxes as rectangles, with optional labels
    heat_overlay(base, x, ...)   a per-cell map over the padded image, cropped to the image and
                                 laid over it in 'hot' colours (black, red, yellow, white)
    panel(img, title)            a picture under a title bar
    legend(entries, width)       swatches with their meaning; colorbar(width, low, high)
    sheet(rows, footer)          panels in rows (left to right) with a footer strip
    save(fig, out_dir, method, image_id)   writes ``<method>_<image_id>.png`` (one per image)

Text is Pillow's built-in scalable font at ``FONT_PX`` pixels.
"""
import argparse
import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from common.box_ops import cxcywh_to_xyxy
from common.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["add_args", "denormalize", "to_pil", "zoom_for", "draw_boxes", "log_scale", "heat_colours",
           "heat_overlay", "heat_image", "panel", "legend", "colorbar", "row_width", "sheet", "save",
           "PALETTE"]

FONT_PX = 13          # text height in pixels
PAD = 4               # gap between panels
PANEL_SIDE = 384      # images are enlarged by a whole factor until their longer side reaches this
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
# ten colours that stay apart on photos (one per GT, per group or per level)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def add_args(group, what):
    """--visualize DIR and --visualize-images N, the same for every method script."""
    group.add_argument("--visualize", default=None, metavar="DIR",
                       help=f"write one PNG per validation image of {what} here "
                            "(after training, or with --eval)")
    group.add_argument("--visualize-images", dest="visualize_images", type=_positive_int, default=4,
                       metavar="N", help="how many validation images --visualize draws")
    return group


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@lru_cache(maxsize=None)
def font(px=FONT_PX):
    return ImageFont.load_default(size=px)


# ------------------------------------------------------------------------------------------
# The picture and what is drawn on it
# ------------------------------------------------------------------------------------------

def denormalize(image):
    """(3,H,W) ImageNet-normalised float -> (3,H,W) uint8 RGB: x * std + mean, clipped to [0,1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    return ((image.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def zoom_for(size, side=PANEL_SIDE):
    """The whole enlargement factor that brings an (h,w) image's longer side closest to ``side``."""
    return max(1, round(side / max(int(s) for s in size)))


def to_pil(image, size, zoom=1):
    """The unpadded (h,w) part of a normalised (3,H,W) image as an RGB picture, each pixel drawn
    as a zoom x zoom square (no smoothing: the pixels the model saw)."""
    h, w = (int(s) for s in size)
    rgb = denormalize(image[:, :h, :w])
    return Image.fromarray(rgb.permute(1, 2, 0).numpy()).resize((w * zoom, h * zoom), Image.NEAREST)


def draw_boxes(img, boxes, colour, width=2, labels=None):
    """Normalised (N,4) cxcywh boxes drawn on the picture ``img`` (in place), each with its
    optional label above its top-left corner."""
    draw, (w, h) = ImageDraw.Draw(img), img.size
    xyxy = (cxcywh_to_xyxy(boxes.detach().float().cpu().reshape(-1, 4)) * torch.tensor([w, h, w, h]))
    for k, (x0, y0, x1, y1) in enumerate(xyxy.tolist()):
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=width)
        if labels is not None:
            _label(draw, (x0, y0), labels[k], colour)


def _label(draw, xy, text, colour):
    """Text on a black box just above xy (inside the picture)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font())
    x, y = max(0, xy[0]), max(0, xy[1] - (y1 - y0) - 3)
    draw.rectangle([x, y, x + x1 - x0 + 3, y + y1 - y0 + 3], fill=BLACK)
    draw.text((x + 2 - x0, y + 1 - y0), text, fill=colour, font=font())


# ------------------------------------------------------------------------------------------
# Maps: heat colours, overlays, the colour bar
# ------------------------------------------------------------------------------------------

def log_scale(x):
    """Positive values onto [0.1, 1] by log10 between the smallest positive value and the largest;
    zero and below onto 0 (for maps spanning several orders of magnitude)."""
    pos = x[x > 0]
    if pos.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = pos.min().log10(), pos.max().log10()
    return torch.where(x > 0, (x.clamp(min=1e-30).log10() - lo) / (hi - lo).clamp(min=1e-6) * 0.9
                       + 0.1, torch.zeros_like(x))


def heat_colours(x):
    """(H,W) in [0,1] -> (H,W,3) uint8 'hot' colours: black, red, yellow, white."""
    x = x.float().clamp(0, 1)
    rgb = torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], -1)
    return (rgb * 255).round().to(torch.uint8).cpu()


def heat_image(x, padded, size, zoom=1):
    """A (H_k,W_k) map in [0,1] over a padded (H,W) image -> the picture of its unpadded (h,w)
    part: each cell a block of the image pixels it covers (nearest), then ``zoom``."""
    h, w = (int(s) for s in size)
    m = F.interpolate(x[None, None].detach().float().cpu(), size=tuple(int(s) for s in padded),
                      mode="nearest")[0, 0, :h, :w]                                    # (h,w)
    return Image.fromarray(heat_colours(m).numpy()).resize((w * zoom, h * zoom), Image.NEAREST)


def heat_overlay(base, x, padded, size, alpha=0.6):
    """``heat_image`` laid over the picture ``base`` (alpha = weight of the heat colours)."""
    zoom = base.width // int(size[1])
    return Image.blend(base, heat_image(x, padded, size, zoom), alpha)


def colorbar(width, low, high):
    """A black strip ``width`` wide: ``low`` (text), a 'hot' colour ramp, ``high`` (text)."""
    line = FONT_PX + 6
    strip = Image.new("RGB", (width, line + 2 * PAD), BLACK)
    d = ImageDraw.Draw(strip)
    d.text((PAD, PAD), low, fill=WHITE, font=font())
    x = PAD + int(d.textlength(low, font=font())) + 8
    ramp_w = max(16, min(240, width - x - int(d.textlength(high, font=font())) - 8 - PAD))
    ramp = heat_colours(torch.linspace(0, 1, ramp_w)[None].expand(FONT_PX, ramp_w))
    strip.paste(Image.fromarray(ramp.numpy()), (x, PAD + 2))
    d.text((x + ramp_w + 8, PAD), high, fill=WHITE, font=font())
    return strip


# ------------------------------------------------------------------------------------------
# Layout: titled panels, legend, sheet, file name
# ------------------------------------------------------------------------------------------

def panel(img, title):
    """The picture under a black title bar (white text)."""
    bar = FONT_PX + 8
    out = Image.new("RGB", (img.width, img.height + bar), BLACK)
    out.paste(img, (0, bar))
    ImageDraw.Draw(out).text((4, 3), title, fill=WHITE, font=font())
    return out


def legend(entries, width):
    """A black strip ``width`` wide: a colour swatch and its meaning for each (colour, text), wrapped
    onto more lines when needed. ``colour`` None writes the text alone."""
    line, gap = FONT_PX + 6, 14
    placed, x, y = [], PAD, PAD
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for colour, text in entries:
        w = probe.textlength(text, font=font()) + (FONT_PX + 4 if colour is not None else 0)
        if x > PAD and x + w > width - PAD:
            x, y = PAD, y + line
        placed.append((x, y, colour, text))
        x += w + gap
    strip = Image.new("RGB", (width, y + line + PAD), BLACK)
    d = ImageDraw.Draw(strip)
    for x, y, colour, text in placed:
        if colour is not None:
            d.rectangle([x, y + 2, x + FONT_PX - 2, y + FONT_PX], fill=colour)
            x += FONT_PX + 4
        d.text((x, y), text, fill=WHITE, font=font())
    return strip


def row_width(row):
    """Width of panels side by side, PAD apart."""
    return sum(p.width for p in row) + PAD * (len(row) - 1)


def sheet(rows, footer=()):
    """Panels in rows (each row left to right, PAD apart, on white) above the footer strips. A
    None in a row leaves the place of the first row's panel in that column empty."""
    rows = [[p if p is not None else Image.new("RGB", rows[0][k].size, WHITE) for k, p in enumerate(row)]
            for row in rows]
    widths = [row_width(row) for row in rows]
    width = max(widths + [f.width for f in footer])
    height = (sum(max(p.height for p in row) for row in rows) + sum(f.height for f in footer)
              + PAD * (len(rows) + len(footer) - 1))
    out = Image.new("RGB", (width, height), WHITE)
    y = 0
    for row in rows:
        x = 0
        for p in row:
            out.paste(p, (x, y))
            x += p.width + PAD
        y += max(p.height for p in row) + PAD
    for f in footer:
        out.paste(f, (0, y))
        y += f.height + PAD
    return out


def save(fig, out_dir, method, image_id):
    """Write ``<out_dir>/<method>_<image_id>.png`` and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{method}_{int(image_id)}.png")
    fig.save(path)
    return path
