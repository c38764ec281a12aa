"""`python -m awqforge` = the `awqforge` command."""

import sys

from awqforge.cli import main

sys.exit(main())
