"""DINO's multi-crop augmentation as batched tensor ops, for the training device (CPU or CUDA).

train.py draws every view's random choices on the CPU (train.draw_view, the same draws as its PIL path)
and collates them into a Plan; `views` applies a plan to a batch of decoded 8-bit images in one pass per
crop size: crop + resize with PIL's bicubic weights (flip folded in), colour jitter in each view's own
order, greyscale, Gaussian blur with each view's sigma, solarisation, CLIP mean/std. Pixels are floats
in [0, 1] throughout, as in torchvision's tensor functions, which each op here equals
(tests/test_augment.py); unlike the PIL path nothing is rounded to 8 bits between ops. Which views an op
touches is known on the host from the plan, so applying a plan never waits for the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from rsmclip import CLIP_MEAN, CLIP_STD

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
JITTER = ("brightness", "contrast", "saturation", "hue")
CPU_CHUNK = 2 ** 18  # pixels of views augmented together on a CPU: ~3 MiB of floats, about a core's L2


@dataclass
class Plan:
    """K views of one size, from images 0..B-1 of a batch (CPU tensors)."""
    boxes: torch.Tensor  # [K, 5] float: image index, left, top, right, bottom (pixels)
    flip: torch.Tensor  # [K] bool
    order: torch.Tensor  # [K, 4] int8: the jitter op (index into JITTER) at each position; -1: no jitter
    factors: torch.Tensor  # [K, 4] float: the factor of each op of JITTER
    grey: torch.Tensor  # [K] bool
    sigma: torch.Tensor  # [K] float: blur sigma in pixels, 0: none
    solarize: torch.Tensor  # [K] bool


# ----------------------------------------------------------------------------- the ops, on [N, 3, H, W]

def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5), zero beyond 2."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, end: torch.Tensor, size: int, length: int,
                     gain: float = 1.0) -> torch.Tensor:
    """[K] integer box edges on one axis -> [K, size, length]: PIL's antialiased bicubic weights of resizing
    pixels start..end-1 to `size` (ImagingResample: output pixel i centred at start + (i + 0.5) * scale, the
    filter stretched by max(scale, 1) when shrinking, cut at the box's edges as PIL's crop does, each row
    normalised to `gain`). Zero outside the box, so edge padding of the batch is never read."""
    scale = ((end - start) / size).view(-1, 1, 1)
    stretch = scale.clamp(min=1)
    taps = 2 * math.ceil(2 * float(stretch.max())) + 1
    centre = start.view(-1, 1, 1) + (torch.arange(size, dtype=scale.dtype).view(1, -1, 1) + 0.5) * scale
    pixel = (centre - 2 * stretch).floor() + torch.arange(taps, dtype=scale.dtype)  # [K, size, taps]
    w = bicubic((pixel + 0.5 - centre) / stretch)
    w = w * ((pixel >= start.view(-1, 1, 1)) & (pixel < end.view(-1, 1, 1)))
    w = w * (gain / w.sum(-1, keepdim=True))
    # the taps only, scattered into the row: offset by `taps` so that every index is distinct and in range
    out = w.new_zeros(len(w), size, length + 2 * taps)
    out.scatter_(2, pixel.long() + taps, w)
    return out[:, :, taps:taps + length]


def planes(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, W, 3] 8-bit pixels -> [B, H, 3, W] in `dtype`, 0-255: rows of channel planes, so that a box's
    pixels are one 2-D matrix [box height * 3, box width] for crop. float32: bfloat16 (exact for 8-bit
    levels) multiplies 1.8x faster with AMX on a repeated batch, but oneDNN compiles a kernel for every new
    matrix shape, and every box has its own: on fresh batches it was slower than float32."""
    return pixels.transpose(2, 3).to(dtype, memory_format=torch.contiguous_format)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int,
         flip: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, 3, W] images from `planes` -> [K, 3, size, size] floats in [0, 1]: each box resized to size x
    size as PIL's crop + bicubic resize, two matrix products per view (columns, then rows); a flip reverses
    the column weights. What is left against PIL is mostly PIL's own rounding to 8 bits after each pass
    (tests/test_augment.py)."""
    wx = resample_weights(boxes[:, 1], boxes[:, 3], size, images.shape[3], 1 / 255)
    wy = resample_weights(boxes[:, 2], boxes[:, 4], size, images.shape[1])
    if flip is not None:
        wx[flip] = wx[flip].flip(1)
    wx, wy = wx.to(images.device, images.dtype), wy.to(images.device, images.dtype)
    if images.device.type == "cpu":
        return crop_each(images, boxes, wx, wy)
    return crop_batched(images, boxes[:, 0].long().to(images.device), wx, wy)


def crop_each(images: torch.Tensor, boxes: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """On a CPU, view by view over its box only: a fraction of the arithmetic of crop_batched (a local box
    is a few % of the image), and cheap per-view calls."""
    size = wx.shape[1]
    out = torch.empty(len(boxes), 3, size, size)
    for k, (i, x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        columns = images[i, y0:y1, :, x0:x1].reshape(-1, x1 - x0) @ wx[k, :, x0:x1].T  # [h * 3, size]
        out[k] = (wy[k, :, y0:y1] @ columns.view(y1 - y0, -1)).view(size, 3, size).transpose(0, 1)
    return out


def crop_batched(images: torch.Tensor, index: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor,
                 chunk: int = 256) -> torch.Tensor:
    """On a GPU, all views in two batched products over whole rows and columns (the weights are zero
    outside each box): more arithmetic than crop_each, but a handful of kernels per batch instead of three
    per view, which is what costs there. `chunk` views at a time bound the gathered copies of the images."""
    size = wx.shape[1]
    parts = []
    for start in range(0, len(index), chunk):
        views = slice(start, start + chunk)
        columns = images[index[views]] @ wx[views, None].transpose(2, 3)  # [k, H, 3, size]
        rows = wy[views] @ columns.flatten(2)  # [k, size, 3 * size]
        parts.append(rows.view(-1, size, 3, size).transpose(1, 2))
    return torch.cat(parts)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma, repeated on the three channels."""
    return luma(x).expand_as(x)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Towards the mean luma of each image."""
    return blend(x, luma(x).mean((1, 2, 3), keepdim=True), f)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, luma(x), f)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by f turns, keeping HSV's value and saturation (each channel from the shifted hue
    with the closed form c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1)."""
    r, g, b = x.unbind(1)
    v, lo = x.amax(1), x.amin(1)
    chroma = v - lo  # = v * s
    d = torch.where(chroma > 0, chroma, 1)
    h6 = torch.where(v == r, (g - b).div_(d),
                     torch.where(v == g, (b - r).div_(d).add_(2), (r - g).div_(d).add_(4)))  # in [-1, 5)
    # the mod on the per-view shift only: the pixels' k is in [5, 17), one subtraction brings it into
    # [-1, 6), and clamp(min(k, 4 - k), 0, 1) is 0 on [-1, 0) as on [5, 6)
    shift = (x.new_tensor([5.0, 3.0, 1.0]) + 6 * f.view(-1, 1)) % 6 + 6
    k = h6.unsqueeze(1) + shift.view(-1, 3, 1, 1)
    k = k.sub_(torch.where(k >= 12, 12.0, 6.0))
    return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(chroma.unsqueeze(1)).neg_().add_(v.unsqueeze(1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable (2 radius + 1)-tap kernel, reflected borders,
    one grouped convolution per axis for the whole batch."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n * c, taps]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


def blur_radius(sigma: float) -> int:
    """Taps each side: 3 sigma, where the Gaussian's tail is below 1.2% of its peak."""
    return max(1, math.ceil(3 * sigma))


def solarize(x: torch.Tensor) -> torch.Tensor:
    """PIL's solarize(128): levels of 128/255 and above are inverted."""
    return torch.where(x >= 128 / 255, 1 - x, x)


# ----------------------------------------------------------------------------- a plan on a batch

OPS = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}


def views(pixels: torch.Tensor, plan: Plan, size: int) -> torch.Tensor:
    """pixels: [B, H, W, 3] uint8 on the device (images padded to one size by repeating their edges) ->
    [K, 3, size, size] normalised views. On the CPU a few views at a time (CPU_CHUNK pixels), which stay in
    the core's cache through all the ops; on a GPU all at once."""
    images = planes(pixels)
    out = torch.empty(len(plan.boxes), 3, size, size, device=pixels.device)
    step = len(out) if pixels.device.type != "cpu" else max(1, CPU_CHUNK // size ** 2)
    for start in range(0, len(out), step):
        part = Plan(*(getattr(plan, f.name)[start:start + step] for f in fields(Plan)))
        out[start:start + step] = apply(images, part, size)
    return out


def apply(images: torch.Tensor, plan: Plan, size: int) -> torch.Tensor:
    """The views of a plan from `planes` images. Ops touch only the views that drew them (indices from the
    CPU)."""
    dev = images.device
    x = crop(images, plan.boxes, size, plan.flip)

    def where(mask: torch.Tensor) -> torch.Tensor | None:
        index = mask.nonzero().flatten()  # a CPU tensor: no device sync
        return index.to(dev, non_blocking=True) if len(index) else None

    factors = plan.factors.to(dev, non_blocking=True)
    for position in range(len(JITTER)):
        for op, name in enumerate(JITTER):
            if (i := where(plan.order[:, position] == op)) is not None:
                x[i] = OPS[name](x[i], factors[i, op])
    if (i := where(plan.grey)) is not None:
        x[i] = grey(x[i])
    if (i := where(plan.sigma > 0)) is not None:
        sigma = plan.sigma[plan.sigma > 0]
        x[i] = gaussian_blur(x[i], sigma.to(dev, non_blocking=True), blur_radius(float(sigma.max())))
    if (i := where(plan.solarize)) is not None:
        x[i] = solarize(x[i])
    return x.sub_(x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)).div_(x.new_tensor(CLIP_STD).view(1, 3, 1, 1))
