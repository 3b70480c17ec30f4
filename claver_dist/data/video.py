"""Video files: probing/validation, frame-exact decoding with PyAV, and re-encoding with FFmpeg.

Used by the shard builder (validate every input, re-encode for fast sparse seeking,
count frames exactly) and by the CPU loader backend (decode the TSN indices of one
sample from its in-memory bytes).

Frame indices are decode-order counts of displayed frames (0 = first frame), the same
numbering DALI's ``decoders.video(frames=...)`` uses. For constant-frame-rate streams
with short GOPs (what the builder writes) the decoder seeks to the keyframe before a
far-away index instead of decoding everything in between; indices are then recovered
from timestamps, which is exact only for CFR, so other streams are decoded
sequentially.

PyAV, not torchcodec: on these shards torchcodec's CPU decoder gives bitwise the same
frames at the same clips/s per core (same FFmpeg underneath; docs/benchmarks.md, "Decode
speed per core"), so it would be a dependency with no gain.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

from av.video.reformatter import VideoReformatter

from claver_dist.errors import VideoError

av.logging.set_level(av.logging.PANIC)  # corrupt inputs are reported by exceptions, not stderr spam

# One reformatter per process: frame.to_ndarray(format=...) builds a new swscale context per
# frame, which costs ~6x the decode itself on small frames.
_REFORMATTER: VideoReformatter | None = None


def _rotation(frame) -> int:
    """The frame's display rotation (degrees counter-clockwise, as FFmpeg's display matrix
    says: 0, 90, 180 or 270). Phone clips store portrait video as landscape plus this."""
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360


def _upright(frame, rgb: np.ndarray) -> np.ndarray:
    """``rgb`` turned as FFmpeg shows it (its autorotate): frames come out upright whatever
    the container's display matrix says, with or without re-encoding."""
    k = _rotation(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _rgb(frame) -> np.ndarray:
    global _REFORMATTER
    if _REFORMATTER is None:
        _REFORMATTER = VideoReformatter()
    return _REFORMATTER.reformat(frame, format="rgb24").to_ndarray()


@dataclass
class VideoInfo:
    frames: int  # decoded frame count (exact)
    fps: float
    width: int
    height: int
    duration: float
    codec: str
    declared_frames: int  # what the container claims (0 = unknown)
    # display rotation of the stored frames (degrees counter-clockwise); width and height
    # above are the upright (displayed) size, as every decoder here returns the frames
    rotation: int = 0


def _reason(e: BaseException) -> str:
    """A short reason from a PyAV error: FFmpeg's message plus its last log line, no paths."""
    if isinstance(e, av.error.FFmpegError):
        text = e.strerror or str(e)
        log = str(e).rsplit("last error log:", 1)
        if len(log) == 2:
            text += f" ({log[1].split(']', 1)[-1].strip()})"
        return text
    return str(e)


def _open(src: str | Path | bytes) -> av.container.InputContainer:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoError("empty file")
        return av.open(io.BytesIO(src))
    if Path(src).stat().st_size == 0:
        raise VideoError("empty file")
    return av.open(str(src))


def _open_stream(src: str | Path | bytes):
    """(container, first video stream); VideoError naming why a file is no usable video."""
    try:
        container = _open(src)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open: {_reason(e)}") from e
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    return container, container.streams.video[0]


def probe(src: str | Path | bytes, threads: int = 0) -> VideoInfo:
    """Decode every frame of the first video stream; raise VideoError if that fails.

    A truncated file whose header survived decodes fewer frames than the container
    declares: that is reported as truncation rather than accepted as a short video.
    """
    container, stream = _open_stream(src)
    with container:
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        if threads:
            stream.codec_context.thread_count = threads
        n, rotation = 0, 0
        try:
            for frame in container.decode(stream):
                if n == 0:
                    rotation = _rotation(frame)
                n += 1
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"decode error after {n} frames: {_reason(e)}") from e
        declared = int(stream.frames or 0)
        if n == 0:
            raise VideoError("no decodable frames")
        if declared > 0 and n < declared - max(2, declared // 50):
            raise VideoError(f"truncated: decoded {n} of {declared} declared frames")
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        fps = float(rate)
        duration = n / fps if fps > 0 else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, 270):  # stored sideways: the picture is the other way up
            width, height = height, width
        return VideoInfo(
            frames=n,
            fps=fps,
            width=width,
            height=height,
            duration=duration,
            codec=stream.codec_context.name,
            declared_frames=declared,
            rotation=rotation,
        )


