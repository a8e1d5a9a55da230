"""DINO's multi-crop views: drawn once, made by PIL or by batched tensor ops on the training device.

The recipe comes first: `draw_sample` draws every view's random choices of one image on the CPU
(`draw_view`: crop, flip, colour jitter, greyscale, blur, solarisation, in DINO's order). Either path then
makes the same views: `apply_pil` in the loader processes, or the batched tensor ops below: the drawn
choices of a batch are collated into a Plan (`plan`), and `views` applies a plan to a batch of decoded
8-bit images: crop + resize to 8-bit pixels as PIL's crop + bicubic resize, flip, colour jitter in each
view's own order, greyscale, Gaussian blur with each view's sigma, solarisation, CLIP mean/std. After the
crop, pixels are floats in [0, 1], as in torchvision's tensor functions, which each op here equals
(tests/test_augment.py); unlike the PIL path they are not rounded to 8 bits between ops.

Every op applies to every view with per-view parameters (an op a view did not draw is the identity for
it), so a plan runs as one fixed sequence of tensor ops: no per-view branches, no host syncs. ColorJitter's
random order of four changes is written as three blend slots, the hue, three blend slots: a view's changes
before its hue go in the first three slots, the rest after, and unused slots blend by 1 (the identity).
The colour ops work on three [N, H, W] channel planes, so each pixel's hue is computed once for its three
channels.

On a CPU the colour ops run through torch.compile (one fused C++ loop per op group instead of one pass
over memory per tensor op) on chunks of views that fit a core's cache; crops use torch's 8-bit
antialiased resampling, a port of Pillow-SIMD's. On a GPU everything is eager and batched: crops are two
batched matrix products with PIL's bicubic weights.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from rsmclip import CLIP_MEAN, CLIP_STD

# -------------------------------------------------------- the recipe: what each view of an image draws


@dataclass(frozen=True)
class Recipe:
    """What training asks of its views (train.TrainConfig.recipe() fills it from the command line)."""
    multi_crop: bool = True  # DINO's 2 global crops (and local_crops); False: one light view, open_clip's
    clip_view: str = "global"  # the CLIP loss on the global crops, or on one more light view ("light")
    global_scale: tuple[float, float] = (0.4, 1.0)  # crop area ranges
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops: int = 8
    local_size: int = 24  # pixels
    flip: float = 0.5  # probabilities, and the hue jitter's range
    jitter_prob: float = 0.8
    hue: float = 0.1
    grayscale: float = 0.2
    solarize: float = 0.2  # of the second global crop
    blur: bool = True  # DINO's Gaussian blur (p 1.0 and 0.1 on the global crops, 0.5 on the local ones)


@dataclass(frozen=True)
class ViewParams:
    """One view's random choices. Drawn once (draw_view), applied by either path: PIL (apply_pil) or
    batched tensor ops on the training device (views), so both see the same distribution."""
    box: tuple[int, int, int, int]  # (left, top, width, height) in the source image
    flip: bool = False
    jitter: tuple[tuple[str, float], ...] = ()  # (brightness | contrast | saturation | hue, factor), in order
    grey: bool = False
    blur: float = 0.0  # Gaussian sigma (PIL's radius) in pixels; 0: no blur
    solarize: bool = False


BLUR = (0.1, 2.0)  # DINO's Gaussian blur sigma (PIL's radius) in pixels, for 224-px models: scaled with size


def draw_view(width: int, height: int, scale: tuple, blur: float, solarize: float, recipe: Recipe,
              rng: random.Random, model_size: int) -> ViewParams:
    """DINO's view: crop, flip, colour jitter, greyscale, Gaussian blur, solarisation, each drawn from `rng`
    in this order (the order fixes every sample's views for a seed: resume depends on it)."""
    box = crop_box(width, height, scale, rng)
    flip = rng.random() < recipe.flip
    jitter = ()
    if rng.random() < recipe.jitter_prob:
        ops = [("brightness", rng.uniform(0.6, 1.4)), ("contrast", rng.uniform(0.6, 1.4)),
               ("saturation", rng.uniform(0.8, 1.2)), ("hue", rng.uniform(-recipe.hue, recipe.hue))]
        rng.shuffle(ops)  # ColorJitter applies its four changes in random order
        jitter = tuple(ops)
    grey = rng.random() < recipe.grayscale
    sigma = rng.uniform(*BLUR) * model_size / 224 if rng.random() < blur else 0.0
    return ViewParams(box, flip, jitter, grey, sigma, rng.random() < solarize)


def draw_sample(width: int, height: int, recipe: Recipe, size: int,
                rng: random.Random) -> tuple[list[ViewParams], list[ViewParams]]:
    """-> (full-size views (view_layout), local crops) of one image: DINO's 2 global crops (the first always
    blurred, the second rarely, maybe solarised), or open_clip's light views, then the local crops."""
    n_views = view_layout(recipe)[0]
    views, blur = [], 1.0 if recipe.blur else 0.0  # scales the blur probabilities below
    if recipe.multi_crop:
        views = [draw_view(width, height, recipe.global_scale, blur, 0.0, recipe, rng, size),
                 draw_view(width, height, recipe.global_scale, blur / 10, recipe.solarize, recipe, rng, size)]
    views += [ViewParams(crop_box(width, height, (0.9, 1.0), rng)) for _ in range(n_views - len(views))]
    local = [draw_view(width, height, recipe.local_scale, 0.5 * blur, 0.0, recipe, rng, size)
             for _ in range(recipe.local_crops if recipe.multi_crop else 0)]
    return views, local


def view_layout(recipe: Recipe) -> tuple[int, int]:
    """-> (full-size views per image, CLIP views: the last ones of them, each with a caption).
    Multi-crop: the 2 global crops, which are also the CLIP views (SILC), or followed by one light CLIP
    view. Otherwise one light view, open_clip's recipe."""
    if not recipe.multi_crop:
        return 1, 1
    return (3, 1) if recipe.clip_view == "light" else (2, 2)


def blur_taps(model_size: int) -> int:
    """Blur taps each side for the largest sigma drawn for this model size: fixed, so the CPU's compiled
    augmentation keeps one shape."""
    return blur_radius(BLUR[1] * model_size / 224)


# ---------------------------------------------------- the PIL path: one view at a time, in the loaders

def crop_box(width: int, height: int, scale: tuple, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (area in `scale`, aspect 3/4-4/3, 10 tries, then the whole
    image cut to that aspect), drawn from `rng` so that every sample's crops are a function of its seed.
    -> (left, top, width, height)."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    w, h = width, height
    if width / height < 3 / 4:
        h = round(width / (3 / 4))
    elif width / height > 4 / 3:
        w = round(height * 4 / 3)
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.pil_to_tensor(image).float().div(255), CLIP_MEAN, CLIP_STD)


PIL_JITTER = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


def apply_pil(image: Image.Image, size: int, p: ViewParams) -> torch.Tensor:
    """A view as torchvision makes it from a PIL image: crop + bicubic resize (RandomResizedCrop), then the
    colour changes on 8-bit pixels, then CLIP mean/std."""
    left, top, w, h = p.box
    x = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if p.flip:
        x = ImageOps.mirror(x)
    for name, factor in p.jitter:
        x = PIL_JITTER[name](x, factor)
    if p.grey:
        x = x.convert("L").convert("RGB")
    if p.blur:
        x = x.filter(ImageFilter.GaussianBlur(radius=p.blur))
    if p.solarize:
        x = ImageOps.solarize(x, 128)
    return to_tensor(x)


def light_view(image: Image.Image, size: int, rng: random.Random) -> torch.Tensor:
    """open_clip's training transform (image_transform(is_train=True), default augmentation): a crop of
    90-100% of the area, bicubic, nothing else."""
    return apply_pil(image, size, ViewParams(crop_box(*image.size, (0.9, 1.0), rng)))


# ------------------------------------------------------------ the tensor path: a batch's views as one plan

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
JITTER = ("brightness", "contrast", "saturation", "hue")
SLOTS = 3  # blend slots on each side of the hue: ColorJitter's other three changes, before or after it
CPU_CHUNK = 2 ** 17  # pixels of views augmented together on a CPU: 1.5 MiB of floats, a core's L2


@dataclass
class Plan:
    """K views of one size, from images 0..B-1 of a batch (CPU tensors)."""
    boxes: torch.Tensor  # [K, 5] float: image index, left, top, right, bottom (pixels)
    flip: torch.Tensor  # [K] bool
    blend: torch.Tensor  # [K, 2 SLOTS] int8: the change (index into JITTER) of each slot, -1: none
    amount: torch.Tensor  # [K, 2 SLOTS] float: its factor (1 where none)
    hue: torch.Tensor  # [K] float: hue shift in turns, 0: none
    grey: torch.Tensor  # [K] bool
    sigma: torch.Tensor  # [K] float: blur sigma in pixels, 0: none
    solarize: torch.Tensor  # [K] bool


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """[H, W, 3] uint8 images of any sizes -> [B, H max, W max, 3], each padded by repeating its last row and
    column: a crop at the image's edge then samples what PIL's crop would (the edge pixel), not padding."""
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    out = torch.empty(len(images), height, width, 3, dtype=torch.uint8)
    for b, image in enumerate(images):
        h, w = image.shape[:2]
        out[b, :h, :w] = image
        out[b, :h, w:] = image[:, -1:]
        out[b, h:] = out[b, h - 1:h]
    return out


def plan(views: list[tuple[int, ViewParams]]) -> Optional[Plan]:
    """(image index in the batch, parameters) of each view -> the tensors `views` applies. A view's
    jitter changes before its hue fill the first blend slots, those after it the slots after the hue."""
    if not views:
        return None
    blend = torch.full((len(views), 2 * SLOTS), -1, dtype=torch.int8)
    amount = torch.ones(len(views), 2 * SLOTS)
    hue = torch.zeros(len(views))
    for row, (_, p) in enumerate(views):
        names = [name for name, _ in p.jitter]
        after = names.index("hue") if "hue" in names else len(names)
        for position, (name, factor) in enumerate(p.jitter):
            if name == "hue":
                hue[row] = factor
                continue
            slot = position if position < after else SLOTS + position - after - 1
            blend[row, slot], amount[row, slot] = JITTER.index(name), factor
    return Plan(
        boxes=torch.tensor([[i, left, top, left + w, top + h] for i, (left, top, w, h) in
                            ((i, p.box) for i, p in views)], dtype=torch.float32),
        flip=torch.tensor([p.flip for _, p in views]), blend=blend, amount=amount, hue=hue,
        grey=torch.tensor([p.grey for _, p in views]), sigma=torch.tensor([p.blur for _, p in views]),
        solarize=torch.tensor([p.solarize for _, p in views]))


# ----------------------------------------------------------------------------- crops: 8-bit [K, 3, s, s]

def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5), zero beyond 2."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, end: torch.Tensor, size: int, length: int) -> torch.Tensor:
    """[K] integer box edges on one axis -> [K, size, length]: PIL's antialiased bicubic weights of resizing
    pixels start..end-1 to `size` (ImagingResample: output pixel i centred at start + (i + 0.5) * scale, the
    filter stretched by max(scale, 1) when shrinking, cut at the box's edges as PIL's crop does, each row
    normalised to 1). Zero outside the box, so edge padding of the batch is never read."""
    scale = ((end - start) / size).view(-1, 1, 1)
    stretch = scale.clamp(min=1)
    taps = 2 * math.ceil(2 * float(stretch.max())) + 1
    centre = start.view(-1, 1, 1) + (torch.arange(size, dtype=scale.dtype).view(1, -1, 1) + 0.5) * scale
    pixel = (centre - 2 * stretch).floor() + torch.arange(taps, dtype=scale.dtype)  # [K, size, taps]
    w = bicubic((pixel + 0.5 - centre) / stretch)
    w = w * ((pixel >= start.view(-1, 1, 1)) & (pixel < end.view(-1, 1, 1)))
    w = w / w.sum(-1, keepdim=True)
    # the taps only, scattered into the row: offset by `taps` so that every index is distinct and in range
    out = w.new_zeros(len(w), size, length + 2 * taps)
    out.scatter_(2, pixel.long() + taps, w)
    return out[:, :, taps:taps + length]


