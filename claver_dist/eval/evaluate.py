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
import torch.distributed as dist
from tqdm import tqdm

from claver_dist.eval.scoring import topk_correct, view_probs
from claver_dist.text.prompts import PromptBank, tokenize


@torch.no_grad()
def class_text_features(model, bank: PromptBank, device: torch.device, dtype: torch.dtype = torch.float32,
                        batch_size: int = 512) -> torch.Tensor:
    """Normalised features of every variant of every class: ``[A, C, E]``."""
    A, C = bank.num_variants, bank.num_classes
    texts = bank.variant_texts(list(range(A)))
    tokens = tokenize(texts)
    feats = []
    for i in range(0, len(tokens), batch_size):
        feats.append(model.encode_text(tokens[i:i + batch_size].to(device)).float())
    return torch.cat(feats).view(A, C, -1)


@torch.no_grad()
def score_batch(model, video: torch.Tensor, text: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Class probabilities ``[B, C]`` for a batch of one or several views."""
    views = video.dim() == 6
    B = video.shape[0]
    flat = video.flatten(0, 1) if views else video
    emb = model.encode_video(flat.to(dtype)).float()  # [B*V, E]
    A, C, E = text.shape
    logits = model.logits(emb, text.reshape(A * C, E), A).float().view(B, -1, A, C)  # [B, V, A, C]
    return view_probs(logits)


def _valid_mask(batch: dict[str, Any]) -> torch.Tensor:
    label = batch["label"]
    valid = batch.get("valid")
    return valid.bool() if valid is not None else label >= 0


@torch.no_grad()
def evaluate(model, loader, text: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32,
             progress: bool = False, keep_predictions: bool = False) -> dict[str, Any]:
    """Top-1/top-5 over ``loader`` (this rank's part), summed over all ranks."""
    was_training = model.training
    model.eval()
    text = text.to(device)
    hits1 = hits5 = n = 0
    preds: list[tuple[str, int, list[float]]] = []
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        valid = _valid_mask(batch).to(device)
        labels = batch["label"].to(device)
        probs = score_batch(model, batch["video"].to(device, non_blocking=True), text, dtype)
        hits = topk_correct(probs, labels.clamp(min=0), ks=(1, 5))
        hits1 += int((hits[1] & valid).sum())
        hits5 += int((hits[5] & valid).sum())
        n += int(valid.sum())
        if keep_predictions:
            keys = batch.get("key", [""] * len(labels))
            for i in valid.nonzero().flatten().tolist():
                preds.append((keys[i], int(labels[i]), probs[i].tolist()))
    counts = torch.tensor([hits1, hits5, n], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
        if keep_predictions:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, preds)
            preds = [p for part in gathered for p in part]
    model.train(was_training)
    h1, h5, total = counts.tolist()
    out = {"top1": h1 / max(total, 1), "top5": h5 / max(total, 1), "num_samples": int(total)}
    if keep_predictions:
        out["predictions"] = preds
    return out
