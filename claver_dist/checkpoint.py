"""Checkpoints: the one owner of saving and restoring a run.

The ``CheckpointManager`` is handed the stateful parts of a run (the DeepSpeed engine, and
every object with ``state_dict``/``load_state_dict``: the trainer's counters, the train
loader's position) and owns everything about them on disk:

    manager = CheckpointManager(cfg.checkpoint, run_dir, dist_env, config=to_dict(cfg))
    engine = build_engine(..., load_universal=manager.resume_universal)  # decided before the engine exists
    manager.track(engine, trainer=trainer, loader=train_loader)
    manager.restore()                 # if there is something to resume: load and apply to each part
    ...
    manager.maybe_save(step)          # the cadence: every checkpoint.every_steps
    manager.save(step)                # on a stop request
    manager.export(run_dir / "export", config_yaml)

Layout under ``<run_dir>/checkpoints/``::

    step_00001000/          DeepSpeed files (model states + each rank's ZeRO shard)
        meta.json           step, world size, time
        COMPLETE            written last: a checkpoint without it is ignored
    latest                  name of the newest complete checkpoint (replaced atomically)
    universal/step_...      DeepSpeed universal form, made on demand to resume on another world size

A crash or kill in the middle of a save leaves a folder without ``COMPLETE``; ``latest``
still names the previous checkpoint, and the next save or start cleans nothing it needs.
Pruning keeps the last ``checkpoint.keep_last`` complete checkpoints and never the newest
one less.

Where to resume from: ``checkpoint.resume=PATH`` (a checkpoint, a run folder or its
``checkpoints/``), else with ``checkpoint.auto_resume`` the run folder's latest complete
checkpoint. One written by another number of processes is converted once with DeepSpeed's
``ds_to_universal`` and loaded with ``load_universal``.

Export: consolidated fp32 weights as ``model.safetensors`` + the resolved ``config.yaml``
(what evaluate/predict load) and ``open_clip.pt`` (the CLIP part, loadable by
``open_clip.create_model(name, pretrained=path)``). ``locate_weights`` and
``load_weights`` read any of these forms back, for evaluation, without the engine.

torch and DeepSpeed are imported where they are used, so that ``claver_dist.config``
(which holds ``CheckpointConfig``) stays cheap to import.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from claver_dist.errors import CheckpointError, CheckpointWriteError, ConfigChangeError, require
from claver_dist.files import atomic_write
from claver_dist.runlock import RunLock, launch_id

if TYPE_CHECKING:
    import torch

    from claver_dist.distributed import DistEnv

log = logging.getLogger("claver_dist.checkpoint")

COMPLETE = "COMPLETE"
LATEST = "latest"


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto-resume from the run folder's latest complete checkpoint on start.
    auto_resume: bool = True
    # or resume from this checkpoint directory explicitly.
    resume: str | None = None
    # resume even though the config changed what the run computes (model, data, batch,
    # seed, optimiser, schedule): the change takes effect from the resumed step.
    allow_config_change: bool = False
    # resuming on another world size keeps the checkpoint's total batch (clips per optimiser
    # step) by recomputing train.grad_accum; where no whole grad_accum does, the resume is
    # refused unless this allows the total batch to change (the step then follows the clips
    # trained, and the epoch continues exactly where it stopped).
    allow_batch_change: bool = False

    def validate(self) -> None:
        require(self.every_steps >= 1, "checkpoint.every_steps", ">= 1", self.every_steps)
        require(self.keep_last >= 1, "checkpoint.keep_last", ">= 1 (the newest checkpoint is always kept)",
                self.keep_last)


# --------------------------------------------------------------------------- the layout


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def _complete_under(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` first, else a scan)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = _complete_under(root)
    return done[-1] if done else None


def resolve_resume(path: str | Path) -> Path:
    """``resume=PATH``: a checkpoint folder, or a run folder / checkpoints folder holding some."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if is_complete(cand):
            return cand
        latest = find_latest(cand) if cand.is_dir() else None
        if latest is not None:
            return latest
    raise CheckpointError(f"checkpoint.resume={path}: no complete checkpoint there "
                          f"(a folder with {COMPLETE}, or a run folder holding checkpoints/)")


def needs_universal(ckpt: Path, world_size: int) -> bool:
    return read_meta(ckpt)["world_size"] != world_size


# --------------------------------------------------------------------------- config changes

