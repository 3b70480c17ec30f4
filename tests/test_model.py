"""CLAVER model: CLIP equivalence, weight loading, interpolation, shapes."""

import open_clip
import pytest
import torch

from claver_dist.model import Claver, ModelConfig, build_model, export_open_clip_state_dict, load_pretrained
from claver_dist.model.weights import interpolate_temporal_embedding, register_model_configs


@pytest.fixture(scope="module")
def b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()


def test_frames_equal_open_clip_image_and_text_features(b32):
    model = Claver(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), num_frames=1, temporal="none")
    load_pretrained(model, b32.state_dict())
    model.eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 224, 224)
    tokens = open_clip.tokenize(["a video of a person dancing.", "juggling balls", "x"])
    with torch.no_grad():
        ours = model.encode_frames(images[:, None])[:, 0]
        ref = b32.encode_image(images)
        assert (ours - ref).abs().max() < 1e-5
        assert torch.allclose(model.encode_video(images[:, None]), ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)
        assert (model.encode_text(tokens) - b32.encode_text(tokens, normalize=True)).abs().max() < 1e-5


def test_load_consumes_every_clip_key_and_reports_temporal(b32):
    model = Claver(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), num_frames=4, temporal="kmt")
    fresh = load_pretrained(model, b32.state_dict())
    assert len(model.temporal_blocks) == 4  # 12 layers // 3
    assert sorted(fresh) == sorted(model.temporal_parameter_names())
    assert "temporal_embedding" in fresh and all(k.startswith("temporal_") for k in fresh)
    for k, v in b32.state_dict().items():
        mine = model.logit_scale if k == "logit_scale" else model.state_dict()[f"clip.{k}"]
        assert torch.equal(mine.reshape(v.shape), v), k


def _debug_model(**kw):
    register_model_configs()
    return Claver(open_clip.create_model("claver-debug", pretrained=None), **kw)


def test_mismatched_checkpoint_names_first_bad_key_and_shapes():
    model = _debug_model(num_frames=2)
    sd = dict(model.state_dict())
    sd["clip.visual.proj"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"clip\.visual\.proj.*\(64, 32\).*\(64, 64\)"):
        load_pretrained(_debug_model(num_frames=2), sd)
    sd2 = dict(model.state_dict())
    sd2.pop("clip.token_embedding.weight")
    with pytest.raises(KeyError, match="clip.token_embedding.weight"):
        load_pretrained(_debug_model(num_frames=2), sd2)
    with pytest.raises(KeyError, match="visual.extra"):
        load_pretrained(_debug_model(num_frames=2), {**model.state_dict(), "clip.visual.extra": torch.zeros(1)})


def test_claver_checkpoint_roundtrip_with_temporal_interpolation():
    torch.manual_seed(0)
    src = _debug_model(num_frames=8, temporal="kmct")
    dst = _debug_model(num_frames=32, temporal="kmct")
    fresh = load_pretrained(dst, src.state_dict())
    assert fresh == []
    assert dst.temporal_embedding.shape == (1, 32, 64)
    assert torch.equal(dst.temporal_blocks[0].attn.in_proj.weight, src.temporal_blocks[0].attn.in_proj.weight)
    # interpolation keeps a constant embedding constant and the endpoints' order
    const = torch.ones(1, 8, 4) * 3
    assert torch.allclose(interpolate_temporal_embedding(const, 32), torch.ones(1, 32, 4) * 3)
    ramp = torch.arange(8.0).view(1, 8, 1)
    up = interpolate_temporal_embedding(ramp, 32)[0, :, 0]
    assert torch.all(up[1:] >= up[:-1]) and up[0] == 0 and up[-1] == 7


def test_positional_embedding_resized_for_larger_images(tmp_path):
    register_model_configs()
    small = open_clip.create_model("claver-debug", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(small.state_dict(), path)
    model, fresh = build_model(ModelConfig(clip_model="claver-debug", pretrained=str(path), temporal="kmt"),
                               num_frames=4, image_size=96)
    assert model.clip.visual.positional_embedding.shape == (37, 64)  # (96/16)^2 + 1
    assert set(fresh) == set(model.temporal_parameter_names())
    out = model.encode_video(torch.randn(1, 4, 3, 96, 96))
    assert out.shape == (1, 64)


def test_export_loads_into_open_clip():
    model, _ = build_model(ModelConfig(clip_model="claver-debug"), num_frames=2, image_size=64)
    clip = open_clip.create_model("claver-debug", pretrained=None)
    clip.load_state_dict(export_open_clip_state_dict(model), strict=True)
    assert clip.logit_scale.dim() == 0 and torch.equal(clip.logit_scale.reshape(1), model.logit_scale.data)


def test_no_zero_dim_parameters_and_shapes():
    model, _ = build_model(ModelConfig(clip_model="claver-debug", temporal="kmt"), num_frames=4, image_size=64)
    assert all(p.dim() > 0 for p in model.parameters())
    assert len(model.temporal_blocks) == 2  # 6 layers // 3
    video = torch.randn(2, 4, 3, 64, 64)
    tokens = open_clip.tokenize(["a", "b", "c"] * 2)
    logits = model(video, tokens, num_variants=2)
    assert logits.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="8 frames"):
        model.encode_video(torch.randn(1, 8, 3, 64, 64))


def test_temporal_blocks_change_features_and_see_order():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(clip_model="claver-debug", temporal="kmt"), num_frames=4, image_size=64)
    model.eval()
    video = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        fwd = model.encode_video(video)
        rev = model.encode_video(video.flip(1))
    assert not torch.allclose(fwd, rev, atol=1e-4)  # the temporal embedding makes order visible
    base = Claver(model.clip, num_frames=4, temporal="none").eval()
    with torch.no_grad():
        assert torch.allclose(base.encode_video(video), base.encode_video(video.flip(1)), atol=1e-5)


@pytest.mark.parametrize("mode", ["temporal", "spatial", "all"])
def test_activation_checkpointing_same_grads(mode):
    torch.manual_seed(0)
    ref, _ = build_model(ModelConfig(clip_model="claver-debug"), num_frames=2, image_size=64)
    ck, _ = build_model(ModelConfig(clip_model="claver-debug", grad_checkpointing=mode), num_frames=2, image_size=64)
    ck.load_state_dict(ref.state_dict())
    video = torch.randn(2, 2, 3, 64, 64)
    for m in (ref, ck):
        m.train()
        m.encode_video(video).pow(2).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ck.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), n
