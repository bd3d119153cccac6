"""Models: any timm classifier at any input size, the block-wise families (`pxd.blockwise`), and feature taps.

Taps come from timm's own API (`forward_intermediates` + `forward_head`), never from hooks on module
paths, so they follow timm's definition of a feature level (`feature_info`) for every architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import PatchEmbed
from torch import nn

from pxd.blockwise import BLOCKWISE_FAMILIES, check_blockwise, create_blockwise
from pxd.errors import ConfigError, first_line
from pxd.types import TapInfo, Taps
from pxd.weights import load_checkpoint

if TYPE_CHECKING:
    from pxd.sections import ModelConfig

__all__ = [
    "BLOCKWISE_FAMILIES",
    "MAX_DISTILL_STAGES",
    "ModelTaps",
    "ModelTapInfo",
    "create_model",
    "check_model_supported",
    "patch_size_for",
    "token_count",
    "forward_taps",
    "tap_info",
    "meta_tap_info",
    "eval_mode",
]

# Feature KD and attention transfer use at most this many feature levels, the deepest ones (a ResNet's
# layer1..layer4, as the official Pixel Distillation AT; a ViT's blocks evenly spaced up to the last).
MAX_DISTILL_STAGES = 4


@dataclass
class ModelTaps(Taps):
    """`Taps` plus every distillation stage's map (NCHW, shallow to deep; the last is `feature_map`).

    `input_map` is the ISRD tap: the stem convolution's output before its BatchNorm and activation
    (timm ResNet `conv1`, EfficientNet/MobileNet `conv_stem`), or a ViT's patch embedding.
    """

    stage_maps: list[torch.Tensor] = dataclass_field(default_factory=list)


@dataclass(frozen=True)
class ModelTapInfo(TapInfo):
    """`TapInfo` plus the distillation stages' shapes and, for a ViT, its token count."""

    stage_channels: tuple[int, ...] = ()
    stage_sizes: tuple[tuple[int, int], ...] = ()
    tokens: int | None = None  # patch tokens per image (ViTs), None for CNNs


def patch_size_for(cfg: ModelConfig, field: str = "model") -> int | None:
    """The patch a ViT-style `cfg` is built with: `cfg.patch_size`, else the architecture's own.

    None for models without a patch embedding. Keeping the architecture's patch makes the token count
    (and the cost) monotone in the resolution; a resolution that is not a multiple of the patch loses
    its last `resolution mod patch` rows and columns (timm's strided patch convolution).
    """
    if cfg.patch_size is not None:
        return cfg.patch_size
    if cfg.arch in BLOCKWISE_FAMILIES:
        return None
    _, _, takes_patch_size, native = _arch_traits(cfg.arch)
    if not takes_patch_size:
        return None
    if native is not None and cfg.resolution < native:
        raise ConfigError(
            f"{field}.patch_size",
            f"{cfg.arch} has {native}-pixel patches, larger than {field}.resolution {cfg.resolution}; "
            f"set {field}.patch_size to a divisor of {cfg.resolution} (more tokens, more compute)",
        )
    return native


