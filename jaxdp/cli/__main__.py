"""``python -m jaxdp.cli ...`` is ``jaxdp ...``."""

import sys

from jaxdp.cli.main import main

sys.exit(main())
