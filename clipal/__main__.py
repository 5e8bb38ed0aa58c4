"""``python -m clipal``: the same as the ``clipal`` command."""

import sys

from clipal.cli import main

sys.exit(main())
