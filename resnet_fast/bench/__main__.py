"""``python -m resnet_fast.bench ...``: the same as ``resnet-fast bench ...``, without the other commands."""

import sys

from resnet_fast.bench.command import main

sys.exit(main())
