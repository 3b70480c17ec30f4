"""The library's error types, in one leaf module that imports nothing of the project.

Every message names what is wrong: the config key, the file, the sample, the rank. Entry
points turn the expected ones into one-line messages and exit codes (``ConfigError`` is
exit 2 everywhere); anything else is a bug and keeps its traceback.

Each type is also importable from the module that raises it (``claver_dist.config``,
``claver_dist.data.shards`` ...), which is where most callers look for it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad key or value in a config file or override; the message names it."""


class DistError(RuntimeError):
    """The launcher's environment is inconsistent; the message says which variable."""


class ShardError(ValueError):
    """A shard set cannot be used at all (missing files, wrong format, too few samples)."""


class SampleError(RuntimeError):
    """One sample cannot be used (bad checksum, missing metadata); the loader skips it."""


class VideoError(RuntimeError):
    """A video cannot be probed, decoded or encoded; the message names the reason."""


class LabelsError(ValueError):
    """A label list is malformed; the message names the file and line."""


class BankError(ValueError):
    """A prompt bank does not fit its label list; the message names the class or kind."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, written or loaded; the message names the path."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a lost mount); the message names the path and
    the free space. Launchers retry: space may come back, and the previous checkpoint is intact."""


class RunLockedError(CheckpointError):
    """Another live launch holds the run folder; the message names it (host, pid, job)."""


class ConfigChangeError(CheckpointError):
    """Resuming with a config that changes what the run computes; the message lists the keys."""


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite (``train.on_nonfinite``); the message names the step."""


def require(ok: bool, key: str, rule: str, value: object) -> None:
    """Config validation in one line: ``ConfigError("{key} must be {rule}, got {value!r}")``
    unless ``ok``. Every config section's ``validate`` speaks through it."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")
