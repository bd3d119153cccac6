from __future__ import annotations

import pytest
import torch
from timm.models.resnet import ResNet
from torch import nn

import pxd.models
from pxd.config import ModelConfig
from pxd.errors import ConfigError
from pxd.models import (
    check_model_supported,
    create_model,
    forward_taps,
    patch_size_for,
    tap_info,
    token_count,
)

NUM_CLASSES = 5


def _images(resolution: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def _build(cfg: ModelConfig, seed: int = 0, field: str = "model") -> nn.Module:
    torch.manual_seed(seed)
    return create_model(cfg, NUM_CLASSES, field=field)


def test_vit_keeps_its_own_patch_so_cost_is_monotone_in_resolution() -> None:
    """vit_*_patch16: 16-pixel patches at every resolution; tokens (and MACs) grow with the input."""
    from pxd.cost import measure_cost

    tokens, gmacs = [], []
    for resolution in (16, 32, 48, 64):
        cfg = ModelConfig(arch="vit_tiny_patch16_224", resolution=resolution)
        assert patch_size_for(cfg) == 16
        model = _build(cfg)
        assert tuple(model.patch_embed.patch_size) == (16, 16)
        assert tap_info(model, resolution).tokens == token_count(cfg) == (resolution // 16) ** 2
        tokens.append(token_count(cfg))
        gmacs.append(measure_cost(model, resolution, device="cpu", repeats=1, warmup=0).gmacs)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert gmacs == sorted(gmacs) and len(set(gmacs)) == len(gmacs)


def test_vit_smaller_than_its_patch_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        check_model_supported(ModelConfig(arch="vit_tiny_patch16_224", resolution=8), field="student")
    assert err.value.field == "student.patch_size"


def test_cnns_have_no_tokens() -> None:
    assert token_count(ModelConfig(arch="resnet10t", resolution=32)) is None


def test_isrd_tap_is_the_stem_convolution_before_its_batchnorm() -> None:
    """As the official code (`conv1` with preReLU): the tap has negative values and is not normalised."""
    model = _build(ModelConfig(arch="resnet10t", resolution=32)).eval()
    captured = {}
    model.conv1.register_forward_hook(lambda _m, _a, out: captured.setdefault("conv1", out))
    with torch.no_grad():
        taps = forward_taps(model, _images(32))
    torch.testing.assert_close(taps.input_map, captured["conv1"], rtol=0, atol=0)
    assert (taps.input_map < 0).any()
    # the ResNet's layer1..layer4 are the distillation stages, deepest last
    assert [m.shape[1] for m in taps.stage_maps] == [64, 128, 256, 512]
    assert taps.feature_map is taps.stage_maps[-1]


def test_vit_isrd_tap_is_the_patch_embedding() -> None:
    model = _build(ModelConfig(arch="vit_tiny_patch16_224", resolution=32)).eval()
    images = _images(32)
    with torch.no_grad():
        taps = forward_taps(model, images)
        embedded = model.patch_embed(images)  # [B, 4, C] tokens
    assert taps.input_map.shape == (2, model.embed_dim, 2, 2)
    torch.testing.assert_close(taps.input_map.flatten(2).transpose(1, 2), embedded, rtol=0, atol=0)


def test_cnn_logits_and_taps_match_plain_forward() -> None:
    cfg = ModelConfig(arch="resnet10t", resolution=32)
    model = _build(cfg).eval()
    images = _images(32)
    with torch.no_grad():
        taps = forward_taps(model, images)
        logits = model(images)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(taps.logits, logits, rtol=0, atol=0)
    # input map = the stem convolution (before its BN), feature map = timm's last feature level
    first, last = model.feature_info[0], model.feature_info[-1]
    assert taps.input_map.shape == (2, first["num_chs"], 32 // first["reduction"], 32 // first["reduction"])
    assert taps.feature_map.shape == (2, last["num_chs"], 1, 1)  # 32 px / stride 32
    info = tap_info(model, 32)
    assert (info.input_channels, *info.input_size) == tuple(taps.input_map.shape[1:])
    assert (info.feature_channels, *info.feature_size) == tuple(taps.feature_map.shape[1:])


def test_cnn_builds_at_any_resolution() -> None:
    model = _build(ModelConfig(arch="resnet10t", resolution=24)).eval()
    with torch.no_grad():
        assert model(_images(24)).shape == (2, NUM_CLASSES)


def test_vit_gets_img_size_and_taps_tokens_as_maps() -> None:
    cfg = ModelConfig(arch="vit_tiny_patch16_224", resolution=64)
    model = _build(cfg).eval()
    assert tuple(model.patch_embed.patch_size) == (16, 16)  # the architecture's own patch
    images = _images(64)
    with torch.no_grad():
        taps = forward_taps(model, images)
        logits = model(images)
    torch.testing.assert_close(taps.logits, logits, rtol=0, atol=0)
    width = model.embed_dim
    # the class token is dropped: 4×4 patch tokens as an NCHW map, for the patch embedding and the last block
    assert taps.input_map.shape == (2, width, 4, 4)
    assert taps.feature_map.shape == (2, width, 4, 4)
    assert len(taps.stage_maps) == 4  # 12 blocks, evenly spaced, deepest last
    assert not torch.equal(taps.input_map, taps.feature_map)
    info = tap_info(model, 64)
    assert (info.input_channels, *info.input_size) == (width, 4, 4)
    assert (info.feature_channels, *info.feature_size) == (width, 4, 4)
    assert info.tokens == 16


def test_vit_explicit_patch_size_wins() -> None:
    model = _build(ModelConfig(arch="vit_tiny_patch16_224", resolution=32, patch_size=8))
    assert tap_info(model, 32).feature_size == (4, 4)


def test_patch_size_on_a_cnn_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        check_model_supported(ModelConfig(arch="resnet10t", resolution=32, patch_size=4), field="teacher")
    assert err.value.field == "teacher.patch_size"


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        check_model_supported(ModelConfig(arch="resnet_does_not_exist"), field="student")
    assert err.value.field == "student.arch"


def test_architecture_without_intermediates_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    pxd.models._arch_traits.cache_clear()
    monkeypatch.delattr(ResNet, "forward_intermediates")
    try:
        with pytest.raises(ConfigError) as err:
            check_model_supported(ModelConfig(arch="resnet14t"), field="teacher")
        assert err.value.field == "teacher.arch"
        assert "forward_intermediates" in err.value.message
    finally:
        pxd.models._arch_traits.cache_clear()


def test_tap_info_restores_each_module_mode() -> None:
    model = _build(ModelConfig(arch="resnet10t", resolution=16))
    model.train()
    model.bn1.eval()  # e.g. a frozen norm layer
    tap_info(model, 16)
    assert model.training and model.layer1.training
    assert not model.bn1.training


def _train_steps(model: nn.Module, resolution: int, steps: int = 5) -> list[float]:
    images = _images(resolution, batch=8, seed=1)
    labels = torch.arange(8) % NUM_CLASSES
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(forward_taps(model, images).logits, labels)
        loss.backward()
        if not losses:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_blockwise_resnet_has_the_given_stages_and_trains() -> None:
    depths, widths = (1, 2, 1, 1), (8, 16, 24, 32)
    cfg = ModelConfig(arch="blockwise_resnet", resolution=16, depths=depths, widths=widths)
    model = _build(cfg)
    assert [info["num_chs"] for info in model.feature_info] == [8, *widths]  # stem follows widths[0]
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == list(depths)
    info = tap_info(model, 16)
    assert info.input_channels == 8 and info.feature_channels == 32
    losses = _train_steps(model, 16)
    assert losses[-1] < losses[0]


def test_blockwise_resnet_needs_four_stages() -> None:
    cfg = ModelConfig(arch="blockwise_resnet", resolution=16, depths=(1, 1, 1), widths=(8, 16, 32))
    with pytest.raises(ConfigError) as err:
        create_model(cfg, NUM_CLASSES, field="student")
    assert err.value.field == "student.depths"


def test_blockwise_mobilenet_has_the_given_stages_and_trains() -> None:
    depths, widths = (1, 2, 3), (8, 12, 20)  # 12 and 20 are not multiples of 8: used exactly
    cfg = ModelConfig(arch="blockwise_mobilenet", resolution=16, depths=depths, widths=widths)
    model = _build(cfg)
    assert [info["num_chs"] for info in model.feature_info] == list(widths)
    assert [len(stage) for stage in model.blocks] == list(depths)
    info = tap_info(model, 16)
    assert (info.input_channels, info.input_size) == (8, (8, 8))  # stage 1 runs at stride 2
    assert (info.feature_channels, info.feature_size) == (20, (2, 2))  # 16 / (2·2·2)
    losses = _train_steps(model, 16)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_checkpoint_round_trip(tmp_path, wrap: str | None) -> None:
    cfg = ModelConfig(arch="resnet10t", resolution=16)
    source = _build(cfg, seed=1).eval()
    state = source.state_dict()
    path = tmp_path / "weights.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    fresh = _build(cfg, seed=2).eval()
    loaded = _build(ModelConfig(arch="resnet10t", resolution=16, checkpoint=str(path)), seed=2).eval()
    images = _images(16)
    with torch.no_grad():
        assert not torch.equal(fresh(images), source(images))  # the load is what makes them equal
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)


def test_checkpoint_of_another_model_names_the_field(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save(_build(ModelConfig(arch="resnet10t", resolution=16)).state_dict(), path)
    cfg = ModelConfig(
        arch="blockwise_resnet", resolution=16, depths=(1, 1, 1, 1), widths=(8, 8, 8, 8), checkpoint=str(path)
    )
    with pytest.raises(ConfigError) as err:
        create_model(cfg, NUM_CLASSES, field="teacher")
    assert err.value.field == "teacher.checkpoint"
    assert "shape mismatch" in err.value.message


def test_checkpoint_with_wrong_class_count_names_the_field(tmp_path) -> None:
    path = tmp_path / "classes.pt"
    torch.manual_seed(0)
    torch.save(create_model(ModelConfig(arch="resnet10t", resolution=16), 3).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        _build(ModelConfig(arch="resnet10t", resolution=16, checkpoint=str(path)), field="student")
    assert err.value.field == "student.checkpoint"
    assert "fc.weight" in err.value.message


@pytest.mark.parametrize("content", ["garbage", "not_weights"])
def test_unreadable_checkpoint_names_the_field(tmp_path, content: str) -> None:
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"this is not a torch file")
    else:
        torch.save({"epoch": 3, "notes": "no tensors here"}, path)
    with pytest.raises(ConfigError) as err:
        _build(ModelConfig(arch="resnet10t", resolution=16, checkpoint=str(path)), field="teacher")
    assert err.value.field == "teacher.checkpoint"
