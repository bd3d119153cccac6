"""Distillation losses: one file per loss family, each a pure function plus a thin term module that
registers itself in one table (`terms.LOSS_TERMS`; adding a term is one new file here, see `terms`).

`stage_loss_weights` gives a stage its active terms and weights; `Distiller` builds and applies them.
The loss functions and term modules are imported from their own files (`pxd.losses.kd`, ...).
"""

from __future__ import annotations

from pxd.losses.distiller import Distiller
from pxd.losses.terms import LOSS_TERMS, LossTerm, Setting, TermContext, loss_terms, register, stage_loss_weights

__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "Setting",
    "TermContext",
    "loss_terms",
    "register",
    "stage_loss_weights",
    "Distiller",
]
