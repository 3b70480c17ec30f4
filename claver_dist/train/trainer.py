"""The Trainer: CLAVER under DeepSpeed, one optimiser step at a time.

    trainer = Trainer(load_config("configs/debug.yaml"))
    status = trainer.train()      # "finished" or "stopped" (signal / request_stop)
    trainer.close()

One optimiser step = ``train.grad_accum`` micro-batches; per step the same K text variants
are drawn for every class (and every rank); the loss is soft-target cross-entropy over the
``B x K x C`` logits. With ``task: pretrain`` each clip comes with one of its captions and
the loss is the symmetric InfoNCE over the global batch (``train.contrastive``); validation
is then text/video retrieval (``eval.retrieval``).

Who owns what: the train loader owns the data position (the only epoch counter: an epoch
ends on a step boundary), the ``CheckpointManager`` (``claver_dist.checkpoint``) owns
saving, finding, converting and restoring, and this class owns the step counter, the
best validation score and the loop. The random state is derived from (seed, step, rank)
at every step, so a resumed run draws exactly the numbers the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import time
from collections import Counter
from typing import Any

import numpy as np
import psutil
import torch
from tqdm import tqdm

from claver_dist.checkpoint import CheckpointManager
from claver_dist.config import RunConfig, dump_config, save_config, to_dict
from claver_dist.data.augment import build_mixup
from claver_dist.data.loader import build_loader
from claver_dist.distributed import DistEnv
from claver_dist.errors import ConfigChangeError, NonFiniteLossError
from claver_dist.eval.evaluate import class_text_features, evaluate
from claver_dist.eval.retrieval import embed_pairs, retrieval_metrics
from claver_dist.model.weights import build_model_for
from claver_dist.text.prompts import load_bank, tokenize, trim_padding
from claver_dist.train.contrastive import contrastive_loss
from claver_dist.train.engine import build_engine
from claver_dist.train.loss import soft_target_cross_entropy
from claver_dist.train.metrics import MetricsWriter, count_flops, peak_flops, peak_memory_gb
from claver_dist.train import signals
from claver_dist.train.sharded_text import encode_text_sharded
from claver_dist.watchdog import Watchdog

log = logging.getLogger("claver_dist.train")

# marker file in the run folder once training, the last checkpoint and the export are done
FINISHED = "finished"

__all__ = ["FINISHED", "NonFiniteLossError", "Trainer"]


class Trainer:
    def __init__(self, cfg: RunConfig, dist_env: DistEnv | None = None):
        self.cfg = cfg
        self.dist = dist_env or DistEnv.from_environ(device=cfg.train.device)
        self.run_dir = cfg.resolved_run_dir()
        self.step = 0                 # optimiser steps done
        self.best_top1 = -1.0
        self.val_loader = self.zeroshot_loader = None
        self._stop_pending = False    # this rank's request (a signal); all ranks agree once per step
        self._agreed_stop = False     # what they agreed at the last step
        self.bad_micro_steps = 0
        self._batches = None          # the train loader's iterator over the current epoch
        self._since_log = {"time": time.perf_counter(), "clips": 0, "wait": 0.0}
        self.samples = 0              # clips trained on, all ranks together
        self._skips_at_epoch_start = 0
        self.watchdog: Watchdog | None = None
        self._keys_file = None        # log.sample_keys
        self._startup_s: float | None = None
        self._startup_logged = False
        try:
            self._setup()
        except BaseException:
            if getattr(self, "ckpt", None) is not None:
                self.ckpt.close()  # give the run lock back
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, d = self.cfg, self.dist
        d.init(timeout_s=cfg.train.collective_timeout_s)
        self.device = d.device
        # the run lock, the shared-folder check and the resume decision (with the config
        # comparison) come before anything is written to the run folder
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, d, config=to_dict(cfg))
        if d.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.pretrain = cfg.task == "pretrain"
        if self.pretrain:  # captions come with the clips: no classes (a prompt bank only for zero-shot)
            self.tokens, A, C = None, 0, None
            self.bank = (load_bank(cfg.text.labels, cfg.text.bank, cfg.text.kinds, cfg.text.use_templates)
                         if cfg.data.zeroshot_shards else None)
        else:
            self.bank = load_bank(cfg.text.labels, cfg.text.bank, cfg.text.kinds, cfg.text.use_templates)
            A, C = self.bank.num_variants, self.bank.num_classes
            # trimmed once here: the step's tokens go to the device as they are (no length read there)
            texts = self.bank.variant_texts(list(range(A)))
            self.tokens = trim_padding(tokenize(texts, cfg.text.context_length)).view(A, C, -1)

        torch.manual_seed(cfg.seed)  # identical fresh init on every rank
        model, fresh = build_model_for(cfg)
        if not cfg.model.train_text:
            for name, p in model.named_parameters():
                if name.startswith("clip.") and not name.startswith("clip.visual."):
                    p.requires_grad_(False)
        # pretraining's text work follows its captions' lengths: no FLOP count (nor MFU) there yet
        self.model_flops = self._count_model_flops(model) if cfg.log.count_flops and not self.pretrain else None

        accum = cfg.train.grad_accum = self._grad_accum_for_resume()
        self.train_loader = build_loader(cfg.data, "train", d.rank, d.world_size, cfg.seed, num_classes=C,
                                         device=self.device.type, grad_accum=accum, captions=self.pretrain)
        self.val_loader = (build_loader(cfg.data, "val", d.rank, d.world_size, cfg.seed, num_classes=C,
                                        device=self.device.type, captions=self.pretrain)
                           if cfg.data.val_shards else None)
        if self.pretrain and cfg.data.zeroshot_shards:
            zs = dataclasses.replace(cfg.data, val_shards=cfg.data.zeroshot_shards, val_split=cfg.data.zeroshot_split)
            self.zeroshot_loader = build_loader(zs, "val", d.rank, d.world_size, cfg.seed,
                                                num_classes=self.bank.num_classes, device=self.device.type)
        self.steps_per_epoch = len(self.train_loader) // accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        t = cfg.train
        self.mixup = None if self.pretrain else build_mixup(C, t.mixup_alpha, t.cutmix_alpha, t.mixup_switch_prob,
                                                            t.mixup_prob, t.label_smoothing)

        self.engine, self.scheduler = build_engine(model, cfg.train, cfg.optim, cfg.data.batch_size, d.world_size,
                                                   self.total_steps, warmup, load_universal=self.ckpt.resume_universal)
        self.model = self.engine.module
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ckpt.track(self.engine, trainer=self, loader=self.train_loader)
        self.ckpt.describe(total_batch=self.total_batch)
        fresh_hparams = self._optimizer_hparams()
        resumed = self.ckpt.restore()
        if resumed is not None:
            self._apply_config_changes(resumed.changes, fresh_hparams)
            log.info("resumed from %s at step %d (epoch %d)%s", resumed.path, self.step, self.epoch,
                     " via a universal checkpoint" if resumed.universal else "")
        elif fresh and cfg.model.pretrained:
            log.info("fresh parameters: %s", ", ".join(fresh))
        self.text_cache = self._frozen_text_features() if not (cfg.model.train_text or self.pretrain) else None
        self.metrics = MetricsWriter(self.run_dir, d.is_main, to_dict(cfg), cfg.log.wandb, cfg.log.wandb_project,
                                     cfg.log.wandb_mode, cfg.name)
        self.peak = peak_flops(self.device, cfg.log.peak_tflops)
        log.info("run %s: %d processes (%s, %s), %d steps (%d per epoch), total batch %d, %s",
                 self.run_dir, d.world_size, d.backend, self.device.type, self.total_steps, self.steps_per_epoch,
                 cfg.data.batch_size * accum * d.world_size,
                 "video-text pretraining (negatives: the %d clips of a micro-batch over all ranks)"
                 % (cfg.data.batch_size * d.world_size) if self.pretrain else f"{C} classes x {A} variants")

    def _grad_accum_for_resume(self) -> int:
        """``train.grad_accum`` for this world size. Resumed on another world size with the
        same per-rank batch, the run keeps its total batch (and so its steps, schedule and
        epoch boundaries) by accumulating more or fewer micro-batches; where no whole number
        does, it refuses unless ``checkpoint.allow_batch_change``. A config that itself
        changes data.batch_size or train.grad_accum gets what it asks for."""
        cfg, point, world = self.cfg, self.ckpt.resume_from, self.dist.world_size
        accum, batch = cfg.train.grad_accum, cfg.data.batch_size
        if point is None or point.world_size in (0, world):
            return accum
        saved = point.saved_config
        if saved is not None and (saved["data"]["batch_size"], saved["train"]["grad_accum"]) != (batch, accum):
            return accum
        total = point.total_batch()
        if total is None or total == batch * accum * world:
            return accum
        if total % (batch * world) == 0:
            log.warning("world size %d -> %d: train.grad_accum %d -> %d keeps the total batch of %d clips",
                        point.world_size, world, accum, total // (batch * world), total)
            return total // (batch * world)
        if cfg.checkpoint.allow_batch_change:
            log.warning("world size %d -> %d: total batch %d -> %d (checkpoint.allow_batch_change=true)",
                        point.world_size, world, total, batch * accum * world)
            return accum
        fits = [w for w in range(1, 2 * max(world, point.world_size) + 1) if total % (batch * w) == 0]
        raise ConfigChangeError(
            f"resuming {point.path} (total batch {total} = {point.world_size} ranks x ...) on {world} ranks: no "
            f"whole train.grad_accum keeps {total} clips per step with data.batch_size={batch} ({total} / "
            f"({batch} x {world}) is not whole); run on {', '.join(map(str, fits[-6:]))} ranks, change "
            "data.batch_size, or set checkpoint.allow_batch_change=true to train on with another total batch")

    def _count_model_flops(self, model) -> dict[str, float]:
        """Forward+backward FLOPs of one clip's vision work and one step's text work (fp32 copy)."""
        cfg = self.cfg
        K = min(cfg.text.num_sampled_variants, self.bank.num_variants)
        video = torch.zeros(1, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
        vision = count_flops(model.encode_video, video)
        text = count_flops(model.encode_text, self.tokens[:K].flatten(0, 1)) if cfg.model.train_text else 0
        model.zero_grad(set_to_none=True)
        return {"vision_per_clip": vision, "text_per_step": text}

    @torch.no_grad()
    def _frozen_text_features(self) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        feats = class_text_features(self.model, self.bank, self.device)
        self.model.train(was)
        return feats.to(self.dtype)

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        """The epoch in progress: the train loader's (it owns the data position)."""
        return self.train_loader.epoch

    @property
    def total_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.dist.world_size

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters; the checkpoint manager saves them with the engine and loader."""
        return {"step": self.step, "best_top1": self.best_top1, "samples": self.samples,
                "total_batch": self.total_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best_top1 = int(state["step"]), float(state["best_top1"])
        old_batch = int(state.get("total_batch", self.total_batch))
        self.samples = int(state.get("samples", self.step * old_batch))
        if old_batch != self.total_batch:
            # another total batch (world size, batch or accumulation): the run's position is
            # the clips trained on, so the schedule continues at the same fraction of training
            step = self.samples // self.total_batch
            log.warning("total batch %d -> %d: %d clips trained, so step %d continues as step %d",
                        old_batch, self.total_batch, self.samples, self.step, step)
            self.step = step

    def _optimizer_hparams(self) -> list[dict[str, Any]]:
        """What the config asks of each parameter group (before a checkpoint overwrites it)."""
        base = list(self.scheduler.base_lrs)
        return [{"initial_lr": b, "weight_decay": g["weight_decay"], "betas": g["betas"], "eps": g["eps"]}
                for b, g in zip(base, self.engine.optimizer.param_groups)]

    def _apply_config_changes(self, changes, fresh: list[dict[str, Any]]) -> None:
        """Make an allowed config change take effect on the resumed state: DeepSpeed restored the
        old optimiser hyper-parameters and the old base LRs; the schedule's shape (length,
        warm-up, floor) comes from the new config already. The step may have moved (another
        total batch), so the LR is set for it."""
        keys = {k for k, _, _ in changes}
        if any(k.startswith("optim.") for k in keys):
            for group, want in zip(self.engine.optimizer.param_groups, fresh):
                group.update(want)
            self.scheduler.base_lrs = [w["initial_lr"] for w in fresh]
        self.scheduler.last_epoch = self.step
        for group, base, fn in zip(self.engine.optimizer.param_groups, self.scheduler.base_lrs,
                                   self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.step)
        if keys & {"optim.lr", "optim.warmup_epochs", "optim.min_lr_ratio", "optim.warmup_prefix", "train.epochs",
                   "train.max_steps", "optim.scale_lr", "optim.lr_reference_batch", "optim.temporal_lr_mult"}:
            log.warning("the LR schedule follows the new config from step %d of %d: LR now %.3g (base %.3g)",
                        self.step, self.total_steps, self.engine.optimizer.param_groups[0]["lr"],
                        self.scheduler.base_lrs[0])

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Train to ``total_steps``; returns "finished", or "stopped" after a stop request (saved)."""
        self._install_signal_handlers()
        self._start_watchdog()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.log.progress_bar))
        self.engine.train()
        while self.step < self.total_steps:
            batches, epoch, wait = self._next_batches()
            metrics = self.train_step(batches)
            self.step += 1
            self.samples += self.total_batch
            self.watchdog.beat()
            bar.update(1)
            self._log_step(metrics, batches, epoch, wait, bar)
            if self.epoch != epoch:  # that step ended the epoch
                self._end_epoch()
            self.ckpt.maybe_save(self.step)
            if self._agree_to_stop():
                if not self.ckpt.has(self.step):
                    self.ckpt.save(self.step)
                bar.close()
                log.info("stop requested: saved at step %d, exiting", self.step)
                return "stopped"
        bar.close()
        self.watchdog.stop()  # what follows waits on rank 0's export; the collective timeout covers it
        self._finish()
        return "finished"

    def _next_batches(self) -> tuple[list[dict[str, Any]], int, float]:
        """The next step's ``grad_accum`` micro-batches, their epoch, and the seconds spent waiting.

        An epoch holds a whole number of steps (the loader rounds it), so a step never
        spans two epochs; when one ends, the loader has moved on and a new pass starts."""
        t0 = time.perf_counter()
        epoch = self.epoch
        group = []
        while len(group) < self.cfg.train.grad_accum:
            batch = next(self._batches, None) if self._batches is not None else None
            if batch is None:
                self._batches = iter(self.train_loader)
                continue
            group.append(batch)
        return group, epoch, time.perf_counter() - t0

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank had a stop request pending at this step's
        agreement (``_agree``, the step's one collective): every rank takes the same branch.
        A rank acting on its own signal would enter the checkpoint's collectives while the
        others start the next step (a deadlock, seen under SLURM's time limit); a request
        that comes after the agreement waits for the next step's."""
        return self._agreed_stop

    def _end_epoch(self) -> None:
        self._log_skips()
        if self.val_loader is not None and self.epoch % self.cfg.train.val_every_epochs == 0:
            self._validate()

    def _finish(self) -> None:
        """Validate weights that ended mid-epoch, save the last step, export, mark finished."""
        if self.train_loader.position[1] != 0 and self.val_loader is not None:
            self._validate()
        if not self.ckpt.has(self.step):
            self.ckpt.save(self.step)
        self.ckpt.export(self.run_dir / "export", dump_config(self.cfg))
        self._summarise_skips()
        if self.dist.is_main:  # written last: launchers (launch/slurm.py) never restart such a run
            (self.run_dir / FINISHED).write_text(f"step {self.step}\n")

    def _start_watchdog(self) -> None:
        """The hang watchdog (claver_dist.watchdog): ``train.hang_timeout_s``, or with 0 the
        longer of 10 minutes and 10x the slowest recent step."""
        timeout = self.cfg.train.hang_timeout_s or 600.0
        self.watchdog = Watchdog(timeout, self.run_dir / "hangs", self.dist.rank,
                                 startup_s=max(timeout, 1800.0) if not self.cfg.train.hang_timeout_s else timeout)
        self.watchdog.start()

    def _log_skips(self) -> None:
        """Bad samples met during the epoch that just ended, all ranks together."""
        events = self.train_loader.skip_events
        this_epoch, total, distinct = self.dist.all_sum([events - self._skips_at_epoch_start, events,
                                                         len(self.train_loader.skipped)])
        self._skips_at_epoch_start = events
        self.metrics.write({"step": self.step, "epoch": self.epoch - 1, "skipped_samples": int(this_epoch),
                            "skipped_total": int(total), "skipped_distinct": int(distinct)})
        if this_epoch:
            log.warning("epoch %d: %d bad samples skipped (%d distinct so far, all ranks)", self.epoch - 1,
                        int(this_epoch), int(distinct))

    def _summarise_skips(self) -> None:
        """Every bad sample of the run (all ranks): a count by reason in the log and
        ``<run_dir>/skipped.json`` (key -> reason)."""
        skipped: dict[str, str] = {}
        for part in self.dist.gather(dict(self.train_loader.skipped)):
            skipped.update(part)
        if not self.dist.is_main:
            return
        (self.run_dir / "skipped.json").write_text(json.dumps(skipped, indent=1, sort_keys=True))
        if not skipped:
            log.info("no bad samples met")
            return
        reasons = Counter(reason.split(":")[0][:60] for reason in skipped.values())
        first = ", ".join(f"{k} ({v[:60]})" for k, v in list(sorted(skipped.items()))[:5])
        log.warning("%d bad samples were skipped: %s; first: %s; all in %s", len(skipped),
                    ", ".join(f"{n} x {r}" for r, n in reasons.most_common()), first, self.run_dir / "skipped.json")

    # ------------------------------------------------------------------ one step
    def _reseed(self) -> None:
        s = (self.cfg.seed * 1_000_003 + self.step * 1009 + self.dist.rank) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def _skip_if_nonfinite(self, loss: torch.Tensor, where: str) -> tuple[torch.Tensor, bool]:
        """``train.on_nonfinite=skip``: all ranks agree on this micro-batch now (a host read per
        micro-batch, the price of skipping: it must be known before the backward pass). A
        non-finite loss on any rank drops the micro-batch on all; returns the loss to
        back-propagate and whether it was dropped."""
        bad = self.dist.sum_(torch.stack([(~torch.isfinite(loss.detach())).double()])).item() > 0
        if not bad:
            self.bad_micro_steps = 0
            return loss, False
        self.bad_micro_steps += 1
        if self.bad_micro_steps > self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} ({where}): "
                                     f"{self.bad_micro_steps} bad micro-batches in a row")
        log.warning("non-finite loss at step %d (%s): skipping this micro-batch (train.on_nonfinite=skip)",
                    self.step + 1, where)
        # a zero loss through every trainable parameter keeps DeepSpeed's accumulation count in step
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad), True

    def _agree(self, stats: torch.Tensor, n: int) -> tuple[float, bool, bool]:
        """Once per optimiser step, before it is taken: the ranks sum ``stats`` (per micro-batch
        non-finite flags, the finite losses, non-finite gradients, stop requests) in one
        collective and read it in one host synchronisation. A non-finite loss under
        ``on_nonfinite=error`` stops here, naming the step and micro-batch, before the update.
        Returns (mean loss over ranks and kept micro-batches, whether the gradients overflowed
        (the step is skipped), whether the ranks stop after this step)."""
        overflow = self._grads_overflow()
        if overflow is not None:
            stats[n + 1] = overflow.double()
        stats[-1] = float(self._stop_pending)
        values = self.dist.sum_(stats).tolist()
        flags, loss_sum, overflows, stops = values[:n], values[n], values[n + 1], values[n + 2]
        bad = [i for i, f in enumerate(flags) if f > 0]
        if bad and self.cfg.train.on_nonfinite == "error":
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}, micro-batch "
                                     f"{bad[0] + 1} of {n}, on {int(flags[bad[0]])} of {self.dist.world_size} ranks)")
        if overflows > 0:
            # what DeepSpeed's own check does under bf16: no update this step, gradients dropped
            log.warning("non-finite gradients at step %d (finite loss): the optimiser step is skipped", self.step + 1)
            self.engine.optimizer.check_grad_overflow = True  # DeepSpeed's step checks again and skips
        kept = n - len(bad)
        return (loss_sum / (kept * self.dist.world_size) if kept else float("nan")), overflows > 0, stops > 0

    def _grads_overflow(self) -> torch.Tensor | None:
        """A device flag: non-finite values in this rank's reduced gradient partitions (ZeRO 1/2
        under bf16, where the engine's config leaves this check to the trainer), else None."""
        opt = self.engine.optimizer
        check = getattr(opt, "has_overflow_partitioned_grads_serial", None)
        if check is None or getattr(opt, "check_grad_overflow", True):
            return None
        return check().reshape(())

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss over ranks.

        Text: the step's K*C prompts are encoded (sharded over ranks) and, with
        ``text.encode_once_per_step``, reused by every micro-batch: earlier micro-batches
        see a detached copy whose gradient is accumulated, and the last one
        back-propagates that gradient through the text tower in the same backward pass.

        Host synchronisation: one per step (``_agree``), plus one per micro-batch with
        ``train.on_nonfinite=skip``; losses and flags stay on the device until then."""
        self._reseed()
        if self.pretrain:
            return self._pretrain_step(batches)
        K = self.cfg.text.num_sampled_variants
        per_micro = self.cfg.text.variant_sampling == "per_micro_batch"
        idx = self.bank.sample_indices(K, torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step))
        K = len(idx)
        once = self.text_cache is None and self.cfg.text.encode_once_per_step and not per_micro
        text = self._step_text_features(idx) if once else None
        leaf = text.detach().requires_grad_(True) if once and len(batches) > 1 else None
        n = len(batches)
        stats = torch.zeros(n + 3, dtype=torch.float64, device=self.device)  # flags, loss sum, grads, stop
        for i, batch in enumerate(batches):
            last = i == n - 1
            video = batch["video"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            video, target = self.mixup(video, label)
            if per_micro:  # the official draw: K with replacement, per micro-batch and rank
                idx = torch.randint(self.bank.num_variants, (K,)).tolist()
            if self.text_cache is not None:
                feats = self.text_cache[idx].flatten(0, 1)
            elif once:
                feats = text if (leaf is None or last) else leaf
            else:
                feats = self._step_text_features(idx)
            logits = self.engine(video.to(self.dtype), num_variants=K, text_features=feats)
            loss = self._account(soft_target_cross_entropy(logits, target), stats, i, n)
            if leaf is not None and last and leaf.grad is not None:
                # DeepSpeed divides every micro-batch loss by grad_accum; the accumulated
                # leaf gradient already carries that factor, so undo it for this term.
                loss = loss + (text * leaf.grad).sum() * self.cfg.train.grad_accum
            self.engine.backward(loss)
            if last:
                mean_loss, overflowed, self._agreed_stop = self._agree(stats, n)
            self.engine.step()
        self._after_overflow(overflowed)
        return {"loss": mean_loss}

    def _pretrain_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step of video-text pretraining: per micro-batch, every rank encodes its
        clips and their captions, and the symmetric InfoNCE runs over the clips of all ranks
        (``train.contrastive``: all-gather with autograd, each rank's own rows)."""
        n = len(batches)
        stats = torch.zeros(n + 3, dtype=torch.float64, device=self.device)  # flags, loss sum, grads, stop
        for i, batch in enumerate(batches):
            video = batch["video"].to(self.device, non_blocking=True).to(self.dtype)
            tokens = trim_padding(tokenize(batch["caption"], self.cfg.text.context_length))
            with torch.set_grad_enabled(self.cfg.model.train_text):
                text = self.model.encode_text(tokens.to(self.device, non_blocking=True))
            loss = contrastive_loss(self.model.encode_video(video), text, self.model.logit_scale,
                                    self.model.logit_scale_max)
            self.engine.backward(self._account(loss, stats, i, n))
            if i == n - 1:
                mean_loss, overflowed, self._agreed_stop = self._agree(stats, n)
            self.engine.step()
        self._after_overflow(overflowed)
        return {"loss": mean_loss}

    def _after_overflow(self, overflowed: bool) -> None:
        """After a step skipped for non-finite gradients, the check goes back to the trainer
        (``_agree``): DeepSpeed only clears its flag when it checks itself."""
        if overflowed:
            self.engine.optimizer.check_grad_overflow = False
            self.engine.optimizer.overflow = False

    def _account(self, loss: torch.Tensor, stats: torch.Tensor, i: int, n: int) -> torch.Tensor:
        """Record micro-batch ``i`` of ``n`` in the step's device stats (its non-finite flag and
        finite loss); with ``train.on_nonfinite=skip`` the ranks agree on it now. Returns the
        loss to back-propagate."""
        finite = torch.isfinite(loss.detach())
        if self.cfg.train.on_nonfinite == "skip":
            loss, dropped = self._skip_if_nonfinite(loss, f"epoch {self.epoch}, micro-batch {i + 1} of {n}")
            stats[i] = float(dropped)
        else:
            stats[i] = (~finite).double()
        stats[n] += torch.where(finite, loss.detach().double(), 0.0)
        return loss

    def _step_text_features(self, idx: list[int]) -> torch.Tensor:
        tokens = self.tokens[idx].flatten(0, 1)
        if self.cfg.text.shard_text:
            return encode_text_sharded(self.model, tokens, self.device)
        return self.model.encode_text(tokens.to(self.device, non_blocking=True))

    def _validate(self) -> dict[str, Any]:
        if self.pretrain:
            return self._validate_retrieval()
        result = self.evaluate()
        best = result["top1"] > self.best_top1
        if best:
            self.best_top1 = result["top1"]
            if self.dist.is_main:
                (self.run_dir / "best.txt").write_text(f"step {self.step} top1 {result['top1']:.4f}\n")
        self.metrics.write({"step": self.step, "epoch": self.epoch, "val_top1": result["top1"],
                            "val_top5": result["top5"], "val_samples": result["num_samples"], "best": best})
        log.info("val step %d: top-1 %.2f%%, top-5 %.2f%% on %d clips%s", self.step, 100 * result["top1"],
                 100 * result["top5"], result["num_samples"], " (best)" if best else "")
        return result

    def _validate_retrieval(self) -> dict[str, Any]:
        """Text->video and video->text retrieval on the captioned val split; the best
        checkpoint is the one with the highest mean R@1 (kept in ``best_top1``)."""
        beat = self.watchdog.beat if self.watchdog is not None else None
        _, video, text = embed_pairs(self.model, self.val_loader, self.device, self.dtype,
                                     self.cfg.text.context_length, on_batch=beat)
        r = retrieval_metrics(video, text)
        if self.zeroshot_loader is not None:  # the prompt bank's classes on a labelled split
            zs = self.evaluate(self.zeroshot_loader)
            r.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"], zeroshot_samples=zs["num_samples"])
        best = r.get("r1_mean", -1.0) > self.best_top1
        if best:
            self.best_top1 = r["r1_mean"]
            if self.dist.is_main:
                (self.run_dir / "best.txt").write_text(f"step {self.step} r1_mean {r['r1_mean']:.4f}\n")
        self.metrics.write({"step": self.step, "epoch": self.epoch, "best": best,
                            **{f"val_{k}": v for k, v in r.items()}})
        if r["num_samples"]:
            log.info("val step %d: text->video R@1 %.2f%% R@5 %.2f%% R@10 %.2f%% MdR %g, video->text R@1 %.2f%% "
                     "on %d pairs%s%s", self.step, 100 * r["t2v_r1"], 100 * r["t2v_r5"], 100 * r["t2v_r10"],
                     r["t2v_median_rank"], 100 * r["v2t_r1"], r["num_samples"],
                     f"; zero-shot top-1 {100 * r['zeroshot_top1']:.2f}%" if "zeroshot_top1" in r else "",
                     " (best)" if best else "")
        return r

    def evaluate(self, loader=None) -> dict[str, Any]:
        """Single-view top-1/top-5 on the val loader, text features once, averaged over all variants."""
        was = self.model.training
        self.model.eval()
        text = self.text_cache if self.text_cache is not None else \
            class_text_features(self.model, self.bank, self.device)
        beat = self.watchdog.beat if self.watchdog is not None else None
        result = evaluate(self.model, loader or self.val_loader, text, self.device, self.dtype, on_batch=beat)
        self.model.train(was)
        return result

    def _log_step(self, metrics: dict[str, float], batches: list[dict[str, Any]], epoch: int, wait: float,
                  bar) -> None:
        """Accumulate throughput; every ``log.every_steps`` (and at the last step) write a row."""
        cfg, d, since = self.cfg, self.dist, self._since_log
        if cfg.log.sample_keys:
            self._write_keys(batches, epoch)
        if self._startup_s is None:  # this process's first step: start-up cost at this scale
            self._startup_s = time.time() - psutil.Process().create_time()
        since["clips"] += sum(len(b["label"]) for b in batches)
        since["wait"] += wait
        if self.step % cfg.log.every_steps and self.step != self.total_steps:
            return
        elapsed = max(time.perf_counter() - since["time"], 1e-9)
        clips = since["clips"]
        clips_per_s = clips / elapsed
        row = {"step": self.step, "epoch": epoch, "loss": metrics["loss"],
               "lr": self.scheduler.get_last_lr()[0], "clips_per_s": clips_per_s,
               "clips_per_s_total": clips_per_s * d.world_size, "data_wait_s": since["wait"],
               "step_time_s": elapsed / max(1, cfg.log.every_steps), "peak_mem_gb": peak_memory_gb(self.device)}
        if self.model_flops:
            micro_steps = clips / cfg.data.batch_size
            flops = clips * self.model_flops["vision_per_clip"] + micro_steps * self.model_flops["text_per_step"]
            row["tflops_per_s"] = flops / elapsed / 1e12
            row["mfu"] = flops / elapsed / self.peak if self.peak else None
        if not self._startup_logged:
            row["startup_s"] = self._startup_s  # process start to the end of its first step
            row["rss_gb"] = psutil.Process().memory_info().rss / 2**30
            self._startup_logged = True
        self.metrics.write(row)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{row['clips_per_s_total']:.1f}")
        if not cfg.log.progress_bar:
            log.info("step %d/%d loss %.4f lr %.2e %.1f clips/s (total) wait %.2fs mem %.2fGB",
                     self.step, self.total_steps, metrics["loss"], row["lr"], row["clips_per_s_total"],
                     since["wait"], row["peak_mem_gb"])
        self._since_log = {"time": time.perf_counter(), "clips": 0, "wait": 0.0}

    def _write_keys(self, batches: list[dict[str, Any]], epoch: int) -> None:
        if self._keys_file is None:
            path = self.run_dir / "samples" / f"rank_{self.dist.rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._keys_file = open(path, "a", buffering=1)
        keys = [k for b in batches for k in b["key"]]
        self._keys_file.write(json.dumps({"step": self.step, "epoch": epoch, "keys": keys}) + "\n")

    # ------------------------------------------------------------------ stopping
    def request_stop(self) -> None:
        """Ask the run to checkpoint and stop at the end of a step. Only a pending flag: the
        ranks act on it together, once they agree (``_agree_to_stop``)."""
        self._stop_pending = True

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1, SIGUSR2 (SLURM's time-limit and preemption warning) and Ctrl-C
        (SIGINT) save at the end of the step and stop; a second Ctrl-C stops at once, without
        a checkpoint. Whether a stop is followed by a requeue is the launcher's business."""
        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_pending:
                raise KeyboardInterrupt
            log.warning("received %s: checkpointing at the next step%s", signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        held = signals.take()
        if held:
            log.warning("received %s during start-up: checkpointing after the first step", ", ".join(held))
            self.request_stop()

    def close(self) -> None:
        # the loaders' worker processes ignore job signals (data/cpu.py), so an exit would
        # wait on them forever: they are shut down here, in order
        self.train_loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        if self.zeroshot_loader is not None:
            self.zeroshot_loader.close()
        if self._keys_file is not None:
            self._keys_file.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        self.metrics.close()
        self.ckpt.close()
