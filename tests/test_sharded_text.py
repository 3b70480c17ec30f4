"""Sharded text tower: same loss and gradients as every rank encoding every prompt.

Two real gloo processes; gradients are averaged over ranks as DeepSpeed/DDP would."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from claver_dist.distributed import free_port


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from claver_dist.model import ModelConfig, build_model
    from claver_dist.text.prompts import tokenize
    from claver_dist.data.augment import smooth_one_hot
    from claver_dist.train.loss import soft_target_cross_entropy
    from claver_dist.train.sharded_text import encode_text_sharded

    torch.manual_seed(0)  # same weights on both ranks
    model, _ = build_model(ModelConfig(clip_model="claver-debug"), num_frames=2, image_size=64)
    K, C = 3, 5  # 15 prompts: not divisible by 2, so padding is exercised
    texts = [f"a video of action number {c} told in variant {k} {'with more words ' * (c % 3)}"
             for k in range(K) for c in range(C)]
    tokens = tokenize(texts)
    g = torch.Generator().manual_seed(100 + rank)  # each rank has its own clips
    video = torch.randn(2, 2, 3, 64, 64, generator=g)
    target = smooth_one_hot(torch.randint(0, C, (2,), generator=g), C, 0.1)
    results = {}
    for mode in ("plain", "sharded"):
        model.zero_grad(set_to_none=True)
        text = encode_text_sharded(model, tokens, torch.device("cpu")) if mode == "sharded" else model.encode_text(tokens)
        loss = soft_target_cross_entropy(model(video, num_variants=K, text_features=text), target)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        dist.all_reduce(grads)
        grads /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        results[mode] = (total.item() / world, grads)
    if rank == 0:
        out["loss"] = (results["plain"][0], results["sharded"][0])
        out["grad_diff"] = (results["plain"][1] - results["sharded"][1]).abs().max().item()
        out["grad_norm"] = results["plain"][1].norm().item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_text_same_loss_and_gradients():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    plain, sharded = out["loss"]
    assert abs(plain - sharded) < 1e-6
    assert out["grad_norm"] > 0
    assert out["grad_diff"] < 1e-6 * max(1.0, out["grad_norm"])
