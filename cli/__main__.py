"""`python -m kilnlm.cli` runs the same CLI as the `kiln` script."""

import sys

from kilnlm.cli.main import main

sys.exit(main())
