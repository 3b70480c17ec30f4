"""Classify video files with a trained CLAVER (CPU is fine).

    python tools/predict.py clip1.mp4 clip2.webm --checkpoint runs/demo_kmt
    python tools/predict.py video.mp4 --checkpoint runs/k400/export --labels labels/ucf101.csv \\
        --prompts prompts/ucf101.json --top 3 --views 4x3

Frames are sampled TSN-style at segment centres (``--views`` clips x crops, default 1x1),
resized so the short side is the model's size and centre-cropped; scores are class
probabilities averaged over prompt variants and views. Any codec FFmpeg (PyAV) reads.
Labels and prompts default to the ones the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tools.evaluate import parse_views

    p = argparse.ArgumentParser(prog="claver-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+")
    p.add_argument("--checkpoint", required=True, help="export folder, run folder or DeepSpeed checkpoint")
    p.add_argument("--labels", default=None, help="id,name CSV (default: the checkpoint's)")
    p.add_argument("--prompts", default=None, help="prompt bank JSON (default: the checkpoint's)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--views", type=parse_views, default=(1, 1), help="CLIPSxCROPS (default 1x1)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def load_clip(path: Path, num_frames: int, size: int, views: tuple[int, int]) -> torch.Tensor:
    """A file -> ``[V, T, 3, S, S]`` normalised views (V = clips x crops)."""
    from claver_dist.data.augment import AugmentSpec, apply_views, draw_params
    from claver_dist.data.sampling import clip_indices
    from claver_dist.data.video import decode_frames, probe

    data = path.read_bytes()
    info = probe(data)
    clips, crops = views
    frames = decode_frames(data, clip_indices(info.frames, num_frames, train=False, clips=clips))
    params = draw_params(AugmentSpec(size=size), frames.shape[2], frames.shape[1], train=False, crops=crops)
    out = apply_views(frames, params, size)  # [crops, clips*T, 3, S, S]
    out = out.view(crops, clips, num_frames, *out.shape[2:]).transpose(0, 1)
    return out.reshape(clips * crops, num_frames, *out.shape[3:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from claver_dist.data.video import VideoError
    from claver_dist.eval.evaluate import batch_logits, class_text_features
    from claver_dist.eval.load import load_trained
    from claver_dist.eval.scoring import view_probs
    from claver_dist.text.prompts import load_bank

    try:
        model, cfg = load_trained(args.checkpoint, device=args.device)
        labels = args.labels or cfg.text.labels
        bank_path = args.prompts if args.prompts else (cfg.text.bank if not args.labels else None)
        bank = load_bank(labels, bank_path, cfg.text.kinds, cfg.text.use_templates)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    text = class_text_features(model, bank, torch.device(args.device))
    failed = 0
    for name in args.videos:
        path = Path(name)
        try:
            if not path.is_file():
                raise VideoError("no such file")
            video = load_clip(path, cfg.data.num_frames, cfg.data.image_size, args.views)
        except (VideoError, ValueError, OSError) as e:
            print(f"{name}: cannot read video: {e}", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            probs = view_probs(batch_logits(model, video[None].to(args.device), text, torch.float32))[0]
        top = probs.topk(min(args.top, len(probs)))
        print(name)
        for p, c in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {100 * p:6.2f}%  {bank.class_names[c]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
