"""Block-wise families: models pxd builds itself from per-stage depths and widths, so that a search can
size each stage under a budget (`student.depths`, `student.widths`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from pxd.errors import ConfigError

if TYPE_CHECKING:
    from pxd.sections import ModelConfig

__all__ = ["BLOCKWISE_FAMILIES", "check_blockwise", "create_blockwise"]

BLOCKWISE_FAMILIES = ("blockwise_resnet", "blockwise_mobilenet")

# MobileNetV2 (Sandler et al. 2018) widens the last stage 4× in a 1×1 head conv (320 → 1280).
_MOBILENET_HEAD_RATIO = 4
_MOBILENET_EXPANSION = 6


def create_blockwise(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The block-wise `cfg.arch` with `cfg.depths` blocks of `cfg.widths` channels per stage."""
    if cfg.arch == "blockwise_resnet":
        return _blockwise_resnet(cfg.depths, cfg.widths, num_classes)
    if cfg.arch == "blockwise_mobilenet":
        return _blockwise_mobilenet(cfg.depths, cfg.widths, num_classes)
    raise ValueError(f"{cfg.arch!r} is not a block-wise family; those are {BLOCKWISE_FAMILIES}")


def check_blockwise(cfg: ModelConfig, field: str) -> None:
    if not cfg.depths or not cfg.widths or len(cfg.depths) != len(cfg.widths):
        raise ConfigError(f"{field}.depths", f"{cfg.arch} needs depths and widths, one entry per stage each")
    if any(d < 1 for d in cfg.depths) or any(w < 1 for w in cfg.widths):
        raise ConfigError(f"{field}.depths", "depths and widths must be ≥ 1")
    if cfg.arch == "blockwise_resnet" and len(cfg.depths) != 4:
        raise ConfigError(
            f"{field}.depths",
            f"blockwise_resnet has exactly 4 stages (timm's ResNet runs layer1..layer4); got {len(cfg.depths)}",
        )
    if cfg.pretrained:
        raise ConfigError(f"{field}.pretrained", f"{cfg.arch} has no pretrained weights; use {field}.checkpoint")
    if cfg.patch_size is not None:
        raise ConfigError(f"{field}.patch_size", f"{cfg.arch} has no patch embedding; leave patch_size unset")


def _blockwise_resnet(depths: tuple[int, ...], widths: tuple[int, ...], num_classes: int) -> nn.Module:
    """timm ResNet of BasicBlocks, `depths[i]` blocks of `widths[i]` channels in stage i.

    ResNet-D stem and shortcuts (He et al. 2019, "Bag of Tricks"), as in timm's resnet10t. Only the
    deep stem's width can follow the stages (the plain 7×7 stem is fixed at 64 channels): it has
    2·ceil(widths[0]/2) channels, i.e. widths[0] when even.
    """
    return ResNet(
        block=BasicBlock,
        layers=tuple(depths),
        channels=tuple(widths),
        num_classes=num_classes,
        stem_type="deep",
        stem_width=(widths[0] + 1) // 2,
        avg_down=True,
    )


def _blockwise_mobilenet(depths: tuple[int, ...], widths: tuple[int, ...], num_classes: int) -> nn.Module:
    """MobileNetV2-style net from timm's EfficientNet builder; each stage is one feature level.

    Stage 1: `depths[0]` depthwise-separable blocks at stride 1 (MobileNetV2's first stage); stage
    i > 1: `depths[i]` inverted residuals (expansion 6) of `widths[i]` channels, the first at
    stride 2. Stem = widths[0] channels, head conv = 4·widths[-1]. Widths are used exactly
    (`round_chs_fn=int`; timm would otherwise round them to multiples of 8).
    """
    arch_def = [[f"ds_r{depths[0]}_k3_s1_c{widths[0]}"]]
    arch_def += [
        [f"ir_r{depth}_k3_s2_e{_MOBILENET_EXPANSION}_c{width}"] for depth, width in zip(depths[1:], widths[1:])
    ]
    return EfficientNet(
        block_args=decode_arch_def(arch_def),
        num_classes=num_classes,
        num_features=_MOBILENET_HEAD_RATIO * widths[-1],
        stem_size=widths[0],
        fix_stem=True,
        round_chs_fn=int,
        act_layer=nn.ReLU6,
    )
