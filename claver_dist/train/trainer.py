"""The Trainer: CLAVER under DeepSpeed, one optimiser step at a time.

    trainer = Trainer(load_config("configs/debug.yaml"))
    status = trainer.train()      # "finished" or "stopped" (signal / request_stop)
    trainer.close()

One optimiser step = ``train.grad_accum`` micro-batches; per step the same K text variants
are drawn for every class (and every rank); the loss is soft-target cross-entropy over the
``B x K x C`` logits. Everything a restart needs (DeepSpeed model/optimizer/scheduler
state, step, epoch, loader position, best accuracy) is saved by the CheckpointManager;
the random state is derived from (seed, step, rank) at every step, so a resumed run draws
exactly the numbers the uninterrupted one did.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from claver_dist.config import RunConfig, save_config, to_dict
from claver_dist.data.augment import build_mixup
from claver_dist.data.loader import build_loader
from claver_dist.distributed import DistEnv
from claver_dist.eval.evaluate import class_text_features, evaluate
from claver_dist.model import build_model
from claver_dist.text.prompts import load_bank, tokenize
from claver_dist.train import checkpoint as ckpt_lib
from claver_dist.train.engine import build_engine
from claver_dist.train.loss import soft_target_cross_entropy
from claver_dist.train.sharded_text import encode_text_sharded
from claver_dist.train.metrics import MetricsWriter, count_flops, peak_flops, peak_memory_gb

log = logging.getLogger("claver_dist.train")

# marker file in the run folder once training, the last checkpoint and the export are done
FINISHED = "finished"


class NonFiniteLossError(FloatingPointError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig, dist_env: DistEnv | None = None):
        self.cfg = cfg
        self.dist = dist_env or DistEnv.from_environ(device=cfg.train.device)
        self.run_dir = cfg.resolved_run_dir()
        self.step = 0                 # optimiser steps done
        self.epoch = 0
        self.micro_in_epoch = 0       # micro-batches consumed in the current epoch
        self.best_top1 = -1.0
        self.stop_requested = False   # agreed by all ranks (all-reduced every micro-step)
        self._stop_pending = False    # this rank's request (a signal), agreed at the next all-reduce
        self.bad_micro_steps = 0
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, d = self.cfg, self.dist
        d.init()
        self.device = d.device
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.bank = load_bank(cfg.text.labels, cfg.text.bank, cfg.text.kinds, cfg.text.use_templates)
        A, C = self.bank.num_variants, self.bank.num_classes
        self.tokens = tokenize(self.bank.variant_texts(list(range(A))), cfg.text.context_length).view(A, C, -1)

        torch.manual_seed(cfg.seed)  # identical fresh init on every rank
        model, fresh = build_model(cfg.model, cfg.data.num_frames, cfg.data.image_size)
        if not cfg.model.train_text:
            for name, p in model.named_parameters():
                if name.startswith("clip.") and not name.startswith("clip.visual."):
                    p.requires_grad_(False)
        self.model_flops = self._count_model_flops(model) if cfg.log.count_flops else None

        self.train_loader = build_loader(cfg.data, "train", d.rank, d.world_size, cfg.seed, num_classes=C,
                                         device=self.device.type)
        self.val_loader = (build_loader(cfg.data, "val", d.rank, d.world_size, cfg.seed, num_classes=C,
                                        device=self.device.type) if cfg.data.val_shards else None)
        accum = cfg.train.grad_accum
        self.steps_per_epoch = len(self.train_loader) // accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_loader)} batches per epoch per rank < train.grad_accum={accum}: "
                             f"too little data in {cfg.data.train_shards} for this batch size and world size")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        t = cfg.train
        self.mixup = build_mixup(C, t.mixup_alpha, t.cutmix_alpha, t.mixup_switch_prob, t.mixup_prob,
                                 t.label_smoothing)

        resume = self._find_resume()
        universal = resume is not None and ckpt_lib.needs_universal(resume, d.world_size)
        self.engine, self.scheduler = build_engine(model, cfg.train, cfg.optim, cfg.data.batch_size,
                                                   d.world_size, self.total_steps, warmup, load_universal=universal)
        self.model = self.engine.module
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ckpt = ckpt_lib.CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                               d.rank, d.world_size)
        if resume is not None:
            self._resume(resume, universal)
        elif fresh and cfg.model.pretrained:
            log.info("fresh parameters: %s", ", ".join(fresh))
        self.text_cache = self._frozen_text_features() if not cfg.model.train_text else None
        self.metrics = MetricsWriter(self.run_dir, d.is_main, to_dict(cfg), cfg.log.wandb, cfg.log.wandb_project,
                                     cfg.log.wandb_mode, cfg.name)
        self.peak = peak_flops(self.device, cfg.log.peak_tflops)
        log.info("run %s: %d processes (%s, %s), %d steps (%d per epoch), total batch %d, %d classes x %d variants",
                 self.run_dir, d.world_size, d.backend, self.device.type, self.total_steps, self.steps_per_epoch,
                 cfg.data.batch_size * accum * d.world_size, C, A)

    def _count_model_flops(self, model) -> dict[str, float]:
        """Forward+backward FLOPs of one clip's vision work and one step's text work (fp32 copy)."""
        cfg = self.cfg
        K = min(cfg.text.num_sampled_variants, self.bank.num_variants)
        video = torch.zeros(1, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
        vision = count_flops(model.encode_video, video)
        text = count_flops(model.encode_text, self.tokens[:K].flatten(0, 1)) if cfg.model.train_text else 0
        model.zero_grad(set_to_none=True)
        return {"vision_per_clip": vision, "text_per_step": text}

    def _find_resume(self):
        c = self.cfg.checkpoint
        if c.resume:
            return ckpt_lib.resolve_resume(c.resume)
        if c.auto_resume:
            return ckpt_lib.find_latest(self.run_dir / "checkpoints")
        return None

    def _resume(self, path, universal: bool) -> None:
        load_dir, tag = ckpt_lib.make_universal(path, self.dist.rank) if universal else (path.parent, path.name)
        client = ckpt_lib.load(self.engine, load_dir, tag, universal)
        self.load_state_dict(client)
        log.info("resumed from %s at step %d (epoch %d)%s", path, self.step, self.epoch,
                 " via a universal checkpoint" if universal else "")

    @torch.no_grad()
    def _frozen_text_features(self) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        feats = class_text_features(self.model, self.bank, self.device)
        self.model.train(was)
        return feats.to(self.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Client state saved next to DeepSpeed's (which holds model, optimizer and scheduler)."""
        return {"step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "best_top1": self.best_top1, "loader": self.train_loader.state_dict(), "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.micro_in_epoch, self.best_top1 = state["micro_in_epoch"], state["best_top1"]
        self.train_loader.load_state_dict(state["loader"])

    def save(self) -> None:
        path = self.ckpt.save(self.engine, self.step, self.state_dict())
        log.info("saved checkpoint %s", path)

    # ------------------------------------------------------------------ training
    def _reseed(self) -> None:
        s = (self.cfg.seed * 1_000_003 + self.step * 1009 + self.dist.rank) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _check_finite(self, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """All ranks agree on a non-finite loss; 'error' stops, 'skip' drops the micro-batch."""
        bad = 0.0 if torch.isfinite(loss).item() else 1.0
        loss_sum, bad_any, stop_any = self._all_reduce([loss.item() if not bad else 0.0, bad,
                                                        float(self._stop_pending)])
        self.stop_requested = stop_any > 0
        if not bad_any:
            self.bad_micro_steps = 0
            return loss, loss_sum / self.dist.world_size
        self.bad_micro_steps += 1
        where = f"non-finite loss at step {self.step + 1} (epoch {self.epoch}, micro-batch {self.micro_in_epoch})"
        if self.cfg.train.on_nonfinite == "error" or self.bad_micro_steps > self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(where + ("" if self.cfg.train.on_nonfinite == "error" else
                                              f": {self.bad_micro_steps} bad micro-batches in a row"))
        log.warning("%s: skipping this micro-batch (train.on_nonfinite=skip)", where)
        # a zero loss through every trainable parameter keeps DeepSpeed's accumulation count in step
        zero = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        return zero, float("nan")

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss over ranks.

        Text: the step's K*C prompts are encoded (sharded over ranks) and, with
        ``text.encode_once_per_step``, reused by every micro-batch: earlier micro-batches
        see a detached copy whose gradient is accumulated, and the last one
        back-propagates that gradient through the text tower in the same backward pass."""
        self._reseed()
        K = self.cfg.text.num_sampled_variants
        idx = self.bank.sample_indices(K, torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step))
        K = len(idx)
        once = self.text_cache is None and self.cfg.text.encode_once_per_step
        text = self._step_text_features(idx) if once else None
        leaf = text.detach().requires_grad_(True) if once and len(batches) > 1 else None
        losses = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            video = batch["video"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            video, target = self.mixup(video, label)
            if self.text_cache is not None:
                feats = self.text_cache[idx].flatten(0, 1)
            elif once:
                feats = text if (leaf is None or last) else leaf
            else:
                feats = self._step_text_features(idx)
            logits = self.engine(video.to(self.dtype), num_variants=K, text_features=feats)
            loss, mean_loss = self._check_finite(soft_target_cross_entropy(logits, target))
            if leaf is not None and last and leaf.grad is not None:
                # DeepSpeed divides every micro-batch loss by grad_accum; the accumulated
                # leaf gradient already carries that factor, so undo it for this term.
                loss = loss + (text * leaf.grad).sum() * self.cfg.train.grad_accum
            self.engine.backward(loss)
            self.engine.step()
            self.micro_in_epoch += 1
            losses.append(mean_loss)
        finite = [v for v in losses if not np.isnan(v)]
        return {"loss": float(np.mean(finite)) if finite else float("nan")}

    def _step_text_features(self, idx: list[int]) -> torch.Tensor:
        tokens = self.tokens[idx].flatten(0, 1)
        if self.cfg.text.shard_text:
            return encode_text_sharded(self.model, tokens, self.device)
        return self.model.encode_text(tokens.to(self.device, non_blocking=True))

    def _micro_batches(self):
        """Yield lists of ``grad_accum`` micro-batches for the rest of this epoch, timing the waits."""
        accum = self.cfg.train.grad_accum
        if self.micro_in_epoch == 0:
            self.train_loader.set_epoch(self.epoch)
        remaining = (self.steps_per_epoch * accum - self.micro_in_epoch) // accum
        it = iter(self.train_loader)
        for _ in range(remaining):
            t0 = time.perf_counter()
            group = [next(it) for _ in range(accum)]
            yield group, time.perf_counter() - t0

    def train(self) -> str:
        """Train to ``total_steps``; returns "finished", or "stopped" after a stop request (saved)."""
        self._install_signal_handlers()
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.dist.is_main and cfg.log.progress_bar),
                   desc="train", dynamic_ncols=True)
        self.engine.train()
        t_last, clips_since, wait_since = time.perf_counter(), 0, 0.0
        while self.step < self.total_steps:
            for batches, wait in self._micro_batches():
                metrics = self.train_step(batches)
                self.step += 1
                bar.update(1)
                clips_since += sum(len(b["label"]) for b in batches)
                wait_since += wait
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - t_last
                    self._log_step(metrics, clips_since, elapsed, wait_since, bar)
                    t_last, clips_since, wait_since = time.perf_counter(), 0, 0.0
                if self.stop_requested:
                    self.save()
                    bar.close()
                    log.info("stop requested: saved at step %d, exiting", self.step)
                    return "stopped"
                if self.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                if self.step >= self.total_steps:
                    break
            else:  # the epoch ran out
                self._end_epoch()
                continue
            break
        bar.close()
        if self.micro_in_epoch and self.step >= self.total_steps and self.val_loader is not None:
            self._validate()
        if not ckpt_lib.is_complete(self.ckpt.root / ckpt_lib.tag_for(self.step)):
            self.save()
        self.export()
        self._mark_finished()
        return "finished"

    def _mark_finished(self) -> None:
        """``<run_dir>/finished``, written last: launchers (launch/slurm.py) never restart such a run."""
        if self.dist.is_main:
            (self.run_dir / FINISHED).write_text(f"step {self.step}\n")

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.micro_in_epoch = 0
        if self.val_loader is not None and self.epoch % self.cfg.train.val_every_epochs == 0:
            self._validate()

    def _validate(self) -> dict[str, Any]:
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

    def evaluate(self, loader=None) -> dict[str, Any]:
        """Single-view top-1/top-5 on the val loader, text features once, averaged over all variants."""
        was = self.model.training
        self.model.eval()
        text = self.text_cache if self.text_cache is not None else \
            class_text_features(self.model, self.bank, self.device)
        result = evaluate(self.model, loader or self.val_loader, text, self.device, self.dtype)
        self.model.train(was)
        return result

    def _log_step(self, metrics: dict[str, float], clips: int, elapsed: float, wait: float, bar) -> None:
        cfg, d = self.cfg, self.dist
        clips_per_s = clips / max(elapsed, 1e-9)
        row = {"step": self.step, "epoch": self.epoch, "loss": metrics["loss"],
               "lr": self.scheduler.get_last_lr()[0], "clips_per_s": clips_per_s,
               "clips_per_s_total": clips_per_s * d.world_size, "data_wait_s": wait,
               "step_time_s": elapsed / max(1, cfg.log.every_steps), "peak_mem_gb": peak_memory_gb(self.device)}
        if self.model_flops:
            micro_steps = clips / cfg.data.batch_size
            flops = clips * self.model_flops["vision_per_clip"] + micro_steps * self.model_flops["text_per_step"]
            row["tflops_per_s"] = flops / max(elapsed, 1e-9) / 1e12
            row["mfu"] = flops / max(elapsed, 1e-9) / self.peak if self.peak else None
        self.metrics.write(row)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{row['clips_per_s_total']:.1f}")
        if not cfg.log.progress_bar:
            log.info("step %d/%d loss %.4f lr %.2e %.1f clips/s (total) wait %.2fs mem %.2fGB",
                     self.step, self.total_steps, metrics["loss"], row["lr"], row["clips_per_s_total"], wait,
                     row["peak_mem_gb"])

    def export(self) -> None:
        """Consolidated fp32 weights + config for evaluate/predict, and the open_clip part."""
        latest = ckpt_lib.find_latest(self.ckpt.root)
        if self.dist.is_main and latest is not None:
            out = ckpt_lib.export_weights(latest, self.run_dir / "export",
                                          (self.run_dir / "config.yaml").read_text())
            log.info("exported %s", out)
        self.dist.barrier()

    # ------------------------------------------------------------------ stopping
    def request_stop(self) -> None:
        """Ask the run to checkpoint and stop at the next step boundary (all ranks agree).

        Only a pending flag: a signal can land between the all-reduce and the step-end check,
        and a rank acting on it alone would enter the checkpoint's collectives while the
        others start the next step (a deadlock, seen under SLURM's time-limit signal)."""
        self._stop_pending = True

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            log.warning("received %s: checkpointing at the next step", signal.Signals(signum).name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def close(self) -> None:
        self.metrics.close()
