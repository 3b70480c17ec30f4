"""Shared fixtures: small synthetic motion shards built by the real shard builder."""

from __future__ import annotations

import contextlib

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts/slurm_cluster.sh"


def build_motion_shards(root: Path, classes: list[int] | None = None, num_classes: int = 4,
                        per_class: int = 12, val_per_class: int = 4, shard_args: tuple[str, ...] = ()) -> Path:
    """Synthetic motion videos -> ``root/shards`` (train + val) + ``labels.csv`` there.

    ``classes`` picks motion classes by index (default: the first ``num_classes``);
    ``shard_args``: more ``tools/make_shards.py`` arguments (e.g. ``--shard-samples``)."""
    from claver_dist.data.synthetic import MOTION_CLASSES, MotionSpec, write_motion_dataset
    from tools.make_shards import main as make_shards

    paths = write_motion_dataset(root / "videos", num_classes=max(classes or [num_classes - 1]) + 1,
                                 per_class=per_class, val_per_class=val_per_class,
                                 spec=MotionSpec(width=80, height=64, min_frames=16, max_frames=20), seed=0)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if classes is not None:  # keep the chosen classes, renumbered 0..k-1
        remap = {c: i for i, c in enumerate(classes)}
        for split in ("train", "val"):
            lines = [line.rsplit(" ", 1) for line in paths[split].read_text().splitlines() if line]
            paths[split].write_text("".join(f"{p} {remap[int(c)]}\n" for p, c in lines if int(c) in remap))
        paths["labels"].write_text("id,name\n" + "".join(f"{i},{MOTION_CLASSES[c][0]}\n" for i, c in enumerate(classes)))
    for split in ("train", "val"):
        rc = make_shards([str(paths[split]), "--labels", str(paths["labels"]), "--out", str(shards),
                          "--split", split, "--short-side", "64", "--workers", "1", "--no-progress", *shard_args])
        assert rc == 0
    (shards / "labels.csv").write_text(paths["labels"].read_text())
    return shards


@pytest.fixture(scope="session")
def motion_shards(tmp_path_factory) -> Path:
    """4 motion classes x 12 train / 4 val videos."""
    return build_motion_shards(tmp_path_factory.mktemp("motion"))


def _start_cluster() -> str | None:
    """None when a cluster answers (started here if needed), else why not."""
    if shutil.which("scontrol") and subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True,
                                                   timeout=60).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no SLURM test cluster is running and only root can start one: sudo scripts/slurm_cluster.sh up"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "claver-slurm-cluster-up.log"
    with open(log, "w") as f:  # a file, not a pipe: the daemons it starts outlive the script
        try:
            rc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=900).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout (900 s)"
    if rc != 0:
        return f"scripts/slurm_cluster.sh up failed ({rc}):\n{log.read_text()[-3000:]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    reason = _start_cluster()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root only: callers check), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
