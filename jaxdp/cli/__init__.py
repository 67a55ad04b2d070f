"""The ``jaxdp`` command line: argument parsing and printing only.

* :mod:`jaxdp.cli.main` — the parser and :func:`main` (``jaxdp train`` runs here);
* :mod:`jaxdp.cli.account` — ``jaxdp account``: ε per accountant and attack risk;
* :mod:`jaxdp.cli.audit` — ``jaxdp audit``'s report;
* :mod:`jaxdp.cli.bench` — ``jaxdp bench``'s arguments.
"""

from jaxdp.cli.main import main

__all__ = ["main"]
