"""Augmentation: one set of per-sample parameters, applied by either backend; mixup/cutmix.

Both loader backends draw a sample's augmentation here, in Python, from the sample's own
random stream (``sampling.sample_rng``), and apply it with the same semantics: the CPU
backend in torch (``apply_views``), the DALI backend with GPU operators (``dali.py``).
So a sample gets the same crop, flip and colours on both, and the images agree up to
resampling and YUV->RGB rounding.

Per view the contract is:

1. crop a box ``(x0, y0, w, h)`` of the decoded frame (source pixels) and resize it to
   ``S x S`` (bilinear, antialiased);
2. flip horizontally if drawn;
3. colour: ``rgb' = clamp(M @ rgb + o, 0, 255)`` with one 3x3 matrix ``M`` and offset ``o``
   per sample, which composes colour jitter (brightness, contrast about mid-grey,
   saturation, hue as a YIQ rotation, in that order) and grayscale;
4. normalise with the CLIP mean/std; layout ``[T, 3, S, S]``.

Train boxes follow TSN's multi-scale crop (claver-method.md §3): the crop side is
``short_side * scale`` per axis with scales (1, .875, .75, .66), aspect distortion of at
most ``max_distort`` scale steps, at one of TSN's 13 fixed offsets. Resizing the short
side to ``S * 256/224`` first, as the reference does, gives the same geometry, so the box
is taken in source pixels and resampled once. Test views are the centre square (short
side, i.e. "resize to S, centre crop S") or three squares along the long side.

Mixup/cutmix act on the batch (``build_mixup``), after loading, on either backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMA = np.array([0.299, 0.587, 0.114])
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)

Box = tuple[int, int, int, int]  # x0, y0, w, h in source pixels


@dataclass
class AugmentSpec:
    """What the augmentation draws from (built from DataConfig)."""

    size: int = 224
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    grayscale_prob: float = 0.2


@dataclass
class ViewParams:
    """One sample's augmentation: crop boxes (one per spatial view), flip, colour transform."""

    boxes: list[Box]
    flip: bool
    color: np.ndarray  # [3, 3] float32
    offset: np.ndarray  # [3] float32

    @property
    def identity_color(self) -> bool:
        return bool(np.array_equal(self.color, np.eye(3, dtype=np.float32)) and not self.offset.any())


# --------------------------------------------------------------------------- geometry


