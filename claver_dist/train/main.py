"""Training entry point, run once per process by a launcher (or alone as one process).

    python -m claver_dist.train configs/debug.yaml optim.lr=1e-4
    torchrun --nproc_per_node 2 -m claver_dist.train configs/debug.yaml
    python launch/local.py --nproc 2 configs/debug.yaml     # the same, with restarts and a clean Ctrl-C

Exit status, which the launchers act on:
  0  the run finished, or stopped cleanly after a checkpoint (a stop request, SIGTERM,
     SIGUSR1, SIGUSR2, Ctrl-C);
  2  refused to start: a bad config, a run folder held by another live launch, a resume
     with a config that changes what the run computes;
  3  an error that a restart cannot fix (a missing shard, a non-finite loss, a checkpoint
     that cannot be loaded): launchers do not restart after it;
  anything else (a crash, a failed checkpoint write, 124 from the hang watchdog, a signal):
  launchers restart from the latest complete checkpoint while restarts are left.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

EXIT_REFUSED = 2
EXIT_FATAL = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML recipe, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.num_frames=16")
    return p.parse_args(argv)


def run(config: str, overrides: list[str]) -> str:
    """Build the trainer, train, close; returns the trainer's status."""
    from claver_dist.config import load_config
    from claver_dist.distributed import DistEnv
    from claver_dist.train.metrics import setup_logging

    cfg = load_config(config, overrides)
    dist_env = DistEnv.from_environ(device=cfg.train.device)
    setup_logging(dist_env.rank)
    # one line per process in its node's log: where it runs
    print(f"claver-train: rank {dist_env.rank}/{dist_env.world_size} local {dist_env.local_rank} on "
          f"{socket.gethostname()} master {dist_env.master_addr}:{dist_env.master_port} {dist_env.backend} "
          f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)
    from claver_dist.train.trainer import Trainer

    trainer = Trainer(cfg, dist_env)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _fail(rank: str, code: int, error: BaseException, line: str) -> int:
    """One line on stderr, and the same in torch's error file under the elastic agent, so that
    the failure record (launch/elastic.py) names the error and not only the exit status."""
    print(f"claver-train: rank {rank}: {line}", file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:
            raise type(error)(line) from None
        except type(error) as e:
            ErrorHandler().record_exception(e)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from claver_dist.errors import (
        BankError, CheckpointError, CheckpointWriteError, ConfigChangeError, ConfigError, LabelsError,
        NonFiniteLossError, RunLockedError, ShardError,
    )

    rank = os.environ.get("RANK", "0")
    try:
        status = run(args.config, args.overrides)
    except (ConfigError, LabelsError, BankError, RunLockedError, ConfigChangeError) as e:
        return _fail(rank, EXIT_REFUSED, e, f"refused to start: {e}")
    except CheckpointWriteError as e:  # one line, and a restart may succeed
        return _fail(rank, 1, e, str(e))
    except (CheckpointError, ShardError, NonFiniteLossError) as e:
        return _fail(rank, EXIT_FATAL, e, f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a checkpoint
        print(f"claver-train: rank {rank}: interrupted", file=sys.stderr, flush=True)
        return 130
    print(f"claver-train: {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
