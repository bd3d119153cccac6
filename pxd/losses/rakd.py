"""Resolution-aware knowledge distillation terms (Feng et al., "Resolution-Aware Knowledge
Distillation for Efficient Inference", IEEE TIP 2021), on globally pooled features.

Embeddings: the student's last feature map is global-average-pooled and, where its channels differ
from the teacher's, mapped by a linear adapter (`EmbeddingAdapter`); the teacher's map is pooled
and treated as a constant.

(a) Pair-wise similarity constraint: within a batch, the cosine-similarity matrices of student and
    teacher embeddings should agree:  L_pair = mean_{i,j} ( cos(s_i, s_j) − cos(t_i, t_j) )².
(b) Maximum mean discrepancy between the high-resolution (teacher) and low-resolution (student)
    feature distributions, with a sum of Gaussian kernels k(x, y) = Σ_m exp(−‖x − y‖² / σ_m):
        MMD² = mean K(S, S) + mean K(T, T) − 2 · mean K(S, T)
    This is the *biased* (V-statistic) estimator: it includes the diagonal terms, is ≥ 0 and is
    exactly 0 for identical samples; its O(1/B) bias is harmless for a training signal. The
    bandwidths are σ_m = σ̄ · 2^m, m ∈ {−2, …, 2}, where σ̄ is the mean pairwise squared distance of
    the pooled batch (detached), the multi-kernel heuristic of Long et al., DAN (ICML 2015); this
    keeps the kernel meaningful whatever the feature scale.
(c) Adversarial feature discriminator: a small MLP D tells teacher embeddings (label 1) from
    student embeddings (label 0). Training alternates, as a GAN (Goodfellow et al., NeurIPS 2014):
    the student minimises the *non-saturating* loss −log D(s) (BCE of D(s) against "teacher"), whose
    gradient stays large exactly when D confidently rejects the student (the minimax form
    log(1 − D(s)), e.g. through a gradient-reversal layer, vanishes there); then D takes its own
    step, with its own optimiser (`CRITIC_OPTIMIZER`), on detached embeddings:
        L_D = BCE(D(t), 1) + BCE(D(s), 0)   (halved)
    D's parameters are never in the student's optimiser.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pxd.losses.terms import LossTerm, TermContext, register
from pxd.types import Taps

__all__ = [
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

# The discriminator's own optimiser: Adam with the usual GAN betas (Radford et al., DCGAN 2016).
CRITIC_OPTIMIZER = {"lr": 1e-3, "betas": (0.5, 0.999)}

MMD_BANDWIDTH_EXPONENTS = (-2, -1, 0, 1, 2)


def pooled_embedding(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pool of an NCHW map → [B, C]."""
    return feature_map.mean(dim=(2, 3))


class EmbeddingAdapter(nn.Module):
    """Pool the student's feature map and map it to the teacher's channels (identity when equal)."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        if student_channels == teacher_channels:
            self.project: nn.Module = nn.Identity()
        else:
            self.project = nn.Linear(student_channels, teacher_channels)

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        return self.project(pooled_embedding(student_map))


def pairwise_similarity_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """MSE between the within-batch cosine-similarity matrices (Feng et al. 2021, pair-wise term)."""
    student_unit = F.normalize(student_embedding, dim=1)
    teacher_unit = F.normalize(teacher_embedding.detach(), dim=1)
    return F.mse_loss(student_unit @ student_unit.T, teacher_unit @ teacher_unit.T)


def mmd_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Biased multi-bandwidth Gaussian MMD² between student and (detached) teacher embeddings."""
    if student_embedding.shape[1] != teacher_embedding.shape[1]:
        raise ValueError(
            f"MMD needs embeddings of equal width, got {student_embedding.shape[1]} and "
            f"{teacher_embedding.shape[1]}; pass the student through EmbeddingAdapter first"
        )
    n_student = student_embedding.shape[0]
    joint = torch.cat([student_embedding, teacher_embedding.detach()], dim=0).float()
    # ‖x‖² + ‖y‖² − 2x·y rather than cdist(...)²: cdist's gradient is undefined at distance 0,
    # which the diagonal always has.
    squared_norm = joint.pow(2).sum(dim=1)
    squared_distance = (squared_norm[:, None] + squared_norm[None, :] - 2.0 * joint @ joint.T).clamp_min(0.0)
    n = joint.shape[0]
    base = squared_distance.detach().sum() / max(n * n - n, 1)
    base = base.clamp_min(1e-8)  # identical points: any bandwidth gives the same (zero) MMD
    kernel = sum(torch.exp(-squared_distance / (base * 2.0**m)) for m in MMD_BANDWIDTH_EXPONENTS)
    k_ss = kernel[:n_student, :n_student].mean()
    k_tt = kernel[n_student:, n_student:].mean()
    k_st = kernel[:n_student, n_student:].mean()
    return k_ss + k_tt - 2.0 * k_st


