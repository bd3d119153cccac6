"""Distillation losses: one file per loss family, each a pure function plus a thin module.

`Distiller` combines the active terms of a stage into ``{term: weighted scalar}``; `total` sums them.
"""

from __future__ import annotations

from pxd.losses.distiller import Distiller, active_terms, total
from pxd.losses.feature import FeatureAdapter, attention_loss, attention_map, feature_loss, resize_map
from pxd.losses.isrd import ISRDDecoder, isrd_loss, isrd_scale
from pxd.losses.kd import kd_loss
from pxd.losses.rakd import (
    EmbeddingAdapter,
    FeatureDiscriminator,
    adversarial_loss,
    gradient_reversal,
    mmd_loss,
    pairwise_similarity_loss,
    pooled_embedding,
)

__all__ = [
    "Distiller",
    "active_terms",
    "total",
    "kd_loss",
    "ISRDDecoder",
    "isrd_loss",
    "isrd_scale",
    "FeatureAdapter",
    "feature_loss",
    "resize_map",
    "attention_map",
    "attention_loss",
    "EmbeddingAdapter",
    "pooled_embedding",
    "pairwise_similarity_loss",
    "mmd_loss",
    "gradient_reversal",
    "FeatureDiscriminator",
    "adversarial_loss",
]
