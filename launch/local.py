"""Start a training run on this machine: one process, or several through torchrun.

    python launch/local.py configs/debug.yaml                       # one process
    python launch/local.py --nproc 2 configs/debug.yaml optim.lr=1e-4
    python launch/local.py --nproc 8 configs/k400_b16_8f.yaml       # one process per GPU

On CPU the cores are split evenly between processes (OMP_NUM_THREADS), which also makes
numerics reproducible; on GPUs each process takes one device (LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (0 = a free one)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nproc < 1:
        print("--nproc must be >= 1", file=sys.stderr)
        return 2
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    if args.nproc == 1:
        from claver_dist.train.main import main as train_main

        return train_main([args.config, *args.overrides])
    from torch.distributed.run import main as torchrun
    from claver_dist.distributed import free_port

    port = args.master_port or free_port()
    torchrun(["--nnodes", "1", "--nproc-per-node", str(args.nproc), "--master-addr", "127.0.0.1",
              "--master-port", str(port), "-m", "claver_dist.train", args.config, *args.overrides])
    return 0


if __name__ == "__main__":
    sys.exit(main())
