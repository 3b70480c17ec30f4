"""Training entry point, run once per process by a launcher (or alone as one process).

    python -m claver_dist.train configs/debug.yaml optim.lr=1e-4
    torchrun --nproc_per_node 2 -m claver_dist.train configs/debug.yaml
    python launch/local.py --nproc 2 configs/debug.yaml     # the same, via torchrun

Exit code 0 when the run finished or stopped cleanly after a checkpoint (a stop request
or SIGTERM/SIGUSR1), non-zero on errors.
"""

from __future__ import annotations

import argparse
import sys


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
    from claver_dist.train.trainer import Trainer

    trainer = Trainer(cfg, dist_env)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from claver_dist.config import ConfigError

    try:
        status = run(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"claver-train: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
