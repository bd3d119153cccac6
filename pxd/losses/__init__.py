"""Distillation losses: one file per loss family, each a pure function plus a thin term module, and
one table (`terms.LOSS_TERMS`) that registers every term once.

`stage_loss_weights` gives a stage's active terms and weights; `Distiller` builds and applies them.
"""

from __future__ import annotations

from pxd.losses.distiller import Distiller
from pxd.losses.feature import (
    AttentionTerm,
    FeatureAdapter,
    FeatureKDTerm,
    attention_loss,
    attention_map,
    feature_loss,
    resize_map,
    spatial_stage_pairs,
)
from pxd.losses.isrd import ISRDDecoder, ISRDTerm, isrd_loss, isrd_scale
from pxd.losses.kd import LabelTerm, LogitKDTerm, kd_loss
from pxd.losses.rakd import (
    CRITIC_OPTIMIZER,
    AdversarialTerm,
    EmbeddingAdapter,
    FeatureDiscriminator,
    MMDTerm,
    PairwiseTerm,
    adversarial_loss,
    discriminator_loss,
    mmd_loss,
    pairwise_similarity_loss,
    pooled_embedding,
)
from pxd.losses.terms import LOSS_TERMS, LossTerm, TermContext, stage_loss_weights

__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "TermContext",
    "stage_loss_weights",
    "Distiller",
    "kd_loss",
    "LabelTerm",
    "LogitKDTerm",
    "ISRDDecoder",
    "ISRDTerm",
    "isrd_loss",
    "isrd_scale",
    "FeatureAdapter",
    "FeatureKDTerm",
    "AttentionTerm",
    "feature_loss",
    "resize_map",
    "attention_map",
    "attention_loss",
    "spatial_stage_pairs",
    "EmbeddingAdapter",
    "pooled_embedding",
    "pairwise_similarity_loss",
    "mmd_loss",
    "FeatureDiscriminator",
    "adversarial_loss",
    "discriminator_loss",
    "PairwiseTerm",
    "MMDTerm",
    "AdversarialTerm",
    "CRITIC_OPTIMIZER",
]
