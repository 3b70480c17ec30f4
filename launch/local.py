"""Start a training run on this machine: one or more processes under torch's elastic agent.

    python launch/local.py configs/debug.yaml                       # one process
    python launch/local.py --nproc 2 configs/debug.yaml optim.lr=1e-4
    python launch/local.py --nproc 8 configs/k400_b16_8f.yaml       # one process per GPU
    python launch/local.py --preflight --nproc 2 configs/debug.yaml # measure, don't train

``--preflight`` runs ``claver_dist.preflight`` in the same processes instead of the trainer:
device, all-reduce, shard reads, loader clips/s, free space, shared folder and clocks per
rank, one table, ``<run_dir>/preflight.json``, an estimate of the run's time; exit 0 when
every check passed (no restarts; docs/training.md, "Preflight").

Before any process starts, the config is validated (a bad key or value exits 2, once) and
the run folder's lock is checked (a folder another live launch holds exits 2, naming it).
A process that crashes, is killed or hangs (``train.hang_timeout_s``) makes every process
restart from the latest complete checkpoint, at most ``--max-failures`` times; each
failure is recorded in ``<run_dir>/restarts.jsonl`` (launch/elastic.py). Ctrl-C or SIGTERM
checkpoints at the end of the step and exits 0; a second Ctrl-C stops at once.

On CPU the cores are split evenly between processes (OMP_NUM_THREADS), which also makes
numerics reproducible; on GPUs each process takes one device (LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="restarts after a crashed or hung process before the run fails (default 3)")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (0 = a free one)")
    p.add_argument("--preflight", action="store_true",
                   help="measure devices, network, data and the run folder with this config; no training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value, low in (("--nproc", args.nproc, 1), ("--max-failures", args.max_failures, 0)):
        if value < low:
            print(f"claver-local: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    from claver_dist.runlock import RunLock
    from claver_dist.config import load_config
    from claver_dist.errors import ConfigError, RunLockedError

    try:
        cfg = load_config(args.config, args.overrides)
        RunLock(cfg.resolved_run_dir()).check()
    except (ConfigError, RunLockedError) as e:
        print(f"claver-local: {e}", file=sys.stderr)
        return 2
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    launch = os.environ.setdefault("CLAVER_LAUNCH_ID", f"local-{uuid.uuid4().hex[:12]}")
    from claver_dist.distributed import free_port
    from launch.elastic import TRAIN_MODULE, ElasticRun, run_elastic

    return run_elastic(ElasticRun(
        run_dir=cfg.resolved_run_dir(), train_args=[args.config, *args.overrides], nproc_per_node=args.nproc,
        max_failures=0 if args.preflight else args.max_failures,
        rdzv_endpoint=f"127.0.0.1:{args.master_port or free_port()}", rdzv_id=launch,
        module="claver_dist.preflight" if args.preflight else TRAIN_MODULE))


if __name__ == "__main__":
    # run from the package, so that `launch.elastic` is found when started as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
