"""Scoring sublayers: value functions and the registered scorers.

- `base.py`: the `Scorer` protocol, its registry (`SCORERS`, `@register`) and `ScoringContext`.
- one file per scorer: `ablation.py`, `shapley.py`, `angular.py`, `block_influence.py`.
- value functions, v(coalition): `residual.py` (-mean token loss, prefix-cached) and
  `accuracy.py` (lm-eval task accuracy).

A new scorer is a new file here with a `@register`ed `Scorer` subclass, imported below.
"""

from surgery.scoring import ablation, angular, block_influence, shapley  # noqa: F401 (registers the built-in scorers)
from surgery.scoring.base import SCORERS, Scorer, ScoringContext, Section, register, scorer, with_requirements

__all__ = ["SCORERS", "Scorer", "ScoringContext", "Section", "register", "scorer", "with_requirements"]