class FeatureDiscriminator(nn.Module):
    """Small MLP: embedding → logit that the embedding came from the high-resolution teacher."""

    def __init__(self, channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding).squeeze(1)


def adversarial_loss(discriminator: FeatureDiscriminator, student_embedding: torch.Tensor) -> torch.Tensor:
    """The student's non-saturating GAN loss, −log D(s): BCE of D(s) against the teacher label."""
    student_logit = discriminator(student_embedding)
    return F.binary_cross_entropy_with_logits(student_logit, torch.ones_like(student_logit))


def discriminator_loss(
    discriminator: FeatureDiscriminator, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor
) -> torch.Tensor:
    """D's loss on detached embeddings: teacher = 1, student = 0 (mean of the two BCEs)."""
    teacher_logit = discriminator(teacher_embedding.detach())
    student_logit = discriminator(student_embedding.detach())
    real = F.binary_cross_entropy_with_logits(teacher_logit, torch.ones_like(teacher_logit))
    fake = F.binary_cross_entropy_with_logits(student_logit, torch.zeros_like(student_logit))
    return 0.5 * (real + fake)


def _embeddings(adapter: EmbeddingAdapter, student: Taps, teacher: Taps) -> tuple[torch.Tensor, torch.Tensor]:
    return adapter(student.feature_map), pooled_embedding(teacher.feature_map.detach())


class PairwiseTerm(nn.Module):
    """The `pairwise` row: its own embedding adapter + `pairwise_similarity_loss`."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.adapter = EmbeddingAdapter(context.student.feature_channels, context.teacher.feature_channels)

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        return pairwise_similarity_loss(*_embeddings(self.adapter, student, teacher))


class MMDTerm(nn.Module):
    """The `mmd` row: its own embedding adapter + `mmd_loss`."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.adapter = EmbeddingAdapter(context.student.feature_channels, context.teacher.feature_channels)

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        return mmd_loss(*_embeddings(self.adapter, student, teacher))


class AdversarialTerm(nn.Module):
    """The `adversarial` row: the student's non-saturating loss now, D's own step in `critic_step`."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.adapter = EmbeddingAdapter(context.student.feature_channels, context.teacher.feature_channels)
        self.discriminator = FeatureDiscriminator(context.teacher.feature_channels)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        student_embedding, teacher_embedding = _embeddings(self.adapter, student, teacher)
        if self.training:
            self._pending = (student_embedding.detach(), teacher_embedding)
        return adversarial_loss(self.discriminator, student_embedding)

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def critic_step(self) -> float | None:
        """One discriminator step on the embeddings of the last training forward; its loss."""
        if self._pending is None:
            return None
        if self._optimizer is None:  # created lazily: after the Distiller moved to its device
            self._optimizer = torch.optim.Adam(self.critic_parameters(), **CRITIC_OPTIMIZER)
        student_embedding, teacher_embedding = self._pending
        self._pending = None
        self._optimizer.zero_grad(set_to_none=True)  # drops what the student's loss left on D
        loss = discriminator_loss(self.discriminator, student_embedding.float(), teacher_embedding.float())
        loss.backward()
        self._optimizer.step()
        return float(loss.detach())

    # The discriminator's optimiser state travels with the term's state_dict, so a stage resumed from a
    # checkpoint (`pxd.train.Checkpointing`) continues exactly where it stopped.
    def get_extra_state(self) -> dict[str, Any]:
        return self._optimizer.state_dict() if self._optimizer is not None else {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self._optimizer = torch.optim.Adam(self.critic_parameters(), **CRITIC_OPTIMIZER)
            self._optimizer.load_state_dict(state)


register(LossTerm(name="pairwise", default=0.0, build=PairwiseTerm, order=50,
                  doc="RAKD pair-wise similarity (Feng et al., TIP 2021)", paper="Feng et al., TIP 2021"))
register(LossTerm(name="mmd", default=0.0, build=MMDTerm, order=60,
                  doc="RAKD maximum mean discrepancy", paper="Feng et al., TIP 2021"))
register(LossTerm(name="adversarial", default=0.0, build=AdversarialTerm, order=70,
                  doc="RAKD adversarial feature discriminator (non-saturating, own optimiser)",
                  paper="Feng et al., TIP 2021"))