def crop_each(pixels: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """On a CPU, view by view: torch's 8-bit antialiased bicubic resize of the box (a port of Pillow-SIMD's
    resampling, so within one 8-bit level of PIL's crop + resize), then the flip."""
    images = pixels.permute(0, 3, 1, 2)  # channels-last [B, 3, H, W]: the layout the 8-bit kernel reads
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for k, ((i, x0, y0, x1, y1), mirror) in enumerate(zip(boxes.long().tolist(), flip.tolist())):
        view = F.interpolate(images[i:i + 1, :, y0:y1, x0:x1], size=(size, size), mode="bicubic",
                             antialias=True)[0]
        out[k] = view.flip(-1) if mirror else view
    return out


def crop_batched(pixels: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                 chunk: int = 256) -> torch.Tensor:
    """On a GPU, all views in two batched products over whole rows and columns with PIL's weights (zero
    outside each box; a flip reverses the column weights), rounded to 8 bits as PIL does: more arithmetic
    than resizing each box, but a handful of kernels per batch instead of several per view, which is what
    costs there. `chunk` views at a time bound the gathered copies of the images."""
    dev = pixels.device
    wx = resample_weights(boxes[:, 1], boxes[:, 3], size, pixels.shape[2])
    wy = resample_weights(boxes[:, 2], boxes[:, 4], size, pixels.shape[1])
    wx[flip] = wx[flip].flip(1)
    wx, wy = wx.to(dev, non_blocking=True), wy.to(dev, non_blocking=True)
    index = boxes[:, 0].long().to(dev, non_blocking=True)
    rows = pixels.transpose(2, 3).float()  # [B, H, 3, W]: a box's pixels are one matrix [H * 3, W]
    parts = []
    for start in range(0, len(index), chunk):
        views = slice(start, start + chunk)
        columns = rows[index[views]] @ wx[views, None].transpose(2, 3)  # [k, H, 3, size]
        parts.append((wy[views] @ columns.flatten(2)).view(-1, size, 3, size).transpose(1, 2))
    return torch.cat(parts).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- colour: planes [N, H, W]

def luma(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return GREY[0] * r + GREY[1] * g + GREY[2] * b


def blend(rgb: tuple, change: torch.Tensor, amount: torch.Tensor) -> tuple:
    """One jitter slot: each view's channels blended by its amount f with, per its change, black
    (brightness), its mean luma (contrast) or its luma (saturation), clamped as torchvision's _blend; a
    view whose slot is empty has f = 1, the identity."""
    change, f = change.view(-1, 1, 1), amount.view(-1, 1, 1).to(rgb[0].dtype)
    y = luma(*rgb)
    towards = torch.where(change == 1, y.mean((1, 2), keepdim=True), torch.where(change == 2, y, 0.0))
    return tuple((f * c + (1 - f) * towards).clamp(0, 1) for c in rgb)


def hue(rgb: tuple, turns: torch.Tensor) -> tuple:
    """Rotate each view's hue by its turns, keeping HSV's value and saturation, as torchvision's adjust_hue.
    Each channel from the shifted hue h': c = v - clamp(min(k, 4 - k), 0, 1) * chroma, k = (n + 6 h') mod 6,
    n = 5, 3, 1, with every term multiplied by chroma, so no division: 6 h chroma is a difference of two
    channels plus 0, 2 or 4 chroma. Views with turns 0 are left as they are."""
    r, g, b = rgb
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    hue6 = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * chroma, r - g + 4 * chroma))  # [-1, 5)
    # the mod on the per-view shift only: the pixels' k is then in [5, 17) chroma, and one subtraction
    # brings it into [-1, 6); clamp(min(k, 4 - k), 0, 1) is 0 on [-1, 0) as on [5, 6)
    shift = (torch.tensor([5.0, 3.0, 1.0], device=r.device) + 6 * turns.view(-1, 1).to(r.dtype)) % 6 + 6
    rotate = (turns != 0).view(-1, 1, 1)
    out = []
    for c, channel in enumerate(rgb):
        k = hue6 + chroma * shift[:, c].view(-1, 1, 1)
        k = k - torch.where(k >= 12 * chroma, 12 * chroma, 6 * chroma)
        out.append(torch.where(rotate, v - torch.minimum(k, 4 * chroma - k).clamp(min=0).minimum(chroma),
                               channel))
    return tuple(out)