# Keys whose change cannot make a resumed run compute anything else than the uninterrupted
# one would have (or only its logs, evaluation and checkpoint cadence): accepted on resume.
HARMLESS_KEYS = (
    "name", "run_dir", "log.", "eval.", "checkpoint.", "model.pretrained", "model.attention",
    "model.compile", "model.grad_checkpointing", "model.checkpoint_every", "data.num_workers", "data.prefetch",
    "data.val_shards", "data.val_split", "data.verify_checksum", "text.shard_text", "text.encode_once_per_step",
    "train.val_every_epochs", "train.on_nonfinite", "train.max_bad_steps", "train.hang_timeout_s",
    "train.collective_timeout_s",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every key that differs."""
    a, b = _flatten(saved), _flatten(now)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


# --------------------------------------------------------------------------- the manager


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ResumePoint:
    path: Path        # the complete checkpoint to load
    universal: bool   # written by another world size: load through the universal form
    changes: tuple[tuple[str, Any, Any], ...] = ()  # config keys that differ from the checkpoint's
    meta: dict[str, Any] = field(default_factory=dict)  # its meta.json: step, world_size, total_batch
    saved_config: dict[str, Any] | None = None          # the config it was written with

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size", 0))

    def total_batch(self) -> int | None:
        """Clips per optimiser step of the run that wrote it (older checkpoints: from its config)."""
        if "total_batch" in self.meta:
            return int(self.meta["total_batch"])
        c = self.saved_config
        if c is None or not self.world_size:
            return None
        return int(c["data"]["batch_size"]) * int(c["train"]["grad_accum"]) * self.world_size


class CheckpointManager:
    """Owns the run folder's checkpoints: the lock, the resume decision (with the config
    comparison), saving, converting, loading, pruning and export.

    Construction is collective (every rank): rank 0 takes the run lock, every rank checks
    that it sees the same run folder, and the resume point is chosen. A breaking config
    change against that checkpoint raises ConfigChangeError unless
    ``checkpoint.allow_config_change``."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, dist_env: DistEnv,
                 config: dict[str, Any] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.dist = dist_env
        self.config = config or {}
        self.engine = None
        self.parts: dict[str, Stateful] = {}
        self.meta_fields: dict[str, Any] = {}
        self.lock = RunLock(self.run_dir)
        self._collectively(lambda: self.lock.acquire() if self.dist.is_main else None, "taking the run lock")
        try:
            self._check_shared_folder()
            self.resume_from = self._collectively(self._find_resume, "choosing the checkpoint to resume from")
        except BaseException:
            self.close()
            raise

    def _collectively(self, fn, what: str):
        """Run ``fn`` on every rank; if it raises on any, raise on all (a lone raising rank
        would leave the others waiting in the next collective)."""
        error: BaseException | None = None
        out = None
        try:
            out = fn()
        except (CheckpointError, OSError) as e:
            error = e
        errors = self.dist.gather(None if error is None else f"{type(error).__name__}: {error}")
        if any(errors):
            if error is not None:
                raise error
            rank = next(i for i, e in enumerate(errors) if e)
            raise CheckpointError(f"{what} failed on rank {rank}: {errors[rank]}")
        return out

    def _check_shared_folder(self) -> None:
        """Every rank must see the run folder rank 0 writes (one shared file system)."""
        token = self.dist.gather(f"{launch_id()}-{time.time_ns()}" if self.dist.is_main else None)[0]
        probe = self.run_dir / f".shared-{token}"
        if self.dist.is_main:
            atomic_write(probe, token)
        self.dist.barrier()
        seen = self.dist.gather((probe.is_file(), socket.gethostname()))
        self.dist.barrier()
        if self.dist.is_main:
            probe.unlink(missing_ok=True)
        blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
        if blind:
            raise CheckpointError(f"{self.run_dir} is not one folder shared by all ranks: {', '.join(blind)} "
                                  f"cannot see the file rank 0 wrote there (on {seen[0][1]}); put run_dir on a file "
                                  "system every node mounts")

    # -- what to resume from (known before the engine is built)
    def _find_resume(self) -> ResumePoint | None:
        if self.cfg.resume:
            path = resolve_resume(self.cfg.resume)
        elif self.cfg.auto_resume:
            path = find_latest(self.root)
        else:
            path = None
        if path is None:
            return None
        saved = path / "config.json"
        return ResumePoint(path, needs_universal(path, self.dist.world_size), self._compare(path),
                           read_meta(path) if (path / "meta.json").is_file() else {},
                           json.loads(saved.read_text()) if saved.is_file() else None)

    def _compare(self, ckpt: Path) -> tuple[tuple[str, Any, Any], ...]:
        """The config changes since ``ckpt`` was written; refuses breaking ones unless allowed."""
        saved_path = ckpt / "config.json"
        if not saved_path.is_file() or not self.config:
            log.warning("%s holds no config: the new config is not compared with the one it was written with", ckpt)
            return ()
        changes = config_changes(json.loads(saved_path.read_text()), self.config)
        breaking = [c for c in changes if not is_harmless(c[0])]
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in breaking)
        if breaking and not self.config.get("checkpoint", {}).get("allow_config_change"):
            raise ConfigChangeError(
                f"resuming from {ckpt} with a config that changes what it computes ({listing}); start a new "
                "run folder, undo the change, or set checkpoint.allow_config_change=true to continue with it")
        if breaking:
            log.warning("resuming with changed config (checkpoint.allow_config_change=true): %s", listing)
        for k, a, b in changes:
            if is_harmless(k):
                log.info("resuming with %s: %r -> %r", k, a, b)
        return tuple(changes)

    @property
    def resume_universal(self) -> bool:
        """Whether the engine must be built with DeepSpeed's ``load_universal``."""
        return self.resume_from is not None and self.resume_from.universal

    def track(self, engine, **parts: Stateful) -> None:
        """The engine (model, optimizer, scheduler: DeepSpeed's own files) and the named parts
        whose ``state_dict`` rides along in the checkpoint's client state."""
        self.engine = engine
        self.parts = dict(parts)

    def describe(self, **fields: Any) -> None:
        """Extra fields for every checkpoint's meta.json (read back as ``ResumePoint.meta``)."""
        self.meta_fields.update(fields)

    # -- restore
    def restore(self) -> ResumePoint | None:
        """Load the resume point into the engine and every part; None when starting fresh."""
        point = self.resume_from
        if point is None:
            return None
        if point.universal:
            load_dir, tag = self._make_universal(point.path)
        else:
            load_dir, tag = point.path.parent, point.path.name
        path, client = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        states = _parts_of((client or {}).get("claver", {}))
        for name, part in self.parts.items():
            if name not in states:
                raise CheckpointError(f"{point.path}: the checkpoint has no state for {name!r}")
            part.load_state_dict(states[name])
        return point

    def _make_universal(self, ckpt: Path) -> tuple[Path, str]:
        """Convert ``ckpt`` with ``ds_to_universal`` (rank 0, once); returns (load_dir, tag)."""
        out_dir = ckpt.parent / "universal"
        out = out_dir / ckpt.name

        def convert() -> None:
            if not self.dist.is_main or is_complete(out):
                return
            shutil.rmtree(out, ignore_errors=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            log.info("converting %s to a universal checkpoint (world size changed)", ckpt)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                   "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise CheckpointError(f"ds_to_universal failed on {ckpt}:\n{res.stderr[-3000:]}")
            shutil.copy(ckpt / "meta.json", out / "meta.json")
            atomic_write(out / COMPLETE, "")

        self._collectively(convert, f"converting {ckpt}")
        return out_dir, ckpt.name

    # -- save
    def should_save(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def maybe_save(self, step: int) -> Path | None:
        """Save when the cadence says so."""
        return self.save(step) if self.should_save(step) else None

    def has(self, step: int) -> bool:
        return is_complete(self.root / tag_for(step))

    def save(self, step: int) -> Path:
        """Collective: every rank writes its shard, then rank 0 marks it complete and prunes.

        A failed write (a full disk, a lost mount) on any rank fails the save on every rank
        with one line naming the path and the free space; the partial checkpoint is removed
        and ``latest`` keeps naming the previous complete one."""
        tag = tag_for(step)
        path = self.root / tag

        def prepare() -> None:
            if self.dist.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if path.exists():  # an earlier incomplete try at this step
                    shutil.rmtree(path, ignore_errors=True)

        def write_shards() -> None:
            client = {"parts": {name: part.state_dict() for name, part in self.parts.items()},
                      "config": self.config}
            try:
                self.engine.save_checkpoint(str(self.root), tag=tag, client_state={"claver": client},
                                            save_latest=False)
            except (OSError, RuntimeError) as e:
                # the other ranks may already wait in DeepSpeed's closing barrier: meet them there
                self.dist.barrier()
                raise OSError(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__) from e

        def mark_complete() -> None:
            if self.dist.is_main:
                atomic_write(path / "meta.json", json.dumps(
                    {"step": step, "world_size": self.dist.world_size, "time": time.time(), **self.meta_fields}))
                atomic_write(path / "config.json", json.dumps(self.config))
                atomic_write(path / COMPLETE, "")
                atomic_write(self.root / LATEST, tag)

        for what, fn in (("preparing", prepare), ("writing", write_shards), ("marking", mark_complete)):
            try:
                self._collectively(fn, f"{what} checkpoint {path}")
            except (CheckpointError, OSError) as e:
                # judged before the partial checkpoint is removed (which frees space)
                full = "no space left on the device: " if _out_of_space(e) or _nearly_full(self.root) else ""
                self._discard(path)
                raise CheckpointWriteError(f"saving checkpoint {path} failed: {full}{e}; {_free_space(self.root)}; "
                                           f"latest is still {find_latest(self.root) or 'none'}") from None
            self.dist.barrier()  # every rank's shard is on disk before the marker
        if self.dist.is_main:
            self.prune()
        self.dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def _discard(self, path: Path) -> None:
        """Remove an incomplete checkpoint folder (rank 0), so that it does not fill the disk."""
        if self.dist.is_main and path.exists() and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (at least the newest one), and
        remove leftovers of interrupted saves."""
        done = _complete_under(self.root)
        keep = max(1, self.cfg.keep_last)
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / old.name, ignore_errors=True)
        latest = done[-1].name if done else None
        for p in self.root.glob("step_*"):
            if p.is_dir() and not is_complete(p) and p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # -- export
    def export(self, out_dir: str | Path, config_yaml: str) -> Path | None:
        """Consolidated weights of the latest complete checkpoint (rank 0 writes; collective)."""
        latest = find_latest(self.root)
        out = None
        if self.dist.is_main and latest is not None:
            out = export_weights(latest, out_dir, config_yaml)
            log.info("exported %s", out)
        self.dist.barrier()
        return out

    def close(self) -> None:
        if self.dist.is_main:
            self.lock.release()


# How a write that ran out of space reads, whichever rank reports it and however it was
# wrapped: the OS's ENOSPC and EDQUOT messages, and torch's zip writer finding fewer bytes
# on disk than it wrote (``torch.save`` on a full disk: a RuntimeError with no errno).
OUT_OF_SPACE = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def _out_of_space(error: BaseException) -> bool:
    return any(text in str(error) for text in OUT_OF_SPACE)


def _nearly_full(path: Path) -> bool:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < min(64 * 2**20, 0.01 * usage.total)


def _free_space(path: Path) -> str:
    """"N.N GB free of M GB on <mount>" for the file system holding ``path``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:
        return f"free space unknown ({e})"
    return f"{usage.free / 2**30:.2f} GB free of {usage.total / 2**30:.2f} GB on the file system of {probe}"


def _parts_of(client: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Part states from a checkpoint's client state, also from the layout before ``parts``
    (step/epoch/micro_in_epoch/best_top1/loader at the top level)."""
    if "parts" in client:
        return client["parts"]
    if "loader" in client:
        return {"trainer": {"step": client["step"], "best_top1": client.get("best_top1", -1.0)},
                "loader": client["loader"]}
    return {}


# --------------------------------------------------------------------------- weights out and back


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint, its ZeRO shards merged."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.contiguous() for k, v in sd.items()}


def export_weights(ckpt: Path, out_dir: str | Path, config_yaml: str) -> Path:
    """Consolidate ZeRO shards into fp32 ``model.safetensors`` + ``config.yaml`` (+ ``open_clip.pt``)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = consolidated_state_dict(ckpt)
    save_file(sd, str(out / "model.safetensors"), metadata={"source": str(ckpt)})
    (out / "config.yaml").write_text(config_yaml)
    clip = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
    if "logit_scale" in sd:
        clip["logit_scale"] = sd["logit_scale"].reshape(())
    torch.save(clip, out / "open_clip.pt")
    return out


@dataclass(frozen=True)
class WeightsLocation:
    kind: str        # "export" (model.safetensors) or "deepspeed" (a complete checkpoint)
    path: Path       # the export folder or the checkpoint folder
    config: Path     # the run's config.yaml


def locate_weights(path: str | Path) -> WeightsLocation:
    """Trained weights from an export folder, a complete checkpoint, or a run folder (its
    ``export/``, else its latest complete checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return WeightsLocation("export", path, path / "config.yaml")
    if is_complete(path):
        return WeightsLocation("deepspeed", path, path.parent.parent / "config.yaml")
    if (path / "export" / "model.safetensors").is_file():
        return WeightsLocation("export", path / "export", path / "export" / "config.yaml")
    latest = find_latest(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return WeightsLocation("deepspeed", latest, path / "config.yaml")
    raise FileNotFoundError(f"{path}: no model.safetensors, complete checkpoint, or run folder with either")


def load_weights(where: WeightsLocation) -> dict[str, torch.Tensor]:
    """The fp32 state dict at ``where``."""
    if where.kind == "export":
        from safetensors.torch import load_file

        return load_file(str(where.path / "model.safetensors"))
    return consolidated_state_dict(where.path)
