"""The checkpoint manager on a real DeepSpeed engine (one process, gloo, CPU): cadence, save
and prune, resolve ``resume=PATH``, restore into every part."""

from __future__ import annotations

import json
import os

import pytest
import torch

from claver_dist import checkpoint as ckpt_lib
from claver_dist.checkpoint import CheckpointConfig, CheckpointManager
from claver_dist.distributed import DistEnv
from claver_dist.errors import CheckpointError
from claver_dist.train.config import OptimConfig, TrainConfig


class Counter:
    """A stateful part, as the trainer and the loader are."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


@pytest.fixture(scope="module")
def dist_env():
    """A one-process group (DeepSpeed needs one); init exports RANK etc., put back afterwards."""
    import os

    saved = dict(os.environ)
    d = DistEnv.from_environ({}, device="cpu")
    d.init()
    yield d
    os.environ.clear()
    os.environ.update(saved)


def make_engine(seed: int):
    from claver_dist.train.engine import build_engine

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    engine, _ = build_engine(model, TrainConfig(precision="fp32"), OptimConfig(lr=0.1, scale_lr=False,
                                                                                 warmup_epochs=0),
                             micro_batch=2, world_size=1, total_steps=10, warmup_steps=0)
    return engine


def train_one_step(engine) -> None:
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_cadence(dist_env, tmp_path):
    m = CheckpointManager(CheckpointConfig(every_steps=3), tmp_path, dist_env)
    assert [s for s in range(1, 10) if m.should_save(s)] == [3, 6, 9]
    assert m.resume_from is None and not m.resume_universal


@pytest.mark.parametrize("keep_last", [0, 2])
def test_save_and_prune_never_deletes_the_newest(dist_env, tmp_path, keep_last):
    engine = make_engine(0)
    m = CheckpointManager(CheckpointConfig(every_steps=1, keep_last=keep_last), tmp_path, dist_env)
    part = Counter()
    m.track(engine, counter=part)
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)  # an interrupted save's leftover
    for step in range(1, 5):
        train_one_step(engine)
        part.value = step
        assert m.maybe_save(step) == tmp_path / "checkpoints" / ckpt_lib.tag_for(step)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == [ckpt_lib.tag_for(s) for s in ([4] if keep_last == 0 else [3, 4])]
    assert (tmp_path / "checkpoints" / "latest").read_text() == ckpt_lib.tag_for(4)
    assert ckpt_lib.read_meta(tmp_path / "checkpoints" / ckpt_lib.tag_for(4)) | {"time": 0} == \
        {"step": 4, "world_size": 1, "time": 0}
    assert m.has(4) and not m.has(1)


def test_resolve_resume_from_run_checkpoints_or_checkpoint(dist_env, tmp_path):
    engine = make_engine(0)
    m = CheckpointManager(CheckpointConfig(keep_last=3), tmp_path / "run", dist_env)
    m.track(engine)
    for step in (1, 2):
        train_one_step(engine)
        m.save(step)
    newest = tmp_path / "run" / "checkpoints" / ckpt_lib.tag_for(2)
    older = tmp_path / "run" / "checkpoints" / ckpt_lib.tag_for(1)
    assert ckpt_lib.resolve_resume(tmp_path / "run") == newest
    assert ckpt_lib.resolve_resume(tmp_path / "run" / "checkpoints") == newest
    assert ckpt_lib.resolve_resume(older) == older
    (newest / ckpt_lib.COMPLETE).unlink()  # as if the save had been cut: the older one is the latest
    assert ckpt_lib.resolve_resume(tmp_path / "run") == older
    with pytest.raises(CheckpointError, match=f"checkpoint.resume={tmp_path / 'nothing'}: no complete checkpoint"):
        ckpt_lib.resolve_resume(tmp_path / "nothing")
    # explicit resume wins over the run folder's own; another world size needs the universal form
    other = CheckpointManager(CheckpointConfig(resume=str(older)), tmp_path / "other", dist_env)
    assert other.resume_from.path == older and not other.resume_universal
    meta = json.loads((older / "meta.json").read_text())
    (older / "meta.json").write_text(json.dumps(meta | {"world_size": 2}))
    assert CheckpointManager(CheckpointConfig(resume=str(older)), tmp_path / "other", dist_env).resume_universal
    assert CheckpointManager(CheckpointConfig(auto_resume=False), tmp_path / "run", dist_env).resume_from is None


def test_restore_applies_the_state_to_every_part(dist_env, tmp_path):
    engine = make_engine(0)
    m = CheckpointManager(CheckpointConfig(), tmp_path, dist_env, config={"name": "x"})
    trainer, loader = Counter(), Counter()
    m.track(engine, trainer=trainer, loader=loader)
    for step in (1, 2, 3):
        train_one_step(engine)
    trainer.value, loader.value = 3, 17
    m.save(3)
    saved = weights(engine)

    fresh = make_engine(1)  # other weights, other optimizer state
    assert not all(torch.equal(a, b) for a, b in zip(weights(fresh), saved))
    m2 = CheckpointManager(CheckpointConfig(), tmp_path, dist_env)
    trainer2, loader2 = Counter(), Counter()
    m2.track(fresh, trainer=trainer2, loader=loader2)
    point = m2.restore()
    assert point.path.name == ckpt_lib.tag_for(3) and not point.universal
    assert (trainer2.value, loader2.value) == (3, 17)
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), saved))
    # the next step from the restored state equals the next step of the original
    torch.manual_seed(5)
    train_one_step(engine)
    torch.manual_seed(5)
    train_one_step(fresh)
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(engine)))
    # a part the checkpoint has no state for is an error naming it
    m3 = CheckpointManager(CheckpointConfig(), tmp_path, dist_env)
    m3.track(make_engine(1), trainer=Counter(), sampler=Counter())
    with pytest.raises(CheckpointError, match="no state for 'sampler'"):
        m3.restore()


def test_checkpoints_of_the_earlier_layout_still_resume():
    old = {"step": 7, "epoch": 1, "micro_in_epoch": 2, "best_top1": 0.5, "loader": {"epoch": 1, "batch": 2},
           "config": {}}
    assert ckpt_lib._parts_of(old) == {"trainer": {"step": 7, "best_top1": 0.5}, "loader": {"epoch": 1, "batch": 2}}


def test_locate_weights_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors, complete checkpoint, or run folder"):
        ckpt_lib.locate_weights(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"")
    where = ckpt_lib.locate_weights(tmp_path)
    assert (where.kind, where.path, where.config) == ("export", tmp_path / "export",
                                                      tmp_path / "export" / "config.yaml")


def test_export_writes_consolidated_weights(dist_env, tmp_path):
    from safetensors.torch import load_file

    engine = make_engine(0)
    m = CheckpointManager(CheckpointConfig(), tmp_path, dist_env)
    m.track(engine)
    train_one_step(engine)
    m.save(1)
    out = m.export(tmp_path / "export", "name: x\n")
    sd = load_file(str(out / "model.safetensors"))
    assert set(sd) == {n for n, _ in engine.module.named_parameters()}
    assert all(torch.equal(sd[n], p.detach()) for n, p in engine.module.named_parameters())
    assert (out / "config.yaml").read_text() == "name: x\n"
    assert ckpt_lib.load_weights(ckpt_lib.locate_weights(tmp_path)).keys() == sd.keys()


def test_a_full_disk_is_recognised_from_the_write_error_alone(tmp_path):
    """torch.save on a full file system fails with torch's own RuntimeError and no errno; a
    plain write with ENOSPC. Both read as "no space left" whatever space the disk shows later
    (another rank may already have removed its partial files); other failures do not."""
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a small tmpfs")
    from conftest import small_tmpfs

    errors = []
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        for write in (lambda: torch.save({"w": torch.zeros(600_000)}, disk / "a.pt"),
                      lambda: (disk / "b.bin").write_bytes(bytes(3 * 2**20))):  # fmt: skip
            with pytest.raises((RuntimeError, OSError)) as info:
                write()
            errors.append(info.value)
    assert isinstance(errors[0], RuntimeError) and isinstance(errors[1], OSError)
    wrapped = OSError(str(errors[0]).splitlines()[-1])  # as the save path re-raises it
    wrapped.__cause__ = errors[0]
    assert all(ckpt_lib._out_of_space(e) for e in (*errors, wrapped))
    assert not ckpt_lib._out_of_space(PermissionError(13, "Permission denied"))
    assert not ckpt_lib._out_of_space(OSError("Connection reset by peer"))
