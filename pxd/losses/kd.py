"""Logit knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015).

    L_KD = T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) ),   averaged over the batch

The T² factor keeps the gradient magnitude of the soft targets comparable to the hard-label
cross-entropy when T changes (Hinton et al. 2015, sec. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, times T², batch mean.

    The teacher logits are treated as constants. Identical logits give exactly 0.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    # kl_div(input, target) = Σ p_target · (log p_target − input); "batchmean" divides by B, which
    # is the mathematically correct KL per example (reduction="mean" would also divide by classes).
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
