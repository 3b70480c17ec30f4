"""Loss and evaluation scoring against direct reference computations."""

import math

import torch

from claver_dist.eval.scoring import topk_correct, variant_probs, view_probs
from claver_dist.data.augment import smooth_one_hot
from claver_dist.train.loss import soft_target_cross_entropy


def test_soft_target_ce_equals_reference_loop():
    g = torch.Generator().manual_seed(0)
    B, K, C = 3, 4, 5
    logits = torch.randn(B, K, C, generator=g)
    targets = torch.rand(B, C, generator=g)
    targets /= targets.sum(-1, keepdim=True)
    ref = 0.0
    for b in range(B):
        for k in range(K):
            z = logits[b, k]
            lse = math.log(sum(math.exp(v) for v in z.tolist()))
            ref += -sum(targets[b, c].item() * (z[c].item() - lse) for c in range(C))
    ref /= B * K
    assert abs(soft_target_cross_entropy(logits, targets).item() - ref) < 1e-5


def test_hard_targets_match_torch_cross_entropy_with_smoothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2, 7, generator=g)
    labels = torch.randint(0, 7, (6,), generator=g)
    ours = soft_target_cross_entropy(logits, smooth_one_hot(labels, 7, 0.1))
    ref = torch.nn.functional.cross_entropy(logits.reshape(12, 7), labels.repeat_interleave(2), label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(smooth_one_hot(labels, 7, 0.1).sum(-1), torch.ones(6))


def test_loss_has_gradient_and_rejects_bad_targets():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    soft_target_cross_entropy(logits, smooth_one_hot(torch.tensor([0, 3]), 4)).backward()
    assert logits.grad.abs().sum() > 0
    try:
        soft_target_cross_entropy(logits, torch.ones(2, 5))
    except ValueError as e:
        assert "(B, K, C)" in str(e)
    else:
        raise AssertionError("expected a shape error")


def test_scoring_averages_softmax_over_variants_then_views():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, generator=g)  # B, V, A, C
    ref = torch.zeros(2, 5)
    for b in range(2):
        for v in range(3):
            for a in range(4):
                ref[b] += torch.softmax(logits[b, v, a], 0) / 12
    assert torch.allclose(view_probs(logits), ref, atol=1e-6)
    assert torch.allclose(variant_probs(logits[:, 0]), ref.new_tensor(torch.softmax(logits[:, 0], -1).mean(1)))


def test_many_variants_do_not_bias_top1():
    # Class 0 is right in every variant; class 1 has huge logits in one variant only.
    # Summing logits over variants picks class 1; per-variant softmax averaging picks class 0.
    A = 16
    logits = torch.zeros(1, A, 2)
    logits[0, :, 0] = 2.0
    logits[0, 0, 1] = 60.0
    assert logits.sum(1).argmax(-1).item() == 1
    probs = variant_probs(logits)
    assert probs.argmax(-1).item() == 0
    hits = topk_correct(probs, torch.tensor([0]), ks=(1, 5))
    assert hits[1].item() and hits[5].item()
