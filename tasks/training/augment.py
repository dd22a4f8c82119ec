"""The classifier's training augmentation, batched on the training device: random resized crop,
horizontal flip, colour jitter.

Per-image torchvision transforms in a Python loop cost a CPU core per step at GPU batch sizes;
here one `roi_align` crops and resizes the whole batch on the device the images already sit on.
The distributions are torchvision's (`RandomResizedCrop.get_params`, Szegedy et al. 2015, "Going
Deeper with Convolutions", §6; `ColorJitter`'s brightness, contrast and saturation factors), with
one difference: the three jitters apply in a fixed order instead of a random one.

Parameters are drawn for the global batch from one generator (`draw`), then each data-parallel
rank applies its own shard of them (`apply`), so the augmentation does not depend on the world
size, and the generator's state (in the checkpoints) makes a resumed run augment identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback


@dataclass(frozen=True)
class CropFlipJitter:
    """Random resized crop to a square of `size` px, optional flip, colour jitter of `jitter`.

    `scale`: the crop's area as a fraction of the image, uniform in [scale_min, 1]; `ratio`: its
    aspect ratio, log-uniform in [3/4, 4/3]; `jitter`: brightness, contrast and saturation factors
    uniform in [max(0, 1 - jitter), 1 + jitter] (0: none).
    """

    scale_min: float
    flip: bool
    jitter: float
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Parameters for `n` images of `height` x `width`: (n, 8) float32 on the generator's
        device, rows `[x0, y0, x1, y1, flip, brightness, contrast, saturation]` (box corners in
        pixels, continuous coordinates)."""
        device = generator.device
        u = torch.rand(
            n, 4 * _ATTEMPTS + 4, generator=generator, device=device, dtype=torch.float64
        )
        area = height * width * (self.scale_min + (1 - self.scale_min) * u[:, :_ATTEMPTS])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _ATTEMPTS : 2 * _ATTEMPTS])
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        top = (u.gather(1, 2 * _ATTEMPTS + first)[:, 0] * (height - h + 1)).floor()
        left = (u.gather(1, 3 * _ATTEMPTS + first)[:, 0] * (width - w + 1)).floor()
        # No attempt fits: the centre crop, clamped to the ratio range (as torchvision).
        miss = ~fits.any(dim=1)
        in_ratio = width / height
        fw = min(width, round(height * self.ratio[1])) if in_ratio > self.ratio[1] else width
        fh = min(height, round(width / self.ratio[0])) if in_ratio < self.ratio[0] else height
        w, h = torch.where(miss, fw, w), torch.where(miss, fh, h)
        top = torch.where(miss, (height - fh) // 2, top)
        left = torch.where(miss, (width - fw) // 2, left)
        rest = u[:, 4 * _ATTEMPTS :]
        flip = (rest[:, 0] < 0.5) & self.flip
        lo, hi = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
        factors = lo + (hi - lo) * rest[:, 1:4]
        boxes = torch.stack([left, top, left + w, top + h], dim=1)
        return torch.cat([boxes, flip[:, None].double(), factors], dim=1).float()

    def apply(self, images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
        """Augment `images` (B, 3, H, W) uint8 with `params` (B, 8) from `draw` (this rank's
        rows); returns (B, 3, size, size) float32 in [0, 1] on the images' device."""
        x = images.float().div_(255.0)
        params = params.to(x.device)
        index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None]
        # aligned=True: a box [0, 0, W, H] is the whole image, pixel centres at +0.5; the
        # adaptive sampling ratio averages ceil(box / size) samples per output pixel, so a
        # downscale is antialiased like torchvision's resize(antialias=True).
        x = roi_align(x, torch.cat([index, params[:, :4]], dim=1), size, 1.0, -1, aligned=True)
        x = torch.where(params[:, 4, None, None, None] > 0, x.flip(3), x)
        if self.jitter > 0:
            brightness, contrast, saturation = (params[:, i, None, None, None] for i in (5, 6, 7))
            x = (x * brightness).clamp_(0, 1)
            mean = _gray(x).mean(dim=(2, 3), keepdim=True)
            x = (contrast * x + (1 - contrast) * mean).clamp_(0, 1)
            x = (saturation * x + (1 - saturation) * _gray(x)).clamp_(0, 1)
        return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma."""
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class LowResolution:
    """Shrink a random share of the augmented images to `size` px and back (low-resolution
    augmentation), so that a classifier also recognises images at a lower resolution than it
    was trained at, as its own size: the DiT's 32 px samples, upsampled to the judge's 64 px.

    Without it the 64 px-trained judge calls 96 % of real 32 px cats "cat" but only 63-66 % of
    real 32 px dogs "other" (docs/recipes.md): blur reads as "cat" to it, so a DiT's conditional
    accuracy measured the judge as much as the DiT. Training on both resolutions is the remedy of
    Touvron et al. 2019 ("Fixing the train-test resolution discrepancy", §3.1: the apparent object
    size and sharpness must match between train and test) taken to a mixed-resolution batch.

    `fraction`: probability per image, in [0, 1]; `size`: the low resolution at the model's
    input size `image_size` (it scales with the crop, for crops smaller than `image_size`).
    Both resizes are bilinear with antialiasing, as `tasks.evaluation.measure` resizes the DiT's
    samples and real low-resolution images before judging them.
    """

    fraction: float
    size: int
    image_size: int

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) bool on the generator's device: which images of the global batch to shrink."""
        return torch.rand(n, generator=generator, device=generator.device) < self.fraction

    def apply(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) float in [0, 1] (augmented crops); chosen: (B,) bool from `draw`
        (this rank's rows). Returns (B, 3, S, S) float: the chosen rows shrunk and enlarged."""
        chosen = chosen.to(x.device)
        side = x.shape[-1]
        low = max(1, round(self.size * side / self.image_size))
        if low >= side or not bool(chosen.any()):
            return x
        rows = x[chosen]
        rows = F.interpolate(rows, size=low, mode="bilinear", antialias=True, align_corners=False)
        rows = F.interpolate(rows, size=side, mode="bilinear", antialias=True, align_corners=False)
        out = x.clone()
        out[chosen] = rows.clamp_(0, 1)
        return out