def token_count(cfg: ModelConfig, field: str = "model") -> int | None:
    """Patch tokens per image of a ViT-style `cfg` ((resolution // patch)², no class token); None for CNNs."""
    patch = patch_size_for(cfg, field)
    return None if patch is None else (cfg.resolution // patch) ** 2


def check_model_supported(cfg: ModelConfig, field: str = "model") -> None:
    """Raise `ConfigError` naming `field` when pxd cannot build or tap this architecture.

    Cheap: timm models are built once per name on the meta device (no memory, no weights).
    """
    if cfg.arch in BLOCKWISE_FAMILIES:
        check_blockwise(cfg, field)
        return
    if not timm.is_model(cfg.arch):
        raise ConfigError(f"{field}.arch", f"unknown timm model {cfg.arch!r}; see timm.list_models()")
    has_taps, _, _, _ = _arch_traits(cfg.arch)
    if not has_taps:
        raise ConfigError(
            f"{field}.arch",
            f"{cfg.arch} has no forward_intermediates/forward_head in timm {timm.__version__}, so its "
            "feature maps cannot be tapped for distillation; pick another architecture",
        )
    _size_kwargs(cfg, field)


def create_model(cfg: ModelConfig, num_classes: int, field: str = "model") -> nn.Module:
    """Build `cfg.arch` for `num_classes` at `cfg.resolution`; from scratch unless asked otherwise.

    `cfg.pretrained` downloads timm's weights (only then); `cfg.checkpoint` loads a local file after.
    """
    check_model_supported(cfg, field)
    if cfg.arch in BLOCKWISE_FAMILIES:
        model = create_blockwise(cfg, num_classes)
    else:
        kwargs = _size_kwargs(cfg, field)
        try:
            model = timm.create_model(cfg.arch, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
        except (AssertionError, TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"{field}.arch", f"timm could not build {cfg.arch} with {kwargs}: {first_line(err)}"
            ) from err
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, field=field)
    return model


def forward_taps(model: nn.Module, x: torch.Tensor) -> ModelTaps:
    """Logits, the ISRD input tap and the distillation stages' maps, in one forward pass.

    Stages come from timm's own API (`forward_intermediates`, levels as in `feature_info`): a CNN's
    levels after the stem (ResNet layer1..layer4), a ViT's blocks evenly spaced, at most
    MAX_DISTILL_STAGES, deepest last. The ISRD tap (the stem convolution before its norm and
    activation, as the official code's `conv1` with `preReLU`) is not a timm feature level, so it is
    read with a forward hook on the stem module `_isrd_tap_module` names.
    """
    indices = _stage_indices(model)
    stem = _isrd_tap_module(model)
    captured: list[torch.Tensor] = []
    handle = stem.register_forward_hook(lambda _module, _args, output: captured.append(output)) if stem is not None else None
    try:
        final, levels = model.forward_intermediates(x, indices=indices, output_fmt="NCHW", intermediates_only=False)
    finally:
        if handle is not None:
            handle.remove()
    input_map = _as_nchw(model, captured[0]) if captured else levels[0]
    return ModelTaps(logits=model.forward_head(final), input_map=input_map, feature_map=levels[-1], stage_maps=list(levels))


def tap_info(model: nn.Module, resolution: int) -> ModelTapInfo:
    """Shapes of the taps at `resolution`, from one dry forward in eval mode (mode restored after)."""
    param = next(model.parameters())
    channels = int(getattr(model, "in_chans", 3))
    dummy = torch.zeros(2, channels, resolution, resolution, device=param.device, dtype=param.dtype)
    with eval_mode(model), torch.no_grad():
        taps = forward_taps(model, dummy)
    embed = getattr(model, "patch_embed", None)
    tokens = None
    if isinstance(embed, PatchEmbed):
        tokens = int(taps.input_map.shape[2] * taps.input_map.shape[3])
    return ModelTapInfo(
        input_channels=int(taps.input_map.shape[1]),
        input_size=(int(taps.input_map.shape[2]), int(taps.input_map.shape[3])),
        feature_channels=int(taps.feature_map.shape[1]),
        feature_size=(int(taps.feature_map.shape[2]), int(taps.feature_map.shape[3])),
        stage_channels=tuple(int(m.shape[1]) for m in taps.stage_maps),
        stage_sizes=tuple((int(m.shape[2]), int(m.shape[3])) for m in taps.stage_maps),
        tokens=tokens,
    )


def meta_tap_info(cfg: ModelConfig, resolution: int, field: str = "model") -> ModelTapInfo:
    """`tap_info` of `cfg` at `resolution` without memory or weights (built and run on the meta device)."""
    plain = dataclasses.replace(cfg, resolution=resolution, checkpoint=None, pretrained=False)
    with torch.device("meta"):
        model = create_model(plain, num_classes=2, field=field)
    return tap_info(model, resolution)


def _stage_indices(model: nn.Module) -> list[int]:
    """Which `forward_intermediates` levels are distillation stages (see `forward_taps`)."""
    feature_info = getattr(model, "feature_info", None)
    count = len(feature_info) if feature_info is not None else 1
    levels = list(range(1, count)) if count > 1 else [0]  # level 0 of a CNN is the stem
    if len(levels) > MAX_DISTILL_STAGES:
        step = len(levels) / MAX_DISTILL_STAGES
        levels = [levels[round(len(levels) - 1 - i * step)] for i in reversed(range(MAX_DISTILL_STAGES))]
    return levels


def _isrd_tap_module(model: nn.Module) -> nn.Module | None:
    """The module whose output ISRD decodes: the stem convolution(s) before the stem's norm layer
    (timm ResNet: `conv1` before `bn1`; EfficientNet/MobileNet: `conv_stem` before `bn1`), or a ViT's
    patch embedding. None: no such module known, the first feature level is used instead."""
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, PatchEmbed):
        return embed
    for name in ("conv1", "conv_stem"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and hasattr(model, "bn1"):
            return module
    return None


def _as_nchw(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A patch embedding's tokens [B, N, C] (or NHWC) as an NCHW grid; conv maps pass through."""
    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed) or output.ndim == 4 and output.shape[1] == getattr(embed.proj, "out_channels", -1):
        return output
    if output.ndim == 4:  # NHWC
        return output.permute(0, 3, 1, 2)
    batch, tokens, channels = output.shape
    side = int(round(tokens**0.5))
    height, width = embed.grid_size if embed.grid_size[0] * embed.grid_size[1] == tokens else (side, side)
    return output.transpose(1, 2).reshape(batch, channels, height, width)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; every submodule's own train/eval flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------
# timm models


@functools.lru_cache(maxsize=None)
def _arch_traits(arch: str) -> tuple[bool, bool, bool, int | None]:
    """(has taps, takes img_size, takes patch_size, its own patch size) read off a meta-device build."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except (RuntimeError, NotImplementedError):
        # A constructor that reads tensor values cannot run on meta; a CPU build gives the same answer.
        model = timm.create_model(arch, pretrained=False)
    has_taps = callable(getattr(model, "forward_intermediates", None)) and callable(
        getattr(model, "forward_head", None)
    )
    # timm's own flag: "model takes an img_size arg that fixes its input size" (_builder.py).
    takes_img_size = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    embeds = [module for module in model.modules() if isinstance(module, PatchEmbed)]
    takes_patch_size = takes_img_size and bool(embeds) and _init_accepts(type(model), "patch_size")
    if takes_patch_size:
        # Some entrypoints pin patch_size themselves (mixer: `dict(patch_size=32, **kwargs)`).
        try:
            with torch.device("meta"):
                timm.create_model(arch, pretrained=False, patch_size=embeds[0].patch_size[0])
        except TypeError:
            takes_patch_size = False
    native_patch = int(embeds[0].patch_size[0]) if embeds else None
    return has_taps, takes_img_size, takes_patch_size, native_patch


def _init_accepts(cls: type, name: str) -> bool:
    """Whether `cls(name=...)` reaches a constructor that names `name`, following `**kwargs` up the
    MRO (e.g. deit's distilled ViT forwards everything to VisionTransformer)."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _size_kwargs(cfg: ModelConfig, field: str) -> dict[str, Any]:
    """img_size/patch_size for models whose input size is fixed at construction; {} for CNNs."""
    _, takes_img_size, takes_patch_size, _ = _arch_traits(cfg.arch)
    if cfg.patch_size is not None and not takes_patch_size:
        raise ConfigError(f"{field}.patch_size", f"{cfg.arch} has no patch embedding; leave patch_size unset")
    if not takes_img_size:
        return {}
    kwargs: dict[str, Any] = {"img_size": cfg.resolution}
    if takes_patch_size:
        kwargs["patch_size"] = patch_size_for(cfg, field)
    return kwargs
