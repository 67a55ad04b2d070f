"""Empirical privacy auditing: canaries in one training run -> a lower bound on ε and an f-DP test.

An accountant gives an *upper* bound on ε for the mechanism it is told about. An
audit checks the code that really runs: it hides canaries in the training data,
trains once, scores how visible each canary is in what training released, and
turns the scores into a *lower* bound on ε that holds with a stated confidence.
If the lower bound exceeds the accountant's ε, the implementation leaks more than
it claims (noise or clipping broken, a wrong sampling rate, ...).

The package:

* :mod:`jaxdp.audit.guesses` — the guesses both tests make from the scores
  (top k "in", bottom k "out", ties by index) and the checks of their inputs;
* :mod:`jaxdp.audit.bounds` — the one-run lower bound on ε (:func:`epsilon_lower_bound`);
* :mod:`jaxdp.audit.fdp` — the one-run f-DP test against the claimed trade-off
  curve (:class:`TradeoffCurve`, :func:`fdp_audit`, :func:`noise_ratio_bound`);
* :mod:`jaxdp.audit.canaries` — the gradient-canary training run
  (:func:`audit_training_run`, the sabotages) and :func:`audit_config`, what
  ``jaxdp audit`` runs.

The statistic is one-run auditing (Steinke, Nasr & Jagielski 2023, "Privacy
Auditing with One (1) Training Run", NeurIPS; arXiv:2305.08846):

* m canaries, each included independently with probability 1/2 (S_i in {in, out});
* after training, the auditor guesses "in" for the k highest scores and "out"
  for the k lowest, and abstains on the rest (r = 2k guesses, a function of the
  released output only);
* if the mechanism is (ε, δ)-DP in each canary, the number W of correct guesses
  satisfies (their Theorem 3 and Algorithm 2 / appendix code)

      P[W >= v] <= P[Bin(r, p) >= v] + 2 m δ · max_{i=1..v} P[v - i <= Bin(r, p) < v] / i,
      p = e^ε / (1 + e^ε);

* the lower bound is the largest ε whose p-value is still <= β = 1 − confidence:
  with probability >= 1 − β, the mechanism is not (ε', δ)-DP for any ε' below it.

Several guess counts k are tried (a grid fixed before looking at the scores) and
the best bound is reported; each is tested at β / (grid size) so the maximum is
still valid at confidence 1 − β (Bonferroni).

What it can and cannot show: it is a lower bound. A correct mechanism gives a
lower bound below its ε. Even perfect guesses certify only about
ln(r / ln(G/β)) with r guesses and G grid points, and the δ term caps it further
(measured with the default grid, β = 0.05, δ = 1e-5: 2.8 for m = 100, 3.9 for
300, 5.1 for 1000, 6.0 for 3000, 6.4 for 10000), so claims above that cannot be
falsified by one run; for a correct DP-SGD run the bound is loose (far below the
accountant's ε). Passing an audit does not prove privacy; failing one shows the
mechanism is not (ε, δ)-DP for the claimed ε, with confidence 1 − β.

The (ε, δ) test sees one point of the privacy curve, so it misses mechanisms that
keep that point but are weaker elsewhere: σ/2 against a claim of ε = 3 (true ε ≈ 6.9)
passes it. The second test, one-run f-DP auditing (Mahloujifar, Melis & Chaudhuri
2024, "Auditing f-Differential Privacy in One Run", arXiv:2410.22235), tests the same
guesses against the claimed mechanism's whole trade-off curve f (from the PLD of the
plan's subsampled Gaussian: :class:`TradeoffCurve`): :func:`fdp_p_value` bounds
P[W >= v] for every mechanism that is f-DP in each canary (no independence between
canaries assumed; the argument is in its docstring), :func:`fdp_audit` applies it on
its own fixed grid of guess counts (Bonferroni), and :func:`noise_ratio_bound` reports the largest violation
it certifies as a fraction of the claimed noise (ρ < 1: "leaks at least as much as the
claimed mechanism with ρσ"). ``jaxdp audit`` runs both tests and fails when either does.
"""

from jaxdp.audit.bounds import (
    DEFAULT_GUESS_FRACTIONS,
    AuditBound,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from jaxdp.audit.canaries import AUDIT_TESTS, SABOTAGES, AuditResult, audit_config, audit_training_run
from jaxdp.audit.fdp import (
    DEFAULT_FDP_GUESS_FRACTIONS,
    FdpAuditResult,
    TradeoffCurve,
    fdp_audit,
    fdp_p_value,
    fdp_rejects,
    noise_ratio_bound,
)

__all__ = [
    "AUDIT_TESTS",
    "DEFAULT_FDP_GUESS_FRACTIONS",
    "DEFAULT_GUESS_FRACTIONS",
    "SABOTAGES",
    "AuditBound",
    "AuditResult",
    "FdpAuditResult",
    "TradeoffCurve",
    "audit_config",
    "audit_training_run",
    "epsilon_lower_bound",
    "fdp_audit",
    "fdp_p_value",
    "fdp_rejects",
    "noise_ratio_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]
