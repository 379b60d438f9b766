"""``python -m coordlock.testing.servers KIND`` (see :func:`coordlock.testing.servers.main`)."""

import sys

from ._cli import main

sys.exit(main())
