"""video.decode_frames: exact frame indices on streams as the shard builder writes them
(seeking across GOPs) and on any other stream (sequential: VFR, display matrices), and
VideoError for every way a stream can be unusable."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from claver_dist.data.synthetic import frame_number_frames, read_frame_number, write_video
from claver_dist.data.video import EncodeSettings, VideoError, decode_frames, encode, probe

LENGTHS = (5, 30, 61)  # shorter than a GOP, two and a half GOPs, five GOPs and a frame


@pytest.fixture(scope="module")
def shard_videos(tmp_path_factory) -> dict[int, tuple[bytes, dict]]:
    """Frame-numbered clips re-encoded as make_shards does (H.264, CFR, keyframe every 12):
    length -> (bytes, the metadata the loader passes)."""
    tmp = tmp_path_factory.mktemp("video")
    out = {}
    for n in LENGTHS:
        src, dst = tmp / f"src{n}.mp4", tmp / f"v{n}.mp4"
        write_video(src, frame_number_frames(n, 64, 48), fps=25)
        settings = EncodeSettings(short_side=0)
        encode(src, dst, probe(src), settings)
        out[n] = (dst.read_bytes(), {"cfr": True, "keyint": settings.keyint})
    return out


def _numbers(frames: np.ndarray) -> list[int]:
    return [read_frame_number(f) for f in frames]


def test_exact_indices_any_order_with_repeats(shard_videos):
    rng = np.random.default_rng(0)
    for n, (data, meta) in shard_videos.items():
        cases = [list(range(n)), [n - 1, 0, 0, n // 2, n - 1], [0] * 8]
        cases += [sorted(rng.integers(0, n, 8).tolist()) for _ in range(5)]  # TSN-like: sparse, sorted
        for idx in cases:
            frames = decode_frames(data, idx, cfr=meta["cfr"], keyint=meta["keyint"])
            assert frames.shape == (len(idx), 48, 64, 3) and frames.dtype == np.uint8
            assert _numbers(frames) == idx, (n, idx)
            # seeking (CFR, known keyframes) and decoding everything give the same pixels
            assert np.array_equal(frames, decode_frames(data, idx)), (n, idx)


def test_unusable_streams_raise_video_error(shard_videos):
    data, _ = shard_videos[30]
    with pytest.raises(VideoError, match="stream ended before frame 30"):
        decode_frames(data, [2, 30], cfr=True, keyint=12)
    with pytest.raises(VideoError, match="empty file"):
        decode_frames(b"", [0])
    with pytest.raises(VideoError, match="cannot open"):
        decode_frames(b"definitely not a video " * 40, [0])
    # the file cut in half (faststart: the header survives, the later frames do not)
    with pytest.raises(VideoError):
        decode_frames(data[: len(data) // 2], [0, 29], cfr=True, keyint=12)


def test_variable_frame_rate_counts_frames_not_timestamps(tmp_path):
    """A VFR stream (a frame gap of 3 frame times after frame 20) with B-frames: index k is the
    k-th displayed frame, as a sequential decode counts them."""
    src = tmp_path / "src.mp4"
    write_video(src, frame_number_frames(40, 64, 48), fps=25)
    vfr = tmp_path / "vfr.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-vf",
                    "setpts='if(lt(N,20),N,20+(N-20)*3)/25/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
                    "-crf", "10", "-bf", "2", str(vfr)], check=True)  # fmt: skip
    data = vfr.read_bytes()
    assert probe(data).frames == 40
    idx = [0, 19, 20, 21, 39, 5]
    assert _numbers(decode_frames(data, idx)) == idx


def test_display_rotation_is_applied(tmp_path):
    """A clip coded landscape with a display matrix (phone clips, kept by --copy) comes out
    upright, as FFmpeg shows it, for every rotation."""
    coded = np.zeros((6, 48, 64, 3), np.uint8)
    coded[:, :24, :32] = 255  # bright top-left quadrant of the coded picture
    write_video(tmp_path / "flat.mp4", coded, fps=25)
    for rotate, k in ((90, 1), (180, 2), (270, 3)):
        dst = tmp_path / f"r{rotate}.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tmp_path / "flat.mp4"), "-c", "copy",
                        "-metadata:s:v:0", f"rotate={rotate}", str(dst)], check=True)  # fmt: skip
        frame = decode_frames(dst.read_bytes(), [0, 5])[1]
        want = np.rot90(coded[0], k)  # rotate=R: shown turned R degrees counter-clockwise (270: the phone case)
        assert frame.shape == want.shape
        assert np.abs(frame.astype(int) - want).mean() < 8, rotate


def test_bench_data_prints_the_per_core_table(motion_shards, capsys):
    """tools/bench_data.py's per-core part on small shards: one row per decoder and frame
    count, the uint8 vs float32 bytes per batch."""
    from tools.bench_data import main as bench

    assert bench(["--h264", str(motion_shards), "--backends", "none", "--frames", "8", "--size", "32",
                  "--batch", "4", "--clips", "3", "--repeats", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| pyav | 8 |" in out and "| torchcodec | 8 |" in out  # a number, or why it cannot run
    assert "| 8 | 0.1 MB | 0.4 MB |" in out  # 4 x 8 x 3 x 32 x 32 = 98,304 bytes as uint8, x 4 as float32
