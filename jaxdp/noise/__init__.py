"""Noise: the step between the clipped gradient sum and the optimizer.

Data path: ``clipped_grad`` (sum of clipped per-example gradients, sensitivity
C) -> a privatizer here (adds Gaussian noise of standard deviation σC and divides
by the public expected batch size) -> any optax optimizer.

* :mod:`jaxdp.noise.gaussian`: :func:`add_noise` and :func:`privatize`,
  independent noise (DP-SGD).
* :mod:`jaxdp.noise.banded`: :func:`privatize_banded`, noise correlated across
  steps by a b-banded strategy (BandMF).
* :mod:`jaxdp.noise.bandmf`: the host-side strategies (coefficients, their
  error) that :func:`privatize_banded` takes.

Nothing here imports the accountant: noise is device math, accounting is
bookkeeping (:mod:`jaxdp.accounting`, which has ``choose_bands``).
"""

from jaxdp.noise import bandmf
from jaxdp.noise.banded import BandedPrivatizeState, privatize_banded
from jaxdp.noise.gaussian import PrivatizeState, add_noise, privatize

__all__ = ["BandedPrivatizeState", "PrivatizeState", "add_noise", "bandmf", "privatize", "privatize_banded"]
