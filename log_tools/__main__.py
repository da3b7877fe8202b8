"""``python -m log_tools``: the same as the ``strata-log`` command.

Imports: its own package; the standard library.
"""

import sys

from log_tools.cli import main

sys.exit(main())
