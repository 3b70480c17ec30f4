"""Evaluation: text features once per evaluation, scores averaged over variants and views,
top-1/top-5 gathered over processes with every sample counted once.

    text = class_text_features(model, bank, device)            # [A, C, E]
    result = evaluate(model, loader, text, dist_env)            # {"top1", "top5", "num_samples", ...}

The loader yields ``video`` as ``[B, T, 3, S, S]`` (one view) or ``[B, V, T, 3, S, S]``;
padded entries that make the ranks' batch counts equal carry ``valid=False`` (or label -1).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from tqdm import tqdm

from claver_dist.distributed import all_sum, gather_objects
from claver_dist.eval.scoring import topk_correct, view_probs
from claver_dist.text.prompts import PromptBank, tokenize, trim_padding


@torch.no_grad()
def class_text_features(model, bank: PromptBank, device: torch.device, dtype: torch.dtype = torch.float32,
                        batch_size: int = 512) -> torch.Tensor:
    """Normalised features of every variant of every class: ``[A, C, E]``."""
    A, C = bank.num_variants, bank.num_classes
    texts = bank.variant_texts(list(range(A)))
    tokens = trim_padding(tokenize(texts))
    feats = []
    for i in range(0, len(tokens), batch_size):
        feats.append(model.encode_text(tokens[i:i + batch_size].to(device)).float())
    return torch.cat(feats).view(A, C, -1)


@torch.no_grad()
def batch_logits(model, video: torch.Tensor, text: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits ``[B, V, A, C]`` for a batch of one (``[B, T, ...]``) or several views."""
    if video.dim() == 5:  # one view
        video = video[:, None]
    emb = model.encode_video(rearrange(video, "b v t c h w -> (b v) t c h w").to(dtype)).float()
    A = text.shape[0]
    logits = model.logits(emb, rearrange(text, "a c e -> (a c) e"), A).float()  # [B*V, A, C]
    return rearrange(logits, "(b v) a c -> b v a c", b=video.shape[0])


def _valid_mask(batch: dict[str, Any]) -> torch.Tensor:
    label = batch["label"]
    valid = batch.get("valid")
    return valid.bool() if valid is not None else label >= 0


class _Tally:
    """Top-1/top-5 hit counts, summed over ranks at the end."""

    def __init__(self):
        self.h1 = self.h5 = self.n = 0

    def add(self, probs: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> None:
        hits = topk_correct(probs, labels, ks=(1, 5))
        self.h1 += int((hits[1] & keep).sum())
        self.h5 += int((hits[5] & keep).sum())
        self.n += int(keep.sum())

    def values(self) -> list[float]:
        return [self.h1, self.h5, self.n]


@torch.no_grad()
def evaluate(model, loader, text: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32,
             progress: bool = False, keep_predictions: bool = False,
             class_subsets: list[list[int]] | None = None, on_batch=None) -> dict[str, Any]:
    """Top-1/top-5 over ``loader`` (this rank's part), summed over all ranks.

    ``class_subsets`` (zero-shot splits): each subset is also scored on its own, with the
    softmax over that subset's classes only and only the samples whose label is in it.
    ``on_batch()`` is called after every batch (the trainer's watchdog beat)."""
    was_training = model.training
    model.eval()
    text = text.to(device)
    tally, split_tallies = _Tally(), [_Tally() for _ in class_subsets or []]
    subsets = [torch.tensor(s, device=device) for s in class_subsets or []]
    preds: list[tuple[str, int, list[float]]] = []
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        valid = _valid_mask(batch).to(device)
        labels = batch["label"].to(device).clamp(min=0)
        logits = batch_logits(model, batch["video"].to(device, non_blocking=True), text, dtype)
        probs = view_probs(logits)
        tally.add(probs, labels, valid)
        for sub, t in zip(subsets, split_tallies):
            inside = (labels[:, None] == sub[None]).any(dim=1) & valid
            local = (labels[:, None] == sub[None]).float().argmax(dim=1)  # label's position in the subset
            t.add(view_probs(logits[..., sub]), local, inside)
        if on_batch is not None:  # progress, for a hang watchdog
            on_batch()
        if keep_predictions:
            keys = batch.get("key", [""] * len(labels))
            for i in valid.nonzero().flatten().tolist():
                preds.append((keys[i], int(labels[i]), probs[i].tolist()))
    counts = all_sum([v for t in [tally, *split_tallies] for v in t.values()], device)
    if keep_predictions:
        preds = [p for part in gather_objects(preds) for p in part]
    model.train(was_training)
    rows = [{"top1": h1 / max(n, 1), "top5": h5 / max(n, 1), "num_samples": int(n)}
            for h1, h5, n in zip(counts[0::3], counts[1::3], counts[2::3])]
    out = dict(rows[0])
    if class_subsets:
        out["splits"] = rows[1:]
    if keep_predictions:
        out["predictions"] = sorted(preds)
    return out
