"""Kronecker mask: definition, masking behaviour, dense vs FlexAttention equality."""

import pytest
import torch

from claver_dist.model import kronecker_attention, kronecker_mask
from claver_dist.model.attention import flex_available, resolve_impl

SHAPES = [(1, 3), (2, 2), (3, 4), (4, 5), (8, 17)]
IMPLS = ["dense", "flex"]


@pytest.mark.parametrize("T,L", SHAPES)
def test_kmt_mask_is_kronecker_product(T, L):
    hidden = torch.kron(torch.eye(T), torch.ones(L, L) - torch.eye(L)).bool()
    assert torch.equal(kronecker_mask(T, L), ~hidden)


@pytest.mark.parametrize("T,L", SHAPES)
def test_kmct_mask_is_kronecker_product(T, L):
    hidden = torch.kron(torch.eye(T), torch.ones(L, L) - torch.eye(L)) + torch.kron(torch.ones(T, T).triu(1), torch.ones(L, L))
    assert torch.equal(kronecker_mask(T, L, causal=True), ~hidden.bool())


def test_mask_semantics_by_hand():
    m = kronecker_mask(2, 2)  # tokens: f0t0 f0t1 f1t0 f1t1
    assert m.tolist() == [[True, False, True, True], [False, True, True, True],
                          [True, True, True, False], [True, True, False, True]]
    c = kronecker_mask(2, 2, causal=True)
    assert c.tolist() == [[True, False, False, False], [False, True, False, False],
                          [True, True, True, False], [True, True, False, True]]


def _qkv(T, L, H=2, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, T * L, Dh, generator=g) for _ in range(3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_hidden_keys_do_not_matter_visible_ones_do(impl, causal):
    T, L = 3, 4
    q, k, v = _qkv(T, L)
    mask = kronecker_mask(T, L, causal)
    with torch.no_grad():
        base = kronecker_attention(q, k, v, T, causal, impl)
        for i in [0, 5, 11]:  # queries in frames 0, 1, 2
            for j in range(T * L):
                k2, v2 = k.clone(), v.clone()
                k2[..., j, :] += 3.0
                v2[..., j, :] += 3.0
                out = kronecker_attention(q, k2, v2, T, causal, impl)
                changed = not torch.allclose(out[..., i, :], base[..., i, :], atol=1e-6)
                assert changed == bool(mask[i, j]), (i, j, impl, causal)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,L", [(2, 5), (8, 17), (4, 50)])
def test_dense_and_flex_agree_forward(T, L, causal):
    q, k, v = _qkv(T, L, H=2, Dh=16, seed=1)
    with torch.no_grad():
        dense = kronecker_attention(q, k, v, T, causal, "dense")
        flex = kronecker_attention(q, k, v, T, causal, "flex")
    assert (dense - flex).abs().max() < 1e-5


def test_cpu_training_falls_back_to_dense(caplog):
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with caplog.at_level("INFO"):
        assert resolve_impl("flex", q) == "dense"
    assert resolve_impl("auto", q) == "dense"
    with torch.no_grad():
        assert resolve_impl("flex", q.detach()) == ("flex" if flex_available() else "dense")
    # and the dense path trains: gradients flow to q
    k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    kronecker_attention(q, k, v, 2, False, "flex").sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_dense_and_flex_agree_backward_gpu(causal):
    T, L, H, Dh = 8, 50, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(2, H, T * L, Dh, device="cuda", generator=g) for _ in range(3)]
    grads = {}
    for impl in IMPLS:
        qkv = [t.clone().requires_grad_(True) for t in base]
        out = kronecker_attention(*qkv, T, causal, impl)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads[impl] = (out.detach(), [t.grad for t in qkv])
    assert (grads["dense"][0] - grads["flex"][0]).abs().max() < 1e-4
    for a, b in zip(grads["dense"][1], grads["flex"][1]):
        assert (a - b).abs().max() < 1e-3