def decode_frames(
    data: bytes,
    indices: list[int],
    cfr: bool = False,
    keyint: int = 0,
) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) as uint8 ``[len(indices), H, W, 3]`` RGB.

    ``cfr``/``keyint`` come from the sample metadata: with a constant frame rate and a
    known keyframe interval, the decoder seeks to a target's keyframe whenever that skips
    frames it would otherwise decode on the way.
    Raises VideoError when the stream ends before an index or cannot be decoded.
    """
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    container, stream = _open_stream(data)
    with container:
        stream.codec_context.thread_count = 1  # parallelism comes from loader workers
        try:
            if cfr and keyint > 0 and stream.average_rate:
                _decode_seeking(container, stream, wanted, keyint, got)
            else:
                _decode_sequential(container, stream, wanted, got)
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"decode error: {_reason(e)}") from e
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoError(f"stream ended before frame {missing[0]} (decoded {len(got)} of {len(wanted)} wanted)")
    return np.stack([got[i] for i in indices])


def _decode_sequential(container, stream, wanted: list[int], got: dict[int, np.ndarray]) -> None:
    want = set(wanted)
    last = wanted[-1]
    for n, frame in enumerate(container.decode(stream)):
        if n in want:
            got[n] = _upright(frame, _rgb(frame))
        if n >= last:
            return


def _decode_seeking(container, stream, wanted: list[int], keyint: int, got: dict[int, np.ndarray]) -> None:
    rate = stream.average_rate
    tb = stream.time_base
    start = stream.start_time or 0

    def index_of(frame) -> int:
        return int(round(float((frame.pts - start) * tb * rate)))

    pos = -1  # index of the last decoded frame; -1 = before the start
    it = None
    for target in wanted:
        if target in got:
            continue
        # seek when the keyframe at or before target (the builder writes one every `keyint`
        # frames from frame 0) comes after the next frame we would decode: decoding on from
        # `pos` would cost more frames than decoding from that keyframe
        if it is None or target - target % keyint > pos + 1:
            # seek to the keyframe at or before target (pts of frame `target`)
            pts = start + int(round(target / (rate * tb)))
            container.seek(pts, stream=stream, backward=True, any_frame=False)
            it = container.decode(stream)
            pos = -1
        for frame in it:
            if frame.pts is None:
                raise ValueError("frame without timestamp in a CFR stream")
            pos = index_of(frame)
            if pos in wanted and pos not in got:
                got[pos] = _upright(frame, _rgb(frame))
            if pos >= target:
                break
        else:
            return


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodeSettings:
    """How the shard builder writes videos (stored in the manifest)."""

    codec: Literal["h264", "vp9", "copy"] = "h264"
    # downscale only; 0 keeps the size. 256 is what the 224-px recipes consume (the reference
    # resizes the short side to S * 256/224 before its multi-scale crop); 336-px models want 384
    short_side: int = 256
    fps: float = 0.0  # 0 keeps the source rate (made constant)
    keyint: int = 12  # closed GOP, keyframe every `keyint` frames (8-16 suits sparse seeking)
    crf: int = -1  # -1: codec default below
    preset: str = "veryfast"

    def ext(self) -> str:
        return {"h264": "mp4", "vp9": "webm"}.get(self.codec, "")

    def to_dict(self) -> dict:
        return asdict(self)


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output (w, h): short side scaled down to ``short_side``, both even (yuv420p)."""
    if short_side and min(width, height) > short_side:
        s = short_side / min(width, height)
        width, height = round(width * s), round(height * s)
    return max(2, width // 2 * 2), max(2, height // 2 * 2)


def target_fps(source_fps: float, settings: EncodeSettings) -> float:
    fps = settings.fps or source_fps or 25.0
    return round(fps, 3)


def encode(src: Path, dst: Path, info: VideoInfo, settings: EncodeSettings, threads: int = 1) -> None:
    """Re-encode ``src`` to ``dst`` (CFR, closed GOP, 8-bit yuv420p, no audio)."""
    if settings.codec not in ("h264", "vp9"):
        raise ValueError(f"cannot encode to {settings.codec!r}")
    w, h = target_size(info.width, info.height, settings.short_side)
    fps = target_fps(info.fps, settings)
    k = settings.keyint
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), "-map", "0:v:0", "-an", "-sn", "-dn"]
    cmd += ["-vf", f"scale={w}:{h}:flags=bicubic,setsar=1", "-r", f"{fps:g}", "-fps_mode", "cfr"]
    cmd += ["-pix_fmt", "yuv420p", "-g", str(k), "-keyint_min", str(k), "-threads", str(threads)]
    if settings.codec == "h264":
        crf = 23 if settings.crf < 0 else settings.crf
        # no B-frames and no scene-cut keyframes: fixed closed GOPs, decode order = display order
        cmd += ["-c:v", "libx264", "-preset", settings.preset, "-crf", str(crf), "-bf", "0"]
        cmd += ["-sc_threshold", "0", "-flags", "+cgop", "-movflags", "+faststart", "-f", "mp4"]
    else:
        crf = 32 if settings.crf < 0 else settings.crf
        # no alt-ref (hidden) frames: one packet per shown frame, cheap seeking
        cmd += ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", str(crf), "-deadline", "good", "-cpu-used", "5"]
        cmd += ["-row-mt", "1", "-auto-alt-ref", "0", "-lag-in-frames", "0", "-f", "webm"]
    cmd.append(str(dst))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not dst.is_file() or dst.stat().st_size == 0:
        msg = (r.stderr or "").strip().splitlines()
        raise VideoError(f"ffmpeg failed: {msg[-1] if msg else 'rc ' + str(r.returncode)}")
