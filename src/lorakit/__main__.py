"""`python -m lorakit ...` is the `lorakit` command; torchrun starts it as `torchrun ... -m lorakit train ...`."""

import sys

from lorakit.cli import main

sys.exit(main())
