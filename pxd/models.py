"""Models: any timm classifier at any input size, two block-wise families, and feature taps.

Taps come from timm's own API (`forward_intermediates` + `forward_head`), never from hooks on module
paths, so they follow timm's definition of a feature level (`feature_info`) for every architecture.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from pxd.errors import ConfigError
from pxd.types import TapInfo, Taps

if TYPE_CHECKING:
    from pxd.config import ModelConfig

__all__ = [
    "BLOCKWISE_FAMILIES",
    "MAX_DISTILL_STAGES",
    "ModelTaps",
    "ModelTapInfo",
    "create_model",
    "check_model_supported",
    "patch_size_for",
    "token_count",
    "load_checkpoint",
    "forward_taps",
    "tap_info",
    "meta_tap_info",
    "eval_mode",
]

# Block-wise families: pxd builds these itself from per-stage depths and widths (see `_blockwise_*`).
BLOCKWISE_FAMILIES = ("blockwise_resnet", "blockwise_mobilenet")

# Feature KD and attention transfer use at most this many feature levels, the deepest ones (a ResNet's
# layer1..layer4, as the official Pixel Distillation AT; a ViT's blocks evenly spaced up to the last).
MAX_DISTILL_STAGES = 4

# MobileNetV2 (Sandler et al. 2018) widens the last stage 4× in a 1×1 head conv (320 → 1280).
_MOBILENET_HEAD_RATIO = 4
_MOBILENET_EXPANSION = 6


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
        _check_blockwise(cfg, field)
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
    if cfg.arch == "blockwise_resnet":
        model = _blockwise_resnet(cfg.depths, cfg.widths, num_classes)
    elif cfg.arch == "blockwise_mobilenet":
        model = _blockwise_mobilenet(cfg.depths, cfg.widths, num_classes)
    else:
        kwargs = _size_kwargs(cfg, field)
        try:
            model = timm.create_model(cfg.arch, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
        except (AssertionError, TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"{field}.arch", f"timm could not build {cfg.arch} with {kwargs}: {_first_line(err)}"
            ) from err
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, field=field)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, field: str = "model") -> None:
    """Load a local weights file into `model`: a state_dict, or a dict holding one under
    "state_dict" or "model". Anything that does not fit exactly is one `ConfigError`."""
    name = f"{field}.checkpoint"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(name, f"{path} is not a file")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - on arbitrary bytes torch.load raises many types, even IndexError
        raise ConfigError(name, f"{path} is not a readable PyTorch weights file ({_first_line(err)})") from err
    state = _unwrap_state_dict(loaded)
    if state is None:
        raise ConfigError(name, f"{path} holds no state_dict (expected one, or a dict with 'state_dict' or 'model')")
    problem = _mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(
            name,
            f"{path} does not fit this model ({problem}); it must come from the same arch, "
            "resolution/patch size, depths/widths and number of classes",
        )
    model.load_state_dict(state)


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
    import dataclasses

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------
# checkpoints

# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return None
    state = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if given[k].shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# block-wise families: stage depths and widths are searchable under a budget


def _check_blockwise(cfg: ModelConfig, field: str) -> None:
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
