import sys

from claver_dist.train.main import main

sys.exit(main())
