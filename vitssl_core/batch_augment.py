"""The view recipes of ``augment.py``, drawn for a whole batch at once: one tensor programme per batch.

``augment.py`` makes views one image at a time inside the data set: correct (every image gets
its own crop, flip, jitter), but on a small model the Python overhead of 2-8 torchvision calls
per image costs as much as the forward and backward pass (``benchmarks/method_speed.py``
measures it). Here the same recipes are written once for a batch (B, C, H, W): every random
parameter is still drawn per image, and the work is a few batched tensor operations on the
training device.

- Random resized crop and flip: torchvision's sampling (10 tries of area in ``scale`` and
  log-uniform aspect ratio in (3/4, 4/3), whole-pixel offsets, else the whole image), then one
  bilinear ``grid_sample`` for the batch. It equals ``v2.functional.resized_crop(...,
  antialias=False)``; torchvision's default antialiasing only matters when a crop is shrunk,
  which for our recipes happens only to the largest DINO local crops (28 px -> 12 px at 40 %).
- Colour jitter with p: brightness, contrast, saturation and hue factors drawn per image as in
  ``v2.ColorJitter``, applied in a random order per image; random grayscale.
- Gaussian blur with sigma drawn per image (SimCLR's 10 % kernel), solarisation, normalisation.

Randomness comes from torch's global generator on the batch's device, so a run that saves and
restores the RNG states (``vitssl_core.train``) resumes bit-identically. Inputs are float
images in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import _blur_kernel, _check_prob, _check_scale, _check_size, _default_scale

__all__ = ["BatchView", "batch_simclr_views", "batch_asymmetric_views", "batch_dino_views", "BatchViews"]

_RATIO = (3 / 4, 4 / 3)
_GREY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights


def _uniform(lo: float, hi: float, n: int, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def crop_boxes(
    B: int,
    H: int,
    W: int,
    scale: tuple[float, float],
    device: torch.device,
    ratio: tuple[float, float] = _RATIO,
    tries: int = 10,
) -> Tensor:
    """(B, 4) integer boxes (top, left, height, width), drawn as ``v2.RandomResizedCrop`` draws them."""
    area = H * W
    target = area * _uniform(scale[0], scale[1], B * tries, device).view(B, tries)
    log_r = _uniform(math.log(ratio[0]), math.log(ratio[1]), B * tries, device).view(B, tries)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1, device=device))
    idx = first.clamp(min=0)[:, None]
    h, w = h.gather(1, idx)[:, 0], w.gather(1, idx)[:, 0]
    fallback = first < 0  # torchvision's fallback for a square image: the whole image
    h, w = torch.where(fallback, float(H), h), torch.where(fallback, float(W), w)
    top = torch.floor(torch.rand(B, device=device) * (H - h + 1))
    left = torch.floor(torch.rand(B, device=device) * (W - w + 1))
    return torch.stack([top, left, h, w], 1)


def resized_crop(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): crop each image to its box, resize bilinearly, flip where ``flip``."""
    B, _, H, W = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    u = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # (size,) in (0, 1)
    u_x = torch.where(flip[:, None], 1 - u[None], u[None]) if flip is not None else u[None].expand(B, -1)
    # The source pixel of each output pixel, as F.interpolate(align_corners=False) computes it in
    # the crop, clamped to the crop's first and last pixel, so no pixel outside the box leaks in.
    x = torch.minimum(torch.maximum(left[:, None] + u_x * w[:, None] - 0.5, left[:, None]), (left + w - 1)[:, None])
    y = torch.minimum(torch.maximum(top[:, None] + u[None] * h[:, None] - 0.5, top[:, None]), (top + h - 1)[:, None])
    gx, gy = (2 * x + 1) / W - 1, (2 * y + 1) / H - 1  # grid_sample's coordinates (align_corners=False)
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luminance (the image itself when C == 1)."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b)[:, None]


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    return (factor[:, None, None, None] * a + (1 - factor[:, None, None, None]) * b).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack(
        [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 1
    )  # (B, 6, 3, H, W)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1))[:, 0]


def _adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(images)
    hsv = torch.cat([(hsv[:, :1] + factor[:, None, None, None]) % 1.0, hsv[:, 1:]], 1)
    return _hsv_to_rgb(hsv)


class BatchView:
    """One view recipe for a batch: ``view(images (B, C, H, W) in [0, 1]) -> (B, C, size, size)``.

    The parameters are those of ``augment.simclr_augment``: crop ``scale``, flip p=0.5, colour
    jitter (brightness/contrast ``0.8 s``, and for RGB saturation ``0.8 s``, hue ``0.2 s``) with
    p=``jitter_p``, random grayscale p=0.2 on RGB, blur p=``blur_p`` (sigma 0.1-2, kernel 10 % of
    ``size``), solarisation p=``solarize_p``, then normalisation with ``mean``/``std``.
    """

    def __init__(
        self,
        size: int,
        grayscale: bool,
        strength: float = 0.5,
        scale: Sequence[float] | None = None,
        blur_p: float = 0.5,
        solarize_p: float = 0.0,
        jitter_p: float = 0.8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        _check_size("size", size)
        for name, p in (("blur_p", blur_p), ("solarize_p", solarize_p), ("jitter_p", jitter_p)):
            _check_prob(name, p)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"strength={strength!r} must be a float >= 0 (SimCLR uses 1.0 on ImageNet, 0.5 on CIFAR)")
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean!r} and std={std!r} must be given together (or both None)")
        self.size, self.grayscale = size, bool(grayscale)
        self.scale = _default_scale(grayscale, scale) if scale is None else _check_scale("scale", scale)
        s = float(strength)
        self.brightness = self.contrast = 0.8 * s
        self.saturation, self.hue = (0.0, 0.0) if grayscale else (0.8 * s, min(0.2 * s, 0.5))
        self.grey_p = 0.0 if grayscale else 0.2
        self.jitter_p, self.blur_p, self.solarize_p = float(jitter_p), float(blur_p), float(solarize_p)
        self.kernel = _blur_kernel(size)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)

    def __call__(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor (B, C, H, W) in [0, 1], got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            )
        B, C, H, W = images.shape
        if self.mean is not None and len(self.mean) != C:
            raise ValueError(f"mean has {len(self.mean)} values for {C}-channel images")
        dev = images.device
        x = resized_crop(images, crop_boxes(B, H, W, self.scale, dev), self.size, torch.rand(B, device=dev) < 0.5)
        x = self._jitter(x)
        if self.grey_p > 0 and C == 3:
            x = torch.where((torch.rand(B, device=dev) < self.grey_p)[:, None, None, None], _grey(x).expand_as(x), x)
        if self.blur_p > 0:
            x = self._blur(x)
        if self.solarize_p > 0:
            on = (torch.rand(B, device=dev) < self.solarize_p)[:, None, None, None]
            x = torch.where(on & (x >= 0.5), 1 - x, x)
        if self.mean is not None:
            x = (x - self.mean.to(x)[:, None, None]) / self.std.to(x)[:, None, None]
        return x

    def _jitter(self, x: Tensor) -> Tensor:
        """Each image: with p=jitter_p, its jitter ops in a random order (v2.ColorJitter), factors per image."""
        B, dev = x.shape[0], x.device
        apply = torch.rand(B, device=dev) < self.jitter_p
        ops = [
            op
            for op, amount in (
                ("brightness", self.brightness),
                ("contrast", self.contrast),
                ("saturation", self.saturation),
                ("hue", self.hue),
            )
            if amount > 0
        ]
        if not ops:
            return x
        factors = {
            op: _uniform(max(0.0, 1 - getattr(self, op)), 1 + getattr(self, op), B, dev) for op in ops if op != "hue"
        }
        if "hue" in ops:
            factors["hue"] = _uniform(-self.hue, self.hue, B, dev)
        order = torch.argsort(torch.rand(B, len(ops), device=dev), dim=1)  # (B, n_ops): a permutation per image
        out = x
        for position in range(len(ops)):
            for k, op in enumerate(ops):
                chosen = apply & (order[:, position] == k)
                if not bool(chosen.any()):
                    continue
                f = factors[op]
                if op == "brightness":
                    y = _blend(out, torch.zeros_like(out), f)
                elif op == "contrast":
                    y = _blend(out, _grey(out).mean(dim=(1, 2, 3), keepdim=True).expand_as(out), f)
                elif op == "saturation":
                    y = _blend(out, _grey(out).expand_as(out), f)
                else:
                    y = _adjust_hue(out, f)
                out = torch.where(chosen[:, None, None, None], y, out)
        return out

    def _blur(self, x: Tensor) -> Tensor:
        """Gaussian blur with p=blur_p, sigma uniform in [0.1, 2] per image (v2.GaussianBlur's kernel)."""
        B, C, H, W = x.shape
        dev, k = x.device, self.kernel
        on = torch.rand(B, device=dev) < self.blur_p
        sigma = _uniform(0.1, 2.0, B, dev)
        half = (k - 1) / 2
        t = torch.linspace(-half, half, k, device=dev, dtype=x.dtype)
        g = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
        g = g / g.sum(1, keepdim=True)  # (B, k)
        g = torch.repeat_interleave(g, C, 0)  # (B*C, k): one kernel per image and channel
        y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
        y = F.conv2d(y, g[:, None, None, :], groups=B * C)  # along the width
        y = F.conv2d(y, g[:, None, :, None], groups=B * C).view(B, C, H, W)  # along the height
        return torch.where(on[:, None, None, None], y, x)


