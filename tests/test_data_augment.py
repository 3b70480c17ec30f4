"""TSN sampling, the augmentation contract, mixup/cutmix, and the synthetic motion classes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from claver_dist.data.augment import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentSpec,
    ViewParams,
    apply_views,
    build_mixup,
    color_transform,
    crop_resize,
    draw_params,
    finish_views,
    multiscale_crop_box,
    sample_colors,
    view_crop_boxes as crop_boxes,
)
from claver_dist.data.sampling import clip_indices, sample_rng, tsn_indices
from claver_dist.data.synthetic import MOTION_CLASSES, SIZE_CLASSES, MotionSpec, motion_frames, size_order_frames

# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("total", [1, 5, 8, 9, 100, 301])
def test_tsn_one_frame_per_segment(total):
    t = 8
    seg = total / t
    centre = tsn_indices(total, t, train=False)
    assert centre == [min(total - 1, int((i + 0.5) * seg)) for i in range(t)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = tsn_indices(total, t, train=True, rng=rng)
        assert all(0 <= x < total for x in idx) and idx == sorted(idx)
        if total >= t:  # each index inside its own segment [i * seg, (i + 1) * seg)
            assert all(np.floor(i * seg) <= x < np.ceil((i + 1) * seg) for i, x in enumerate(idx))
    clips = clip_indices(total, t, train=False, clips=4)
    assert len(clips) == 32
    if total >= 32:
        assert len(set(clips)) == 32  # temporal views never repeat frames on long videos


def test_train_offsets_are_per_sample_streams():
    a = clip_indices(300, 8, True, rng=sample_rng(0, 3, "key_a", 0))
    assert a == clip_indices(300, 8, True, rng=sample_rng(0, 3, "key_a", 0))
    assert a != clip_indices(300, 8, True, rng=sample_rng(0, 4, "key_a", 0))  # new epoch, new offsets
    assert a != clip_indices(300, 8, True, rng=sample_rng(0, 3, "key_b", 0))
    assert a != clip_indices(300, 8, True, rng=sample_rng(1, 3, "key_a", 0))


# --------------------------------------------------------------------------- augmentation


def test_multiscale_crop_boxes_follow_tsn():
    rng = np.random.default_rng(0)
    scales = (1.0, 0.875, 0.75, 0.66)
    sizes = [int(240 * s) for s in scales]
    seen = set()
    for _ in range(500):
        x0, y0, w, h = multiscale_crop_box(320, 240, scales, 1, rng)
        assert w in sizes and h in sizes and abs(sizes.index(w) - sizes.index(h)) <= 1
        assert 0 <= x0 <= 320 - w and 0 <= y0 <= 240 - h
        seen.add((w, h))
    assert len(seen) == 10  # 4 square + 6 distorted pairs


def test_test_crops():
    assert crop_boxes(320, 240, 1) == [(40, 0, 240, 240)]
    assert crop_boxes(320, 240, 3) == [(0, 0, 240, 240), (40, 0, 240, 240), (80, 0, 240, 240)]
    assert crop_boxes(240, 320, 3)[2] == (0, 80, 240, 240)
    with pytest.raises(ValueError):
        crop_boxes(320, 240, 2)


def test_color_transform_semantics():
    rgb = np.array([200.0, 100.0, 30.0])
    m, o = color_transform()
    assert np.allclose(m @ rgb + o, rgb)
    m, o = color_transform(brightness=1.5)
    assert np.allclose(m @ rgb + o, 1.5 * rgb)
    m, o = color_transform(contrast=0.0)
    assert np.allclose(m @ rgb + o, 128)
    m, o = color_transform(grayscale=True)
    gray = m @ rgb + o
    assert np.allclose(gray, gray[0]) and np.isclose(gray[0], 0.299 * 200 + 0.587 * 100 + 0.114 * 30)
    m, o = color_transform(saturation=0.0)
    assert np.allclose(m @ rgb + o, gray)
    m, o = color_transform(hue=0.5)  # half a turn keeps luma, moves chroma
    out = m @ rgb + o
    assert np.isclose(np.dot([0.299, 0.587, 0.114], out), gray[0], atol=1e-4) and not np.allclose(out, rgb)
    m, o = color_transform(hue=1.0)
    assert np.allclose(m @ rgb + o, rgb, atol=1e-3)


def test_apply_views_crop_flip_normalise():
    frames = np.zeros((2, 6, 8, 3), np.uint8)
    frames[:, :, :4] = 255  # left half white
    out = apply_views(frames, ViewParams([(0, 0, 8, 6)], False, *color_transform()), size=4)
    assert out.shape == (1, 2, 3, 4, 4)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, 0, :, 0, 0], white, atol=1e-5)
    flipped = apply_views(frames, ViewParams([(0, 0, 8, 6)], True, *color_transform()), size=4)
    assert torch.allclose(flipped, out.flip(-1))
    crop = apply_views(frames, ViewParams([(4, 0, 4, 4)], False, *color_transform()), size=4)  # black quarter
    assert torch.allclose(crop[0, 0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD), atol=1e-5)
    gray = apply_views(frames, ViewParams([(0, 0, 8, 6)], False, *color_transform(grayscale=True)), size=4)
    unnorm = gray * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert torch.allclose(unnorm[:, :, 0], unnorm[:, :, 1], atol=1e-5)


def test_batched_device_finish_equals_the_contract_pixel_by_pixel():
    """uint8 crop/resize, then flip + colour + normalisation as one batched op (what runs on
    the GPU), equals the contract computed independently per pixel in float64 (1e-5)."""
    rng = np.random.default_rng(1)
    spec = AugmentSpec(size=24)
    frames = [rng.integers(0, 256, (4, 30, 40, 3), dtype=np.uint8) for _ in range(5)]
    params = [draw_params(spec, 40, 30, True, rng=rng) for _ in frames]
    params[0].flip = True  # both flips and an identity colour are in the batch
    params[1].color, params[1].offset = color_transform()
    pixels = torch.stack([crop_resize(f, p, 24) for f, p in zip(frames, params)])  # [B, 1, F, 3, S, S]
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 1, 4, 3, 24, 24)
    color, offset, flip = (torch.stack(c) for c in zip(*(sample_colors(p) for p in params)))
    out = finish_views(pixels, color, offset, flip)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    for b, p in enumerate(params):
        x = pixels[b].double().numpy()                                     # [1, F, 3, S, S]
        if p.flip:
            x = x[..., ::-1]
        rgb = np.einsum("dc,vfchw->vfdhw", p.color.astype(np.float64), x) + p.offset.reshape(3, 1, 1)
        rgb = np.clip(rgb, 0, 255) / 255.0
        want = (rgb - np.reshape(CLIP_MEAN, (3, 1, 1))) / np.reshape(CLIP_STD, (3, 1, 1))
        assert np.abs(out[b].double().numpy() - want).max() < 1e-5, b
        assert torch.equal(apply_views(frames[b], p, 24), out[b])  # the one-sample path is the same op
    with pytest.raises(ValueError, match="uint8"):
        finish_views(out, color, offset, flip)


def test_draw_params_are_deterministic_and_varied():
    spec = AugmentSpec(size=224)
    draws = [draw_params(spec, 320, 240, True, rng=sample_rng(0, 0, f"k{i}", 1)) for i in range(200)]
    again = draw_params(spec, 320, 240, True, rng=sample_rng(0, 0, "k0", 1))
    assert again.boxes == draws[0].boxes and np.array_equal(again.color, draws[0].color)
    flips = np.mean([d.flip for d in draws])
    jittered = np.mean([not d.identity_color for d in draws])
    assert 0.35 < flips < 0.65 and 0.7 < jittered < 0.95
    val = draw_params(spec, 320, 240, False, crops=3)
    assert val.identity_color and not val.flip and len(val.boxes) == 3


# --------------------------------------------------------------------------- mixup


@pytest.mark.parametrize("mixup,cutmix,smoothing", [(0.8, 1.0, 0.1), (0.8, 0.0, 0.0), (0.0, 1.0, 0.1), (0.0, 0.0, 0.1)])
def test_mixup_targets_sum_to_one(mixup, cutmix, smoothing):
    fn = build_mixup(num_classes=5, mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=0.5, prob=1.0,
                     label_smoothing=smoothing, seed=0)  # fmt: skip
    video = torch.randn(4, 8, 3, 16, 16)
    label = torch.tensor([0, 1, 2, 4])
    for _ in range(5):
        out, target = fn(video.clone(), label)
        assert out.shape == video.shape and target.shape == (4, 5)
        assert torch.allclose(target.sum(1), torch.ones(4), atol=1e-6)
        assert (target >= 0).all()
    if mixup == cutmix == 0:
        assert torch.equal(out, video)
        assert torch.allclose(target.max(1).values, torch.full((4,), 0.9 + 0.1 / 5))


def test_cutmix_cuts_the_same_box_from_every_frame():
    fn = build_mixup(4, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.0, prob=1.0, label_smoothing=0.0, seed=1)
    video = torch.stack([torch.full((8, 3, 16, 16), float(i)) for i in range(4)])
    for _ in range(20):  # a draw can give an empty box or pair sample 0 with itself; not every time
        out, target = fn(video.clone(), torch.arange(4))
        values = out[0].unique()
        if len(values) == 2:
            break
    partner = int(values.max() if values.min() == 0 else values.min())  # sample i is filled with i
    pasted = out[0] == partner
    assert pasted.any() and (pasted == pasted[0:1, 0:1]).all()  # same box in every frame and channel
    lam = 1 - pasted[0, 0].float().mean()
    assert torch.isclose(target[0, 0], lam) and torch.isclose(target[0, partner], 1 - lam)
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_mixup_is_seeded_and_resumable():
    a = build_mixup(3, 0.8, 1.0, 0.5, 1.0, 0.1, seed=7)
    b = build_mixup(3, 0.8, 1.0, 0.5, 1.0, 0.1, seed=7)
    x, y = torch.randn(2, 4, 3, 8, 8), torch.tensor([0, 2])
    a(x.clone(), y)
    b.load_state_dict(a.state_dict())
    np.random.seed(123)  # other numpy users do not disturb the sequence
    oa, ta = a(x.clone(), y)
    ob, tb = b(x.clone(), y)
    assert torch.equal(oa, ob) and torch.equal(ta, tb)
    # seed=None: draws follow numpy's global seed
    c = build_mixup(3, 0.8, 1.0, 0.5, 1.0, 0.1)
    np.random.seed(5)
    oc, tc = c(x.clone(), y)
    np.random.seed(5)
    od, td = c(x.clone(), y)
    assert torch.equal(oc, od) and torch.equal(tc, td) and c.state_dict() == {}
    # any batch size: a batch of one is its own partner, so only the label smoothing shows
    one = torch.randn(1, 4, 3, 8, 8)
    for _ in range(4):
        out, target = a(one.clone(), torch.tensor([2]))
        assert torch.allclose(out, one) and torch.allclose(target, torch.tensor([[0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]]))
    out, target = a(torch.randn(3, 4, 3, 8, 8), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 4, 3, 8, 8) and torch.allclose(target.sum(1), torch.ones(3))


# --------------------------------------------------------------------------- synthetic classes


def test_motion_classes_are_time_reversed_pairs():
    spec = MotionSpec(width=48, height=32, min_frames=10, max_frames=12)
    for label in range(0, len(MOTION_CLASSES), 2):
        fwd = motion_frames(label, np.random.default_rng(5), spec)
        back = motion_frames(label + 1, np.random.default_rng(5), spec)
        assert np.array_equal(fwd[::-1], back)  # same frames, opposite order
        assert np.array_equal(fwd.mean(0), back.mean(0))  # a frame average cannot tell them apart
        assert not np.array_equal(fwd[0], fwd[-1])  # but there is motion
    a = motion_frames(3, np.random.default_rng(1), spec)
    assert np.array_equal(a, motion_frames(3, np.random.default_rng(1), spec))


def test_motion_direction_is_what_the_name_says():
    spec = MotionSpec(width=64, height=64, min_frames=12, max_frames=12)

    def stats(frame):
        fg = frame.astype(float).sum(-1) > 400  # foreground is bright (>= 150 per channel)
        ys, xs = np.nonzero(fg) if fg.any() else (np.zeros(1), np.zeros(1))  # a faded-out shape is not "bright"
        return {"x": xs.mean(), "y": ys.mean(), "area": fg.sum(), "spread": xs.std(), "std": frame.std()}

    for label, (name, _, _) in enumerate(MOTION_CLASSES):
        f = motion_frames(label, np.random.default_rng(label), spec)
        a, b = stats(f[0]), stats(f[-1])
        expect = {
            "moving down": b["y"] > a["y"] + 10, "moving up": b["y"] < a["y"] - 10,
            "growing": b["area"] > 2 * a["area"], "shrinking": a["area"] > 2 * b["area"],
            "fading in": b["std"] > a["std"] + 5, "fading out": a["std"] > b["std"] + 5,
            "coming together": b["spread"] < a["spread"] - 5, "moving apart": b["spread"] > a["spread"] + 5,
            "moving right": b["x"] > a["x"] + 10, "moving left": b["x"] < a["x"] - 10,
        }  # fmt: skip
        assert expect.get(name, True), (name, a, b)


def test_default_classes_survive_a_horizontal_flip():
    """A flipped clip of a default class still shows its class; right/left swap."""
    spec = MotionSpec(width=64, height=48, min_frames=10, max_frames=10)
    together = motion_frames(6, np.random.default_rng(0), spec)
    flipped = together[:, :, ::-1]
    xs = [np.nonzero(f.astype(float).sum(-1) > 400)[1] for f in flipped]
    assert xs[-1].std() < xs[0].std() - 5  # still coming together
    right = motion_frames(8, np.random.default_rng(0), spec)[:, :, ::-1]
    xs = [np.nonzero(f.astype(float).sum(-1) > 400)[1].mean() for f in right]
    assert xs[-1] < xs[0] - 10  # a flipped "moving right" moves left


def test_size_classes_are_one_set_of_frames_in_different_orders():
    """The demo's classes: a frame-pooling model sees the same frames in every class."""
    spec = MotionSpec(width=48, height=32, min_frames=12, max_frames=12)
    clips = [size_order_frames(c, np.random.default_rng(7), spec) for c in range(len(SIZE_CLASSES))]
    pooled = np.sort(clips[0].reshape(len(clips[0]), -1), axis=0)
    for c in clips[1:]:
        assert np.array_equal(np.sort(c.reshape(len(c), -1), axis=0), pooled)  # same multiset of frames
        assert np.array_equal(c.mean(0), clips[0].mean(0))
    areas = [tuple((c.astype(float).sum(-1) > 400).sum((1, 2))) for c in clips]  # shape area per frame
    assert len(set(areas)) == len(SIZE_CLASSES)  # ...but every class orders them differently

    def area_runs(area):  # runs of "+" (the shape grows to the next frame) and "-" (it shrinks)
        return "".join(k for k, _ in itertools.groupby("+" if b > a else "-" for a, b in zip(area, area[1:])))

    runs = {name: area_runs(a) for (name, _), a in zip(SIZE_CLASSES, areas)}
    assert runs["growing"] == "+" and runs["shrinking"] == "-"
    assert runs["growing then shrinking"] == "+-" and runs["shrinking then growing"] == "-+"
    assert runs["growing then shrinking then growing"] == "+-+"
    assert runs["shrinking then growing then shrinking"] == "-+-"
