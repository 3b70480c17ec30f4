"""The pretraining loss with global negatives (claver_dist/train/contrastive.py).

Two real gloo processes, each with its own videos and captions, against one process that
holds the concatenated batch: same loss and, after the data-parallel average over ranks,
the same gradients for the video tower, the text tower and the logit scale."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from claver_dist.distributed import free_port
from claver_dist.train.contrastive import contrastive_loss

B, D, E = 3, 10, 6  # pairs per rank, input width, embedding width


def _towers() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Parameter]:
    torch.manual_seed(0)  # the same weights in every process
    return torch.nn.Linear(D, E), torch.nn.Linear(D, E), torch.nn.Parameter(torch.tensor([2.0]))


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _loss_and_grads(v_in, t_in, local_loss: bool, scale_max=100.0) -> tuple[torch.Tensor, torch.Tensor]:
    video_tower, text_tower, scale = _towers()
    video = F.normalize(video_tower(v_in), dim=-1)
    text = F.normalize(text_tower(t_in), dim=-1)
    loss = contrastive_loss(video, text, scale, scale_max, local_loss=local_loss)
    loss.backward()
    params = [*video_tower.parameters(), *text_tower.parameters(), scale]
    return loss.detach(), torch.cat([p.grad.flatten() for p in params])


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for local_loss in (True, False):
        loss, grads = _loss_and_grads(*_batch(rank), local_loss)
        dist.all_reduce(loss)   # the logged loss: the mean over ranks
        dist.all_reduce(grads)  # what DeepSpeed / DDP do: the mean over ranks
        if rank == 0:
            out[local_loss] = (loss.item() / world, grads / world)
    dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [True, False], ids=["local-loss", "full-loss"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(local_loss, two_rank_results):
    v = torch.cat([_batch(r)[0] for r in range(2)])
    t = torch.cat([_batch(r)[1] for r in range(2)])
    want_loss, want_grads = _loss_and_grads(v, t, local_loss=True)
    got_loss, got_grads = two_rank_results[local_loss]
    assert got_loss == pytest.approx(want_loss.item(), rel=1e-6)
    assert want_grads.norm() > 0 and want_grads[-1] != 0  # the logit scale learns too
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def two_rank_results() -> dict:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return dict(out)


def test_single_process_loss_is_symmetric_infonce():
    """Against the formula written out: the mean of the two cross-entropies, each row's
    positive on the diagonal, the scale exp(s) capped at 100."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(5, E, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, E, generator=g), dim=-1)
    for s, used in ((2.0, 2.0), (6.0, torch.log(torch.tensor(100.0)).item())):
        logits = torch.tensor(used).exp() * v @ t.T
        want = 0.0
        for i in range(5):
            want += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
        want = want / 10
        got = contrastive_loss(v, t, torch.tensor([s]))
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # matching pairs score higher than shuffled ones: the loss falls as pairs align
    assert contrastive_loss(v, v, torch.tensor([2.0])) < contrastive_loss(v, t, torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"must both be \[B, E\]"):
        contrastive_loss(v, t[:4], torch.tensor([2.0]))