def _fix_offsets(w: int, h: int, cw: int, ch: int) -> list[tuple[int, int]]:
    # TSN GroupMultiScaleCrop.fill_fix_offset(more_fix_crop=True)
    ws, hs = (w - cw) // 4, (h - ch) // 4
    return [
        (0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
        (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
        (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs),
    ]  # fmt: skip


def multiscale_crop_box(width: int, height: int, scales, max_distort: int, rng: np.random.Generator) -> Box:
    base = min(width, height)
    sizes = [max(1, int(base * s)) for s in scales]
    pairs = [(cw, ch) for i, ch in enumerate(sizes) for j, cw in enumerate(sizes) if abs(i - j) <= max_distort]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    offsets = _fix_offsets(width, height, cw, ch)
    x0, y0 = offsets[int(rng.integers(len(offsets)))]
    return x0, y0, cw, ch


def view_crop_boxes(width: int, height: int, crops: int) -> list[Box]:
    """Squares of the short side: the centre one (crops=1) or start/centre/end (crops=3)."""
    side = min(width, height)
    cx, cy = (width - side) // 2, (height - side) // 2
    if crops == 1:
        return [(cx, cy, side, side)]
    if crops == 3:
        if width >= height:
            return [(0, 0, side, side), (cx, 0, side, side), (width - side, 0, side, side)]
        return [(0, 0, side, side), (0, cy, side, side), (0, height - side, side, side)]
    raise ValueError(f"spatial crops must be 1 or 3, got {crops}")


# --------------------------------------------------------------------------- colour


def color_transform(
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
    grayscale: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(M, o)`` with ``rgb' = M @ rgb + o`` (0..255 scale). ``hue`` in turns (0.1 = 36 degrees)."""
    m, o = np.eye(3), np.zeros(3)

    def then(a: np.ndarray, b: np.ndarray | float = 0.0) -> None:
        nonlocal m, o
        m, o = a @ m, a @ o + b

    then(brightness * np.eye(3))
    then(contrast * np.eye(3), 128.0 * (1.0 - contrast))
    gray = np.outer(np.ones(3), LUMA)
    then(saturation * np.eye(3) + (1.0 - saturation) * gray)
    if hue:
        c, s = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        then(_YIQ2RGB @ rot @ _RGB2YIQ)
    if grayscale:
        then(gray)
    return m.astype(np.float32), o.astype(np.float32)


def random_color(spec: AugmentSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    b, c, s, h = spec.color_jitter
    # draw everything unconditionally so the stream layout does not depend on the coin flips
    u = rng.random(6)
    jitter = u[0] < spec.color_jitter_prob
    gray = bool(u[1] < spec.grayscale_prob)
    factors = dict(
        brightness=1 + b * (2 * u[2] - 1),
        contrast=1 + c * (2 * u[3] - 1),
        saturation=1 + s * (2 * u[4] - 1),
        hue=h * (2 * u[5] - 1),
    )
    return color_transform(**factors, grayscale=gray) if jitter else color_transform(grayscale=gray)


def draw_params(
    spec: AugmentSpec, width: int, height: int, train: bool, crops: int = 1, rng: np.random.Generator | None = None
) -> ViewParams:
    """A sample's augmentation. Test views have no randomness."""
    if train:
        if rng is None:
            raise ValueError("train augmentation needs an rng")
        box = multiscale_crop_box(width, height, spec.crop_scales, spec.max_distort, rng)
        flip = bool(rng.random() < spec.flip_prob)
        m, o = random_color(spec, rng)
        return ViewParams([box], flip, m, o)
    m, o = color_transform()
    return ViewParams(view_crop_boxes(width, height, crops), False, m, o)


# --------------------------------------------------------------------------- torch application


def apply_views(
    frames: np.ndarray | torch.Tensor,
    params: ViewParams,
    size: int,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float32 ``[len(boxes), F, 3, size, size]`` (the contract above).

    Resizing runs on uint8 in channels-last layout (torch's vectorised antialias path,
    ~10x faster than float) and rounds to integers, which costs at most half a grey
    level; colour, clamp and normalisation are then one [N, 3] x [3, 3] product.
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [F, H, W, 3] frames, got {x.dtype} {tuple(x.shape)}")
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))
    shift = -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
    color = None if params.identity_color else torch.from_numpy(params.color).T.contiguous()
    offset = torch.from_numpy(params.offset)
    views = []
    for x0, y0, w, h in params.boxes:
        v = x[:, y0 : y0 + h, x0 : x0 + w].permute(0, 3, 1, 2)  # [F, 3, h, w], channels-last strides
        if (h, w) != (size, size):
            v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if params.flip:
            v = v.flip(-1)
        pix = v.permute(0, 2, 3, 1).reshape(-1, 3).float()  # [F*S*S, 3]
        if color is not None:
            pix = (pix @ color).add_(offset).clamp_(0, 255)
        pix = pix.mul_(scale).add_(shift)
        views.append(pix.view(x.shape[0], size, size, 3).permute(0, 3, 1, 2))
    return torch.stack(views)


# --------------------------------------------------------------------------- mixup / cutmix


class VideoMixup:
    """Mixup/cutmix (timm) or plain label smoothing for video batches ``[B, T, 3, S, S]``.

    timm draws from numpy's global generator. With ``seed=None`` that is kept: the caller
    controls the draws by seeding numpy (e.g. per step and rank, which also makes them
    resumable). With an integer seed the wrapper swaps in its own generator state for
    each call, independent of other numpy users, resumable through ``state_dict``.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                 prob: float, label_smoothing: float, seed: int | None = None):  # fmt: skip
        from timm.data.mixup import Mixup

        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.active = (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0
        self._mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                            mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)  # fmt: skip
        self._state = None if seed is None else np.random.RandomState(seed).get_state()

    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return video, _smooth_one_hot(label, self.num_classes, self.label_smoothing)
        if video.shape[0] % 2:
            raise ValueError(f"mixup/cutmix pairs a batch with its reverse: batch size must be even, got {video.shape[0]}")
        shape = video.shape
        # timm's cutmix indexes x[:, :, y, x]: fold frames into channels so boxes are spatial
        flat = video.reshape(shape[0], -1, shape[-2], shape[-1])
        if self._state is None:
            flat, target = self._mixup(flat, label)
            return flat.reshape(shape), target
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            flat, target = self._mixup(flat, label)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)
        return flat.reshape(shape), target

    def state_dict(self) -> dict:
        if self._state is None:
            return {}
        name, keys, pos, has_gauss, cached = self._state
        return {"keys": torch.from_numpy(np.asarray(keys).copy()), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached": float(cached), "name": name}  # fmt: skip

    def load_state_dict(self, d: dict) -> None:
        if d:
            self._state = (d["name"], np.asarray(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _smooth_one_hot(label: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((label.shape[0], num_classes), off, device=label.device)
    return out.scatter_(1, label.long().view(-1, 1), 1.0 - smoothing + off)


def build_mixup(
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
    seed: int | None = None,
) -> VideoMixup:
    """``(video [B,T,3,S,S], label [B]) -> (video, soft targets [B, C])``; rows sum to 1.

    With both alphas 0 (or prob 0) it only applies label smoothing; otherwise timm's
    Mixup mixes the batch with its reverse and smooths the mixed targets, as the
    reference recipe does. Draws come from numpy's global generator (seed it per step
    and rank), or from a private one when ``seed`` is given.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return VideoMixup(num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing, seed)
