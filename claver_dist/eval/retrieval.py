"""Text-to-video and video-to-text retrieval on a captioned split (pretraining's validation).

Every valid clip of the split is embedded once (its first caption: ``sampling.pick_caption``
for evaluation), the embeddings of all ranks are gathered, and each caption ranks all
videos (and each video all captions) by cosine similarity. Reported per direction: R@1,
R@5, R@10 (the fraction whose own pair is ranked within the first k) and the median rank
(1 = first), as retrieval benchmarks report them. A clip's embedding is the mean of its
views' embeddings, normalised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from claver_dist.distributed import gather_objects
from claver_dist.text.prompts import tokenize, trim_padding


@torch.no_grad()
def embed_pairs(model, loader, device: torch.device, dtype: torch.dtype = torch.float32, context_length: int = 77,
                on_batch=None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, video ``[N, E]``, text ``[N, E]``) of every valid clip of ``loader``, all ranks
    together, sorted by key (each clip once: the loader's padding slots are dropped)."""
    was = model.training
    model.eval()
    keys, videos, texts = [], [], []
    for batch in loader:
        valid = batch["valid"].tolist()
        video = batch["video"].to(device, non_blocking=True)
        b = video.shape[0]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            # views [B, V, T, ...] (val: clips x crops) -> one embedding per clip
            views = video.flatten(0, 1) if video.dim() == 6 else video
            v = model.encode_video(views.to(dtype)).float()
            v = v.view(b, -1, v.shape[-1]).mean(1)
            t = model.encode_text(trim_padding(tokenize(batch["caption"], context_length)).to(device)).float()
        for i in range(b):
            if valid[i]:
                keys.append(batch["key"][i])
                videos.append(F.normalize(v[i], dim=-1).cpu())
                texts.append(t[i].cpu())
        if on_batch is not None:
            on_batch()
    model.train(was)
    rows = sorted(r for part in gather_objects(list(zip(keys, videos, texts))) for r in part)
    if not rows:
        return [], torch.zeros(0, 0), torch.zeros(0, 0)
    return [k for k, _, _ in rows], torch.stack([v for _, v, _ in rows]), torch.stack([t for _, _, t in rows])


def ranks(sim: torch.Tensor) -> torch.Tensor:
    """For each row of ``sim`` ``[N, N]``, the 1-based rank of its diagonal entry (ties count
    against it: a pair tied with others is ranked after them)."""
    return (sim >= sim.diagonal()[:, None]).sum(dim=1)


def retrieval_metrics(video: torch.Tensor, text: torch.Tensor) -> dict[str, Any]:
    """R@1/5/10 and median rank for text->video (``t2v_*``) and video->text (``v2t_*``), and
    ``r1_mean`` (their R@1's mean, what selects the best checkpoint)."""
    n = video.shape[0]
    if n == 0:
        return {"num_samples": 0}
    sim = text.float() @ video.float().T  # [captions, videos]
    out: dict[str, Any] = {"num_samples": n}
    for name, r in (("t2v", ranks(sim)), ("v2t", ranks(sim.T))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = (r <= k).float().mean().item()
        out[f"{name}_median_rank"] = r.float().quantile(0.5).item()  # the mean of the middle two when N is even
    out["r1_mean"] = (out["t2v_r1"] + out["v2t_r1"]) / 2
    return out
