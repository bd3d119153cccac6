"""Distillation losses: values that follow from the definitions, shapes, and where gradients go."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pxd.config import DistillConfig
from pxd.errors import ConfigError
from pxd.losses import Distiller, stage_loss_weights
from pxd.losses.feature import FeatureAdapter, attention_loss, feature_loss
from pxd.losses.isrd import ISRDDecoder, isrd_loss
from pxd.losses.kd import kd_loss
from pxd.losses.rakd import (
    EmbeddingAdapter,
    FeatureDiscriminator,
    adversarial_loss,
    mmd_loss,
    pairwise_similarity_loss,
    pooled_embedding,
)
from pxd.losses.terms import LOSS_TERMS, TermContext, loss_terms
from pxd.models import ModelTapInfo, ModelTaps

# every registered term's name, in the table's order
DISTILL_TERMS = tuple(row.name for row in loss_terms())

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


def test_adversarial_student_gradient_does_not_vanish_with_a_confident_discriminator() -> None:
    """The non-saturating −log D(s) keeps pushing the student exactly when D rejects it confidently
    (the minimax log(1 − D(s)) a gradient-reversal layer gives was measured at 4.7e-11 there)."""
    discriminator = FeatureDiscriminator(8, hidden=16)
    with torch.no_grad():  # D says "student" (logit −20) for everything: σ(−20) ≈ 2e-9
        last = discriminator.net[-1]
        last.weight.zero_()
        last.bias.fill_(-20.0)
        discriminator.net[-1].weight[0, 0] = 1e-2  # keep a path from the embedding to the logit
    student_embedding = torch.randn(5, 8, requires_grad=True)
    adversarial_loss(discriminator, student_embedding).backward()
    non_saturating = student_embedding.grad.abs().sum().item()

    saturating_input = student_embedding.detach().clone().requires_grad_()
    logit = discriminator(saturating_input)
    (-F.binary_cross_entropy_with_logits(logit, torch.zeros(5))).backward()  # the minimax form
    saturating = saturating_input.grad.abs().sum().item()
    assert non_saturating > 1e-4
    assert non_saturating > 1e5 * saturating


def test_adversarial_term_trains_its_discriminator_with_its_own_optimiser() -> None:
    distiller = Distiller(
        DistillConfig(ce=0.0, kd=0.0, isrd=0.0, adversarial=1.0),
        student=STUDENT, teacher=TEACHER, student_resolution=16, teacher_resolution=32,
    )
    critics = {id(p) for p in distiller.critic_parameters()}
    assert critics and not critics & {id(p) for p in distiller.student_side_parameters()}
    before = [p.detach().clone() for p in distiller.critic_parameters()]
    losses = distiller(_taps(STUDENT, requires_grad=True), _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)))
    sum(losses.values()).backward()
    critic = distiller.critic_step()
    assert set(critic) == {"adversarial_critic"} and math.isfinite(critic["adversarial_critic"])
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.critic_parameters()))
    assert distiller.critic_step() == {}, "one critic step per training forward"


# --- Distiller and the loss table ------------------------------------------------------------------

STUDENT = ModelTapInfo(
    input_channels=16, input_size=(8, 8), feature_channels=24, feature_size=(2, 2),
    stage_channels=(12, 24), stage_sizes=((4, 4), (2, 2)),
)
TEACHER = ModelTapInfo(
    input_channels=32, input_size=(16, 16), feature_channels=40, feature_size=(4, 4),
    stage_channels=(20, 40), stage_sizes=((8, 8), (4, 4)),
)
NUM_CLASSES = 5


def _taps(info: ModelTapInfo, batch: int = 4, requires_grad: bool = False) -> ModelTaps:
    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=requires_grad)

    stages = [tensor(batch, c, *size) for c, size in zip(info.stage_channels, info.stage_sizes)]
    return ModelTaps(
        logits=tensor(batch, NUM_CLASSES),
        input_map=tensor(batch, info.input_channels, *info.input_size),
        feature_map=stages[-1],
        stage_maps=stages,
    )


def _all_on() -> DistillConfig:
    return DistillConfig(ce=1.0, kd=0.5, isrd=1.0, feature=1.0, attention=1.0, pairwise=1.0, mmd=1.0, adversarial=1.0)


def _distiller(config: DistillConfig | None, *, student_resolution: int = 16, teacher: ModelTapInfo | None = TEACHER,
               student: ModelTapInfo = STUDENT) -> Distiller:
    return Distiller(config, student=student, teacher=teacher, student_resolution=student_resolution, teacher_resolution=32)


def test_the_table_has_one_row_per_config_term_in_order() -> None:
    fields = [f.name for f in dataclasses.fields(DistillConfig)]
    assert fields == [name for row in loss_terms() for name in (row.name, *(s.name for s in row.settings))]
    assert all(hasattr(DistillConfig(), name) for name in DISTILL_TERMS)


def test_distiller_returns_every_active_term_and_gradients_reach_student_and_adapters() -> None:
    distiller = _distiller(_all_on())
    student = _taps(STUDENT, requires_grad=True)
    losses = distiller(student, _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)), torch.randn(4, 3, 32, 32))
    assert list(losses) == list(DISTILL_TERMS)
    assert all(value.ndim == 0 for value in losses.values())
    summed = sum(losses.values())
    assert torch.isfinite(summed)
    summed.backward()
    for tensor in (student.logits, student.input_map, *student.stage_maps):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.student_side_parameters())


def test_the_table_drives_the_distiller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row added to the table is built and summed with no other change (here: replacing `mmd`)."""
    class Constant(torch.nn.Module):
        def __init__(self, context: TermContext) -> None:
            super().__init__()
            self.seen_resolution = context.student_resolution

        def forward(self, student, teacher, labels, teacher_image) -> torch.Tensor:
            return student.logits.sum() * 0 + 3.0

    monkeypatch.setitem(LOSS_TERMS.rows, "mmd", dataclasses.replace(LOSS_TERMS["mmd"], build=Constant))
    distiller = _distiller(DistillConfig(ce=1.0, kd=0.0, isrd=0.0, mmd=2.0))
    assert isinstance(distiller.terms["mmd"], Constant) and distiller.terms["mmd"].seen_resolution == 16
    losses = distiller(_taps(STUDENT), _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)))
    assert list(losses) == ["ce", "mmd"] and losses["mmd"].item() == pytest.approx(6.0)


