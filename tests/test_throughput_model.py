"""tools/throughput_model.py: the component arithmetic and which resource binds (no model built)."""

from __future__ import annotations

import argparse
import math

import pytest

from tools import throughput_model as tm


def model(**kw) -> "tm.scaling_model.Model":
    base = dict(name="m", params=178_000_000, trainable=178_000_000, text=63_000_000, temporal=28_000_000,
                embed=512, batch=8, accum=4, k=5, clip_flops=1.2e12, clip_bwd_flops=0.8e12, text_flops=15e12)
    base.update(kw)
    return tm.scaling_model.Model(**base)


def args(*argv: str) -> argparse.Namespace:
    return tm.parse_args(list(argv))


def test_the_slowest_resource_binds():
    m = model()
    slow_cpu = tm.components(m, 8, 224, 1, args("--decode-rate", "2", "--mfu", "0.5"))
    name, cap = tm.binding(slow_cpu)
    assert name == "CPU decode" and cap == pytest.approx(tm.resource_capacity(slow_cpu, "cpu"))
    slow_gpu = tm.components(m, 8, 224, 1, args("--decode-rate", "200", "--mfu", "0.05"))
    name, cap = tm.binding(slow_gpu)
    assert name == "GPU step" and cap == pytest.approx(tm.resource_capacity(slow_gpu, "gpu"))
    assert cap < min(tm.resource_capacity(slow_gpu, "cpu"), tm.resource_capacity(slow_gpu, "pcie"))
    # the uint8 alternative has its own CPU rate: a fast uint8 decoder moves the bound to the GPU
    mixed = tm.components(m, 8, 224, 1, args("--decode-rate", "2", "--decode-rate-uint8", "500", "--mfu", "0.3"))
    assert tm.binding(mixed)[0] == "CPU decode"
    assert tm.binding(mixed, "cpu-uint8", "pcie-uint8")[0] == "GPU step"


def test_gpu_components_add_up_per_clip():
    parts = tm.components(model(), 8, 224, 8, args())
    gpu = [c for c in parts if c.resource == "gpu"]
    assert len(gpu) >= 4  # vision, text, text collectives, ZeRO-2 collectives
    cap = tm.resource_capacity(parts, "gpu")
    assert cap < min(c.capacity for c in gpu)
    assert 1 / cap == pytest.approx(sum(1 / c.capacity for c in gpu))


def test_bytes_per_clip_and_uint8_quarter():
    assert tm.clip_bytes(8, 224, 4) == 4 * tm.clip_bytes(8, 224, 1) == 8 * 3 * 224 * 224 * 4
    parts = {c.name: c for c in tm.components(model(), 8, 224, 1, args("--pcie-gbs", "32"))}
    f32, u8 = parts["host-to-device copy, float32"], parts["host-to-device copy, uint8"]
    assert u8.capacity == pytest.approx(4 * f32.capacity)
    assert f32.capacity == pytest.approx(32e9 / tm.clip_bytes(8, 224, 4))


def test_text_work_is_split_and_collectives_appear_with_ranks():
    one = {c.name.split(" (")[0]: c for c in tm.components(model(), 8, 224, 1, args())}
    eight = {c.name.split(" (")[0]: c for c in tm.components(model(), 8, 224, 8, args())}
    assert eight["text fwd+bwd"].capacity == pytest.approx(8 * one["text fwd+bwd"].capacity)
    assert one["vision fwd+bwd"].capacity == eight["vision fwd+bwd"].capacity
    assert not any("all-gather" in k for k in one)
    assert "text all-gather + reduce-scatter" in eight and "ZeRO-2 gradient all-reduce + param all-gather" in eight
    # a frozen text tower: no text compute and no text collectives
    frozen = {c.name.split(" (")[0]: c for c in tm.components(model(text_flops=0.0), 8, 224, 8, args())}
    assert math.isinf(frozen["text fwd+bwd"].capacity)
    assert math.isinf(frozen["text all-gather + reduce-scatter"].capacity)


@pytest.mark.parametrize("n", [1, 8])
def test_needed_mfu_reaches_the_target(n):
    a = args("--target", "250")
    m = model()
    need = tm.needed_mfu(tm.components(m, 8, 224, n, a), m, n, a)
    at_need = tm.components(m, 8, 224, n, argparse.Namespace(**{**vars(a), "mfu": need}))
    assert tm.resource_capacity(at_need, "gpu") == pytest.approx(250, rel=1e-9)


def test_report_names_a_bound_for_every_gpu_count():
    text = tm.report(model(), 8, 224, args("--gpus", "1", "4"))
    assert text.count("binds first") == 4  # two input paths x two GPU counts
    assert "N = 1 GPU:" in text and "N = 4 GPUs:" in text