def batch_simclr_views(
    img_size: int,
    grayscale: bool,
    strength: float = 0.5,
    scale: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[BatchView]:
    """SimCLR's two views, as ``augment.simclr_augment`` (blur p=0.5)."""
    view = BatchView(img_size, grayscale, strength, scale, 0.5, 0.0, mean=mean, std=std)
    return [view, view]


def batch_asymmetric_views(
    img_size: int,
    grayscale: bool,
    strength: float = 0.5,
    scale: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[BatchView]:
    """BYOL / MoCo v3's asymmetric pair, as ``augment.asymmetric_augment``."""
    return [
        BatchView(img_size, grayscale, strength, scale, 1.0, 0.0, mean=mean, std=std),
        BatchView(img_size, grayscale, strength, scale, 0.1, 0.2, mean=mean, std=std),
    ]


def batch_dino_views(
    img_size: int,
    local_size: int,
    grayscale: bool,
    n_local: int,
    strength: float = 0.5,
    global_scale: Sequence[float] = (0.4, 1.0),
    local_scale: Sequence[float] = (0.05, 0.4),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[BatchView]:
    """DINO's multi-crop, as ``augment.dino_augment``: two global views, then ``n_local`` local ones."""
    if local_size > img_size:
        raise ValueError(f"local_size={local_size} must not exceed img_size={img_size}")
    if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local={n_local!r} must be an int >= 0")
    g1, g2 = batch_asymmetric_views(img_size, grayscale, strength, global_scale, mean, std)
    local = BatchView(local_size, grayscale, strength, local_scale, 0.5, 0.0, mean=mean, std=std)
    return [g1, g2] + [local] * n_local


class BatchViews:
    """A batch transform: ``(images (B, C, H, W), labels) -> ([view_1, ..., view_V], labels)``.

    The same structure a ``TwoViews`` or ``MultiCrop`` data set gives after collation, so a
    method's ``training_step`` takes either. Hand it to ``vitssl_core.train.train`` as
    ``batch_transform=`` with a data set of plain (image, label) pairs.
    """

    def __init__(self, views: Sequence[BatchView]):
        views = list(views)
        if not views or not all(callable(v) for v in views):
            raise ValueError("views must be a non-empty list of BatchView (e.g. batch_simclr_views(...))")
        self.views = views

    def __call__(self, batch: Sequence[Tensor] | Tensor) -> tuple[list[Tensor], Tensor | None]:
        images, labels = (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1])
        return [view(images) for view in self.views], labels
