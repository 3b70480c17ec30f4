"""Augmentation: one set of per-sample parameters, applied by either backend; mixup/cutmix.

Both loader backends draw a sample's augmentation here, in Python, from the sample's own
random stream (``sampling.sample_rng``), and apply it with the same semantics: the CPU
backend in torch (``crop_resize`` in its workers, uint8; ``finish_views`` batched where the
model runs), the DALI backend with GPU operators (``dali.py``).
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
from einops import rearrange

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


def crop_resize(frames: np.ndarray | torch.Tensor, params: ViewParams, size: int) -> torch.Tensor:
    """Steps 1 of the contract: uint8 ``[F, H, W, 3]`` -> uint8 ``[len(boxes), F, 3, size, size]``.

    Resizing runs on uint8 in channels-last layout (torch's vectorised antialias path,
    ~10x faster than float) and rounds to integers, which costs at most half a grey level.
    What is left (flip, colour, normalisation: :func:`finish_views`) is per-pixel work that
    runs batched where the model runs, so a quarter of the bytes cross to the device."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [F, H, W, 3] frames, got {x.dtype} {tuple(x.shape)}")
    views = []
    for x0, y0, w, h in params.boxes:
        # a view, not a copy: channels-last strides, the layout torch's fast uint8 resize wants
        v = rearrange(x[:, y0 : y0 + h, x0 : x0 + w], "f h w c -> f c h w")
        if (h, w) != (size, size):
            v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        views.append(v.contiguous())
    return torch.stack(views)


def finish_views(
    pixels: torch.Tensor,
    color: torch.Tensor,
    offset: torch.Tensor,
    flip: torch.Tensor,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """Steps 2-4 of the contract for a batch, on the tensors' device: uint8 ``[B, ..., 3, S, S]``
    -> float32 of the same shape; ``color [B, 3, 3]``, ``offset [B, 3]`` and ``flip [B]``
    (bool) per sample. One batched op with no host synchronisation."""
    if pixels.dtype != torch.uint8 or pixels.shape[-3] != 3:
        raise ValueError(f"expected uint8 [B, ..., 3, S, S] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    B, dev = pixels.shape[0], pixels.device
    flip = flip.to(dev).view(B, *[1] * (pixels.ndim - 1))
    x = torch.where(flip, pixels.flip(-1), pixels)  # on uint8: a quarter of the bytes
    shape = x.shape
    x = x.reshape(B, -1, 3, shape[-2] * shape[-1]).float()  # [B, N, 3, P], contiguous
    # rgb' = M @ rgb + o per pixel: one batched [3, 3] x [3, P] product per frame
    m = color.to(dev, torch.float32)[:, None]                    # [B, 1, 3, 3]
    o = offset.to(dev, torch.float32)[:, None, :, None]          # [B, 1, 3, 1]
    x = torch.matmul(m, x).add_(o).clamp_(0, 255)
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32, device=dev))
    shift = -torch.tensor(mean, dtype=torch.float32, device=dev) / torch.tensor(std, dtype=torch.float32, device=dev)
    x = x.mul_(scale.view(3, 1)).add_(shift.view(3, 1))
    return x.view(shape)


def sample_colors(params: ViewParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(color [3, 3], offset [3], flip [])`` of one sample, as :func:`finish_views` takes them."""
    return torch.from_numpy(params.color), torch.from_numpy(params.offset), torch.tensor(params.flip)


def apply_views(
    frames: np.ndarray | torch.Tensor,
    params: ViewParams,
    size: int,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float32 ``[len(boxes), F, 3, size, size]`` (the whole contract,
    one sample): :func:`crop_resize` then :func:`finish_views`."""
    v = crop_resize(frames, params, size)
    color, offset, flip = sample_colors(params)
    return finish_views(v[None], color[None], offset[None], flip[None], mean, std)[0]


# --------------------------------------------------------------------------- mixup / cutmix


class VideoMixup:
    """Mixup/cutmix or plain label smoothing for video batches ``[B, T, 3, S, S]``, as the
    official CLAVER release blends (its ``CutmixMixupBlending``): targets are smoothed
    one-hots; with probability ``prob`` a batch is blended, by cutmix with probability
    ``switch_prob`` (else mixup), with a random permutation of itself (a sample may draw
    itself, and a batch of one is left as it is); ``lam ~ Beta(alpha, alpha)``; cutmix
    pastes one box, the same in every frame, and corrects ``lam`` to the pasted area.

    Draws come from numpy's global generator. With ``seed=None`` that is kept: the caller
    controls the draws by seeding numpy (e.g. per step and rank, which also makes them
    resumable). With an integer seed the wrapper swaps in its own generator state for
    each call, independent of other numpy users, resumable through ``state_dict``.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                 prob: float, label_smoothing: float, seed: int | None = None):  # fmt: skip
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob = switch_prob if mixup_alpha > 0 and cutmix_alpha > 0 else float(cutmix_alpha > 0)
        self.prob = prob
        self.active = (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0
        self._state = None if seed is None else np.random.RandomState(seed).get_state()

    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = smooth_one_hot(label, self.num_classes, self.label_smoothing)
        if not self.active:
            return video, target
        if self._state is None:
            return self._blend(video, target)
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            return self._blend(video, target)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)

    def _blend(self, video: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if np.random.rand() >= self.prob:
            return video, target
        cutmix = np.random.rand() < self.switch_prob
        lam = float(np.random.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        partner = torch.from_numpy(np.random.permutation(video.shape[0])).to(video.device)
        if cutmix:
            h, w = video.shape[-2:]
            cut_w, cut_h = int(w * math.sqrt(1 - lam)), int(h * math.sqrt(1 - lam))
            cx, cy = int(np.random.randint(w)), int(np.random.randint(h))
            x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            video = video.clone()
            video[..., y1:y2, x1:x2] = video[partner][..., y1:y2, x1:x2]
            lam = 1 - (x2 - x1) * (y2 - y1) / (w * h)
        else:
            video = lam * video + (1 - lam) * video[partner]
        return video, lam * target + (1 - lam) * target[partner]

    def state_dict(self) -> dict:
        if self._state is None:
            return {}
        name, keys, pos, has_gauss, cached = self._state
        return {"keys": torch.from_numpy(np.asarray(keys).copy()), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached": float(cached), "name": name}  # fmt: skip

    def load_state_dict(self, d: dict) -> None:
        if d:
            self._state = (d["name"], np.asarray(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["cached"])


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Hard labels -> smoothed one-hot targets (timm's convention: off = s / C, on = 1 - s + s / C)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


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

    With both alphas 0 (or prob 0) it only applies label smoothing; otherwise it blends
    the batch with a random permutation of itself as the official release does (any batch
    size, 1 included). Draws come from numpy's global generator (seed it per step and
    rank), or from a private one when ``seed`` is given.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return VideoMixup(num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing, seed)
