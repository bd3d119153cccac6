"""Distillation losses: values that follow from the definitions, shapes, and where gradients go."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pxd.config import DISTILL_TERMS, DistillConfig
from pxd.errors import ConfigError
from pxd.losses import (
    Distiller,
    EmbeddingAdapter,
    FeatureAdapter,
    FeatureDiscriminator,
    ISRDDecoder,
    adversarial_loss,
    attention_loss,
    feature_loss,
    isrd_loss,
    kd_loss,
    mmd_loss,
    pairwise_similarity_loss,
    pooled_embedding,
    total,
)
from pxd.types import TapInfo, Taps

RATIOS = (1, 2, 4, 8)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- logit KD ------------------------------------------------------------------------------------


def test_kd_of_identical_logits_is_zero_and_positive_otherwise() -> None:
    logits = torch.randn(6, 10)
    assert kd_loss(logits, logits.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(6, 10, requires_grad=True)
    loss = kd_loss(student, logits, temperature=4.0)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_matches_hand_computed_kl_times_t_squared() -> None:
    # Two classes, T = 2: teacher softmax(t/2) = [1/4, 3/4], student softmax = [1/2, 1/2], so
    # KL = 1/4·ln(1/2) + 3/4·ln(3/2), times T² = 4.
    temperature = 2.0
    teacher = torch.tensor([[0.0, 2.0 * torch.log(torch.tensor(3.0)).item()]])  # softmax(t/2) = [1/4, 3/4]
    student = torch.zeros(1, 2)  # softmax = [1/2, 1/2]
    expected = (0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))) * temperature**2
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_does_not_send_gradient_to_the_teacher() -> None:
    teacher = torch.randn(4, 5, requires_grad=True)
    kd_loss(torch.randn(4, 5, requires_grad=True), teacher, 4.0).backward()
    assert teacher.grad is None


# --- ISRD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", (2, 4, 8))
@pytest.mark.parametrize(
    ("channels", "reduction", "student_resolution"),
    [(64, 2, 16), (192, 8, 16)],  # CNN stem at R_s/2; ViT patch-8 token map at R_s/8
    ids=["cnn_stem", "vit_tokens"],
)
def test_isrd_decoder_reconstructs_exactly_the_teacher_image(
    channels: int, reduction: int, student_resolution: int, ratio: int
) -> None:
    teacher_resolution = student_resolution * ratio
    side = student_resolution // reduction
    decoder = ISRDDecoder(channels, (side, side), teacher_resolution)
    input_map = torch.randn(2, channels, side, side, requires_grad=True)
    reconstruction = decoder(input_map)
    assert reconstruction.shape == (2, 3, teacher_resolution, teacher_resolution)
    loss = isrd_loss(reconstruction, torch.randn(2, 3, teacher_resolution, teacher_resolution))
    loss.backward()
    assert input_map.grad.abs().sum() > 0
    assert decoder.project.weight.grad.abs().sum() > 0


def test_isrd_decoder_crops_when_the_map_does_not_divide_the_target() -> None:
    # a 15-pixel student with a stride-2 padded stem gives an 8×8 map; 8·8 = 64 > 60 → crop to 60
    decoder = ISRDDecoder(16, (8, 8), 60)
    assert decoder.scale == 8
    assert decoder(torch.randn(1, 16, 8, 8)).shape == (1, 3, 60, 60)
    # non-square map: the shorter side decides the scale so both sides cover the target
    assert ISRDDecoder(16, (4, 7), 32)(torch.randn(1, 16, 4, 7)).shape == (1, 3, 32, 32)


def test_isrd_loss_is_zero_for_a_perfect_reconstruction_and_detaches_the_target() -> None:
    target = torch.rand(2, 3, 8, 8, requires_grad=True)
    assert isrd_loss(target.detach().clone(), target).item() == 0.0
    # L1 by hand: every pixel off by 0.5
    assert isrd_loss(target.detach() + 0.5, target).item() == pytest.approx(0.5)
    isrd_loss(torch.zeros(2, 3, 8, 8, requires_grad=True), target).backward()
    assert target.grad is None


# --- feature MSE and attention transfer --------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(("student_channels", "teacher_channels"), [(8, 8), (8, 24)])
def test_feature_adapter_handles_every_resolution_ratio(
    ratio: int, student_channels: int, teacher_channels: int
) -> None:
    teacher_map = torch.randn(2, teacher_channels, 16, 16)
    student_map = torch.randn(2, student_channels, 16 // ratio, 16 // ratio, requires_grad=True)
    adapter = FeatureAdapter(student_channels, teacher_channels)
    adapted = adapter(student_map, (16, 16))
    assert adapted.shape == teacher_map.shape
    loss = feature_loss(adapted, teacher_map)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert student_map.grad.abs().sum() > 0
    params = list(adapter.parameters())
    assert (len(params) > 0) == (student_channels != teacher_channels)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize(("student_size", "teacher_size"), [((16, 16), (4, 4)), ((3, 5), (12, 20)), ((8, 2), (4, 8))])
def test_feature_adapter_handles_larger_and_non_square_student_maps(
    student_size: tuple[int, int], teacher_size: tuple[int, int]
) -> None:
    student_map = torch.randn(2, 6, *student_size, requires_grad=True)
    adapted = FeatureAdapter(6, 10)(student_map, teacher_size)
    assert adapted.shape == (2, 10, *teacher_size)
    feature_loss(adapted, torch.randn(2, 10, *teacher_size)).backward()
    assert student_map.grad.abs().sum() > 0


def test_feature_loss_is_zero_when_the_upsampled_student_equals_the_teacher() -> None:
    # a constant map stays constant under bilinear resize, so the identity adapter matches exactly
    student_map = torch.full((1, 4, 2, 2), 3.0)
    teacher_map = torch.full((1, 4, 16, 16), 3.0)
    assert feature_loss(FeatureAdapter(4, 4)(student_map, (16, 16)), teacher_map).item() == pytest.approx(0.0)


@pytest.mark.parametrize("ratio", RATIOS)
def test_attention_loss_across_ratios_and_channels(ratio: int) -> None:
    teacher_map = torch.randn(2, 32, 16, 16)
    student_map = torch.randn(2, 8, 16 // ratio, 16 // ratio, requires_grad=True)
    loss = attention_loss(student_map, teacher_map)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert student_map.grad.abs().sum() > 0


def test_attention_loss_matches_definition_and_ignores_channel_count() -> None:
    # the same spatial energy pattern with different channel counts has the same attention → 0
    pattern = torch.rand(1, 1, 4, 4)
    assert attention_loss(pattern.expand(1, 3, 4, 4), pattern.expand(1, 7, 4, 4)).item() == pytest.approx(0.0, abs=1e-7)
    # hand check on 1×2 maps: Q(s) = [1, 0], Q(t) = [0, 1] → mean((1−0)², (0−1)²) = 1
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 2.0]]]])
    assert attention_loss(student, teacher).item() == pytest.approx(1.0)


# --- RAKD: pair-wise, MMD, adversarial -------------------------------------------------------------


def test_pairwise_loss_is_zero_for_identical_embeddings_and_positive_otherwise() -> None:
    embedding = torch.randn(6, 16)
    assert pairwise_similarity_loss(embedding, embedding.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # a uniform rescale does not change cosine similarities
    assert pairwise_similarity_loss(3.0 * embedding, embedding).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(6, 16, requires_grad=True)
    loss = pairwise_similarity_loss(student, embedding)
    assert loss.item() > 0
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift() -> None:
    sample = torch.randn(16, 8)
    assert mmd_loss(sample, sample.clone()).item() == pytest.approx(0.0, abs=1e-5)
    same_distribution = mmd_loss(torch.randn(16, 8), torch.randn(16, 8)).item()
    shifted = mmd_loss(torch.randn(16, 8) + 3.0, torch.randn(16, 8)).item()
    assert shifted > 0 and shifted > 2 * same_distribution
    student = (torch.randn(16, 8) + 3.0).requires_grad_()
    mmd_loss(student, sample).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(("student_channels", "teacher_channels"), [(12, 12), (12, 20)])
def test_embedding_terms_across_ratios_and_channels(ratio: int, student_channels: int, teacher_channels: int) -> None:
    adapter = EmbeddingAdapter(student_channels, teacher_channels)
    student_map = torch.randn(4, student_channels, 8 // ratio, 8 // ratio, requires_grad=True)
    teacher_embedding = pooled_embedding(torch.randn(4, teacher_channels, 8, 8))
    student_embedding = adapter(student_map)
    assert student_embedding.shape == teacher_embedding.shape
    loss = pairwise_similarity_loss(student_embedding, teacher_embedding) + mmd_loss(
        student_embedding, teacher_embedding
    )
    loss.backward()
    assert student_map.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_adversarial_student_gradient_is_reversed_relative_to_the_discriminator() -> None:
    discriminator = FeatureDiscriminator(8, hidden=16)
    teacher_embedding = torch.randn(5, 8)
    student_embedding = torch.randn(5, 8, requires_grad=True)
    loss = adversarial_loss(discriminator, student_embedding, teacher_embedding)
    loss.backward()
    reversed_grad = student_embedding.grad.clone()
    assert all(p.grad.abs().sum() > 0 for p in discriminator.parameters())

    # the discriminator's own objective, without reversal: the student must get exactly the opposite
    plain_student = student_embedding.detach().clone().requires_grad_()
    teacher_logit = discriminator(teacher_embedding)
    student_logit = discriminator(plain_student)
    plain = 0.5 * (
        F.binary_cross_entropy_with_logits(teacher_logit, torch.ones(5))
        + F.binary_cross_entropy_with_logits(student_logit, torch.zeros(5))
    )
    assert plain.item() == pytest.approx(loss.item())
    discriminator.zero_grad()
    plain.backward()
    assert reversed_grad.abs().sum() > 0
    assert torch.allclose(reversed_grad, -plain_student.grad)


# --- Distiller -----------------------------------------------------------------------------------------

STUDENT = TapInfo(input_channels=16, input_size=(8, 8), feature_channels=24, feature_size=(2, 2))
TEACHER = TapInfo(input_channels=32, input_size=(16, 16), feature_channels=40, feature_size=(4, 4))
NUM_CLASSES = 5


def _taps(info: TapInfo, batch: int = 4, requires_grad: bool = False) -> Taps:
    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=requires_grad)

    return Taps(
        logits=tensor(batch, NUM_CLASSES),
        input_map=tensor(batch, info.input_channels, *info.input_size),
        feature_map=tensor(batch, info.feature_channels, *info.feature_size),
    )


def _all_on() -> DistillConfig:
    return DistillConfig(ce=1.0, kd=1.0, isrd=1.0, feature=1.0, attention=1.0, pairwise=1.0, mmd=1.0, adversarial=1.0)


def test_distiller_returns_every_active_term_and_gradients_reach_student_and_adapters() -> None:
    distiller = Distiller(_all_on(), student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)
    student = _taps(STUDENT, requires_grad=True)
    losses = distiller(student, _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)), torch.randn(4, 3, 32, 32))
    assert list(losses) == list(DISTILL_TERMS)
    assert all(value.ndim == 0 for value in losses.values())
    summed = total(losses)
    assert summed.ndim == 0 and torch.isfinite(summed)
    summed.backward()
    for tensor in (student.logits, student.input_map, student.feature_map):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.parameters())


def test_distiller_weights_each_term() -> None:
    labels = torch.randint(0, NUM_CLASSES, (4,))
    student, teacher = _taps(STUDENT), _taps(TEACHER)
    config = DistillConfig(ce=0.5, kd=2.0, isrd=0.0, temperature=3.0)
    losses = Distiller(config, student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)(
        student, teacher, labels, None
    )
    assert list(losses) == ["ce", "kd"]
    assert losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(student.logits, labels).item(), rel=1e-6)
    assert losses["kd"].item() == pytest.approx(2.0 * kd_loss(student.logits, teacher.logits, 3.0).item(), rel=1e-6)


@pytest.mark.parametrize("term", [t for t in DISTILL_TERMS if t not in ("ce", "kd", "attention")])
def test_zero_weight_terms_create_no_parameters(term: str) -> None:
    def parameter_count(config: DistillConfig) -> int:
        distiller = Distiller(config, student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)
        return sum(p.numel() for p in distiller.parameters())

    only_term = dataclasses.replace(DistillConfig(ce=0.0, kd=0.0, isrd=0.0), **{term: 1.0})
    assert parameter_count(only_term) > 0
    assert parameter_count(dataclasses.replace(only_term, ce=1.0, **{term: 0.0})) == 0


def test_plain_training_returns_only_unweighted_cross_entropy() -> None:
    distiller = Distiller(_all_on(), student=STUDENT, teacher=None, teacher_resolution=32, use_isrd=True)
    assert sum(p.numel() for p in distiller.parameters()) == 0
    student, labels = _taps(STUDENT), torch.randint(0, NUM_CLASSES, (4,))
    losses = distiller(student, None, labels, None)
    assert list(losses) == ["ce"]
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(student.logits, labels).item())


def test_same_resolution_stage_drops_isrd() -> None:
    distiller = Distiller(_all_on(), student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=False)
    assert not hasattr(distiller, "isrd_decoder")
    losses = distiller(_taps(STUDENT), _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)), None)
    assert "isrd" not in losses and len(losses) == len(DISTILL_TERMS) - 1


def test_teacher_taps_are_constants() -> None:
    distiller = Distiller(_all_on(), student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)
    teacher = _taps(TEACHER, requires_grad=True)
    image = torch.randn(4, 3, 32, 32, requires_grad=True)
    total(distiller(_taps(STUDENT, requires_grad=True), teacher, torch.randint(0, NUM_CLASSES, (4,)), image)).backward()
    assert teacher.logits.grad is None and teacher.feature_map.grad is None and image.grad is None


def test_all_zero_weights_is_a_config_error_naming_distill() -> None:
    zeros = DistillConfig(**{name: 0.0 for name in DISTILL_TERMS})
    with pytest.raises(ConfigError, match="distill"):
        Distiller(zeros, student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)


def test_distiller_refuses_missing_teacher_taps() -> None:
    distiller = Distiller(DistillConfig(), student=STUDENT, teacher=TEACHER, teacher_resolution=32, use_isrd=True)
    with pytest.raises(ValueError, match="teacher"):
        distiller(_taps(STUDENT), None, torch.randint(0, NUM_CLASSES, (4,)), None)
