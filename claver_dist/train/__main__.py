import sys

from claver_dist.train import signals

signals.hold()  # before torch's import: a stop signal during start-up is kept, not fatal

from torch.distributed.elastic.multiprocessing.errors import record

from claver_dist.train.main import main

# record: an uncaught exception is written where torch's elastic agent (launch/elastic.py)
# reads it, so that the failure record names the error, not only the exit code
try:
    rc = record(main)()
finally:
    # the run has stopped or ended: a stop signal from here on (SLURM signals every process of
    # the step and the launcher passes it on too, so a second one can come late) must not kill
    # the exit; Python resets its own handlers to the default action while it shuts down
    signals.ignore()
sys.exit(rc)
