"""TSN frame sampling and the per-sample random streams that both loader backends share.

A clip of ``num_frames`` frames is taken from a video of ``total`` frames by splitting the
video into ``num_frames`` equal segments and taking one frame per segment (TSN):

- train: a uniformly random position inside each segment;
- test: the segment centre; with ``clips > 1`` temporal views the clips are spread
  evenly inside each segment (clip k of n takes position ``(k + 0.5) / n``), so clip
  views never repeat frames unless the video is shorter than the clip.

Randomness is never drawn from a global generator: every sample gets its own
``numpy.random.Generator`` seeded by ``(seed, epoch, sample id, stream)``. That makes a
sample's frames and augmentation independent of which worker, rank, backend or batch
position handles it, which is what lets the CPU and DALI backends agree, and a restored
loader reproduce an uninterrupted run exactly.

    >>> tsn_indices(100, 4, train=False)
    [12, 37, 62, 87]
"""

from __future__ import annotations

import hashlib

import numpy as np

# Independent random streams drawn for one sample: frame offsets vs augmentation.
STREAM_FRAMES = 0
STREAM_AUGMENT = 1
STREAM_CAPTION = 2


def _key_int(key: str) -> int:
    # Stable across processes and Python versions (str hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of sample ``key`` in ``epoch`` (deterministic)."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, _key_int(key), stream]))


def tsn_indices(
    total: int,
    num_frames: int,
    train: bool,
    rng: np.random.Generator | None = None,
    clip: int = 0,
    clips: int = 1,
) -> list[int]:
    """Frame indices of one TSN clip from a video of ``total`` frames.

    ``train=True`` needs ``rng`` (random offset per segment). ``clip``/``clips`` pick one
    of several evenly spaced temporal test views. Indices are in [0, total) and
    non-decreasing; a video shorter than ``num_frames`` repeats frames.
    """
    if total < 1:
        raise ValueError(f"cannot sample from a video with {total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    seg = total / num_frames
    if train:
        if rng is None:
            raise ValueError("train sampling needs an rng")
        pos = rng.random(num_frames)
    else:
        if not 0 <= clip < clips:
            raise ValueError(f"clip {clip} out of range for {clips} clips")
        pos = np.full(num_frames, (clip + 0.5) / clips)
    idx = np.floor((np.arange(num_frames) + pos) * seg).astype(np.int64)
    return np.clip(idx, 0, total - 1).tolist()


def clip_indices(
    total: int,
    num_frames: int,
    train: bool,
    clips: int = 1,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """All frame indices a sample needs: ``clips`` clips of ``num_frames``, concatenated."""
    if train:
        if clips != 1:
            raise ValueError("training samples one clip per video")
        return tsn_indices(total, num_frames, True, rng)
    out: list[int] = []
    for k in range(clips):
        out += tsn_indices(total, num_frames, False, clip=k, clips=clips)
    return out


def pick_caption(captions: list[str], seed: int, epoch: int, key: str, train: bool) -> str:
    """The caption a captioned sample is trained on this epoch: drawn from its own random
    stream (seed, epoch, key), so a resumed or resized run picks the same one; evaluation
    always takes the first."""
    if not captions:
        raise ValueError(f"{key}: no caption")
    if not train or len(captions) == 1:
        return captions[0]
    return captions[int(sample_rng(seed, epoch, key, STREAM_CAPTION).integers(len(captions)))]