def test_convex_kd_weighting_matches_the_paper() -> None:
    """(1 − α)·CE + α·T²·KL with α = kd (official KDLoss), ce scaling the label term."""
    labels = torch.randint(0, NUM_CLASSES, (4,))
    student, teacher = _taps(STUDENT), _taps(TEACHER)
    config = DistillConfig(ce=1.0, kd=0.9, isrd=0.0, temperature=3.0)
    losses = _distiller(config)(student, teacher, labels, None)
    assert list(losses) == ["ce", "kd"]
    assert losses["ce"].item() == pytest.approx(0.1 * F.cross_entropy(student.logits, labels).item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.9 * kd_loss(student.logits, teacher.logits, 3.0).item(), rel=1e-6)
    assert stage_loss_weights(config, distilling=True, student_resolution=16, teacher_resolution=32) == pytest.approx(
        {"ce": 0.1, "kd": 0.9, "temperature": 3.0}
    )
    # kd = 0 is cross-entropy only (and the temperature no longer matters); kd = 1 is KD only
    assert stage_loss_weights(dataclasses.replace(config, kd=0.0), distilling=True, student_resolution=16,
                              teacher_resolution=32) == {"ce": 1.0}
    assert list(_distiller(dataclasses.replace(config, kd=1.0))(student, teacher, labels, None)) == ["kd"]


@pytest.mark.parametrize("term", [t for t in DISTILL_TERMS if t not in ("ce", "kd", "attention")])
def test_zero_weight_terms_create_no_parameters(term: str) -> None:
    def parameter_count(config: DistillConfig) -> int:
        return sum(p.numel() for p in _distiller(config).parameters())

    only_term = dataclasses.replace(DistillConfig(ce=0.0, kd=0.0, isrd=0.0), **{term: 1.0})
    assert parameter_count(only_term) > 0
    assert parameter_count(dataclasses.replace(only_term, ce=1.0, **{term: 0.0})) == 0


