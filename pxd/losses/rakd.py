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
    student embeddings (label 0). The student embedding reaches D through a gradient reversal
    layer (Ganin & Lempitsky, ICML 2015): the forward pass is the identity, the backward pass
    multiplies the gradient by −1. One optimizer step therefore trains D to *minimise* the BCE
    while the student receives the reversed gradient, i.e. *maximises* that same BCE (the original
    minimax GAN objective), which drives student embeddings towards the teacher's distribution.
    We chose this over alternating discriminator/generator steps so that the trainer keeps a
    single optimizer and a single backward pass per batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EmbeddingAdapter",
    "pooled_embedding",
    "pairwise_similarity_loss",
    "mmd_loss",
    "gradient_reversal",
    "FeatureDiscriminator",
    "adversarial_loss",
]

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


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        return -grad_output


def gradient_reversal(tensor: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015)."""
    return _GradientReversal.apply(tensor)


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


def adversarial_loss(
    discriminator: FeatureDiscriminator, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor
) -> torch.Tensor:
    """Discriminator BCE (teacher = 1, student = 0); the student side goes through gradient reversal,
    so minimising this trains D and pushes the student to fool it in the same backward pass."""
    teacher_logit = discriminator(teacher_embedding.detach())
    student_logit = discriminator(gradient_reversal(student_embedding))
    real = F.binary_cross_entropy_with_logits(teacher_logit, torch.ones_like(teacher_logit))
    fake = F.binary_cross_entropy_with_logits(student_logit, torch.zeros_like(student_logit))
    return 0.5 * (real + fake)
