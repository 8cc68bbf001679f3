"""Moved to :mod:`gategrad.testing._closed_form` (the lab imports it from the testing layer)."""

from gategrad.testing._closed_form import *  # noqa: F403
from gategrad.testing._closed_form import _DEFAULTS, GRAD_LOSS_TYPES, LossGrads  # noqa: F401