def test_plain_training_returns_only_unweighted_cross_entropy() -> None:
    distiller = _distiller(_all_on(), teacher=None)
    assert sum(p.numel() for p in distiller.parameters()) == 0
    student, labels = _taps(STUDENT), torch.randint(0, NUM_CLASSES, (4,))
    losses = distiller(student, None, labels, None)
    assert list(losses) == ["ce"]
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(student.logits, labels).item())


def test_same_resolution_stage_drops_isrd() -> None:
    distiller = _distiller(_all_on(), student_resolution=32)
    assert "isrd" not in distiller.terms
    losses = distiller(_taps(STUDENT), _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)), None)
    assert "isrd" not in losses and len(losses) == len(DISTILL_TERMS) - 1


def test_teacher_taps_are_constants() -> None:
    distiller = _distiller(_all_on())
    teacher = _taps(TEACHER, requires_grad=True)
    image = torch.randn(4, 3, 32, 32, requires_grad=True)
    sum(distiller(_taps(STUDENT, requires_grad=True), teacher, torch.randint(0, NUM_CLASSES, (4,)), image).values()).backward()
    assert teacher.logits.grad is None and image.grad is None
    assert all(m.grad is None for m in teacher.stage_maps)


def test_all_zero_weights_is_a_config_error_naming_distill() -> None:
    zeros = DistillConfig(**{name: 0.0 for name in DISTILL_TERMS})
    with pytest.raises(ConfigError, match="distill"):
        _distiller(zeros)


def test_distiller_refuses_missing_teacher_taps() -> None:
    with pytest.raises(ValueError, match="teacher"):
        _distiller(DistillConfig())(_taps(STUDENT), None, torch.randint(0, NUM_CLASSES, (4,)), None)


# --- spatial terms on 1×1 maps ---------------------------------------------------------------------

ONE_BY_ONE_LAST = ModelTapInfo(
    input_channels=16, input_size=(8, 8), feature_channels=24, feature_size=(1, 1),
    stage_channels=(12, 24), stage_sizes=((2, 2), (1, 1)),
)


@pytest.mark.parametrize("term", ["attention", "feature"])
def test_spatial_terms_skip_1x1_stages_with_a_warning_and_still_train(term: str, caplog: pytest.LogCaptureFixture) -> None:
    distiller = _distiller(DistillConfig(ce=0.0, kd=0.0, isrd=0.0, **{term: 1.0}), student=ONE_BY_ONE_LAST)
    assert distiller.terms[term].pairs == [(0, 0)]
    assert len(distiller.warnings) == 1 and "1×1" in distiller.warnings[0] and f"distill.{term}" in distiller.warnings[0]
    assert "1×1" in caplog.text
    student = _taps(ONE_BY_ONE_LAST, requires_grad=True)
    loss = distiller(student, _taps(TEACHER), torch.randint(0, NUM_CLASSES, (4,)))[term]
    assert loss.item() > 0
    loss.backward()
    assert student.stage_maps[0].grad.abs().sum() > 0


def test_attention_on_a_1x1_map_would_be_silently_zero() -> None:
    """Why the skip exists: normalised 1×1 attention is the constant 1, loss and gradient 0."""
    student = torch.randn(4, 8, 1, 1, requires_grad=True)
    loss = attention_loss(student, torch.randn(4, 8, 4, 4))
    loss.backward()
    assert loss.item() == 0 and student.grad.abs().sum() == 0


@pytest.mark.parametrize("term", ["attention", "feature"])
def test_spatial_terms_with_only_1x1_maps_are_a_config_error(term: str) -> None:
    only_1x1 = dataclasses.replace(ONE_BY_ONE_LAST, stage_sizes=((1, 1), (1, 1)))
    with pytest.raises(ConfigError) as err:
        _distiller(DistillConfig(ce=1.0, kd=0.0, isrd=0.0, **{term: 1.0}), student=only_1x1)
    assert err.value.field == f"distill.{term}"


def test_isrd_decoder_matches_the_official_structure() -> None:
    """Official SR1x1: 1×1 conv without bias → PixelShuffle → PReLU(3), one slope per colour channel."""
    decoder = ISRDDecoder(64, (8, 8), 32)
    assert decoder.project.bias is None and decoder.project.kernel_size == (1, 1)
    assert decoder.project.out_channels == 3 * 4**2
    assert isinstance(decoder.activation, torch.nn.PReLU) and decoder.activation.weight.shape == (3,)