def grey(rgb: tuple, mask: torch.Tensor) -> tuple:
    """Luma on the three channels of the views in mask."""
    y, mask = luma(*rgb), mask.view(-1, 1, 1)
    return tuple(torch.where(mask, y, c) for c in rgb)


def blur_weights(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """[N] sigmas -> [N, 2 radius + 1] Gaussian taps, each cut at its own blur_radius (torchvision's kernel
    of that size), normalised; sigma 0: the identity."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    own = (3 * sigma).ceil().clamp(min=1).view(-1, 1)
    w = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3).view(-1, 1)) ** 2) * (taps.abs() <= own)
    return torch.where(sigma.view(-1, 1) > 0, w / w.sum(1, keepdim=True), (taps == 0).float())


def blur_radius(sigma: float) -> int:
    """Taps each side: 3 sigma, where the Gaussian's tail is below 1.2% of its peak."""
    return max(1, math.ceil(3 * sigma))


def gaussian_blur(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, H, W] planes, each blurred with its own separable kernel [N, taps], reflected borders (as
    torchvision's gaussian_blur): a sum of shifted copies per axis, which torch.compile fuses into one
    loop."""
    r = weights.shape[1] // 2
    w = weights.to(x.dtype).view(-1, 1, 1, weights.shape[1])
    padded = torch.cat([x[:, :, 1:r + 1].flip(2), x, x[:, :, -r - 1:-1].flip(2)], 2)
    x = sum(w[..., t] * padded[:, :, t:t + x.shape[2]] for t in range(2 * r + 1))
    padded = torch.cat([x[:, 1:r + 1].flip(1), x, x[:, -r - 1:-1].flip(1)], 1)
    return sum(w[..., t] * padded[:, t:t + x.shape[1]] for t in range(2 * r + 1))


def solarize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PIL's solarize(128) on the views in mask: levels of 128/255 and above are inverted."""
    return torch.where(mask.view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)


def colour(pixels: torch.Tensor, blends: torch.Tensor, amount: torch.Tensor, turns: torch.Tensor,
           greyed: torch.Tensor, weights: torch.Tensor | None, solarized: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] 8-bit crops -> normalised views: the jitter slots around the hue, greyscale, blur
    (none when weights is None), solarisation, CLIP mean/std."""
    n, _, height, width = pixels.shape
    rgb = (pixels.float() / 255).unbind(1)
    for slot in range(2 * SLOTS):
        if slot == SLOTS:
            rgb = hue(rgb, turns)
        rgb = blend(rgb, blends[:, slot], amount[:, slot])
    x = torch.stack(grey(rgb, greyed), 1)
    if weights is not None:
        x = gaussian_blur(x.view(n * 3, height, width), weights.repeat_interleave(3, 0)).view(x.shape)
    x = solarize(x, solarized)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


# ----------------------------------------------------------------------------- a plan on a batch

COMPILED = None  # colour as a CPU runs it, set on first use: compiled, or colour itself


def compiled_colour(*args) -> torch.Tensor:
    """colour through torch.compile on a CPU, shapes fixed (a graph per view size and with or without blur,
    compiled once and kept in torch's on-disk cache). Without a working C++ compiler, or with
    RSMCLIP_COMPILE=0, it runs eagerly: the same ops, several times slower."""
    global COMPILED
    if COMPILED is None:
        COMPILED = colour
        if os.environ.get("RSMCLIP_COMPILE", "1") != "0":
            # its CUDA_HOME notice on a CPU-only machine says nothing about this compile
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            COMPILED = torch.compile(colour, dynamic=False)
    try:
        return COMPILED(*args)
    except Exception as error:  # Inductor's errors have no common base class; eager shows real bugs
        if COMPILED is colour:
            raise
        COMPILED = colour
        why = " ".join(str(error).split())[:160]
        print(f"data/augment.py: torch.compile failed ({type(error).__name__}: {why}); the tensor "
              "augmentation runs eagerly, several times slower", file=sys.stderr)
        return colour(*args)


def views(pixels: torch.Tensor, plan: Plan, size: int, radius: int = 1) -> torch.Tensor:
    """pixels: [B, H, W, 3] uint8 on the device (images padded to one size by repeating their edges) ->
    [K, 3, size, size] normalised views. `radius`: blur taps each side, at least enough for the plan's
    largest sigma (train.py passes the recipe's largest, so the CPU's compiled shapes stay fixed)."""
    radius = max(radius, blur_radius(float(plan.sigma.max())))
    weights = blur_weights(plan.sigma, radius)
    if pixels.device.type != "cpu":
        return views_batched(pixels, plan, size, weights)
    # On a CPU: blurred views first, then the others, in chunks of a fixed number of views (the last
    # padded by repeating a view), each through the graph with or without blur
    chunk = max(1, CPU_CHUNK // size ** 2)
    blurred = plan.sigma > 0
    out = torch.empty(len(plan.boxes), 3, size, size)
    for group, blur in ((blurred.nonzero().flatten(), True), ((~blurred).nonzero().flatten(), False)):
        if not len(group):
            continue
        padded = torch.cat([group, group[:1].repeat(-len(group) % chunk)])
        crops = crop_each(pixels, plan.boxes[padded], plan.flip[padded], size)
        for start in range(0, len(padded), chunk):
            part = padded[start:start + chunk]
            made = compiled_colour(crops[start:start + chunk], plan.blend[part], plan.amount[part],
                                   plan.hue[part], plan.grey[part], weights[part] if blur else None,
                                   plan.solarize[part])
            keep = group[start:start + chunk]
            out[keep] = made[:len(keep)]
    return out


def views_batched(pixels: torch.Tensor, plan: Plan, size: int, weights: torch.Tensor) -> torch.Tensor:
    """A GPU's way (it runs on any device; the tests run it on the CPU): every view at once, eagerly, the
    plan copied to the device without waiting."""
    dev = pixels.device
    return colour(crop_batched(pixels, plan.boxes, plan.flip, size), *(t.to(dev, non_blocking=True) for t in (
        plan.blend, plan.amount, plan.hue, plan.grey, weights, plan.solarize)))
