"""The sections of a pipeline config (`dataset`, `teacher`, `student`, `assistant`, `distill`, `train`) and
the checks each section needs alone, before any compute and without building a model.

Plain frozen dataclasses, parsed by `pxd.parsing.parse_dataclass`. The `distill` section has one weight
field per registered loss term (`pxd.losses.terms`), so a new term needs no change here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxd.errors import ConfigError
from pxd.losses.terms import loss_terms

__all__ = [
    "DatasetConfig",
    "ModelConfig",
    "TeacherConfig",
    "StudentConfig",
    "AssistantConfig",
    "DistillConfig",
    "AssistantDistillConfig",
    "TrainConfig",
    "StageTrainConfig",
    "set_fields",
    "positive",
    "has_weights",
    "validate_dataset",
    "validate_optimiser",
    "validate_distill",
]

DATASET_KINDS = ("synthetic", "imagefolder", "cifar10", "cifar100")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")


# The synthetic set's own size knobs when `train_per_class` / `val_per_class` are left unset (None).
SYNTHETIC_PER_CLASS = (48, 24)
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class DatasetConfig:
    kind: str = "synthetic"
    path: str | None = None
    # synthetic: native image side; imagefolder: side images are stored at (shorter side resized,
    # center-cropped) when decoded once into the on-disk cache. CIFAR is always 32.
    image_size: int = 64
    num_classes: int = 8  # synthetic only
    # synthetic: images made per class (unset: 48 / 24). imagefolder/cifar: a cap per class picked
    # with `seed`; unset or 0 = every image (a cap in force is printed at load and kept in DatasetSplits.caps).
    train_per_class: int | None = None
    val_per_class: int | None = None
    eval_crop: float = 1.0  # center-crop fraction at evaluation (ImageNet habit: 0.875)
    # imagefolder without val/, and CIFAR: the stratified fraction of the training images held out as val.
    # Drawn with `split_seed`, not the run's seed, so every trial of a sweep validates on the same images.
    val_fraction: float = 0.1
    split_seed: int = 0
    on_bad_image: str = "error"  # a corrupt image: "error" (before training, naming it) or "skip" (counted)
    # Where decoded datasets are cached (one per machine); None: $PXD_CACHE_DIR, else
    # $XDG_CACHE_HOME/pxd/datasets, else ~/.cache/pxd/datasets. Not part of any fingerprint.
    cache_dir: str | None = None

    def per_class_caps(self) -> tuple[int, int]:
        """(train, val) images per class: synthetic's sizes, or caps for real data where 0 means all."""
        default = SYNTHETIC_PER_CLASS if self.kind == "synthetic" else (0, 0)
        train = self.train_per_class if self.train_per_class is not None else default[0]
        val = self.val_per_class if self.val_per_class is not None else default[1]
        return train, val


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    resolution: int = 64
    checkpoint: str | None = None
    pretrained: bool = False
    # ViTs only. None keeps the architecture's own patch (vit_*_patch16_* → 16), so the token count
    # (resolution // patch)² and the cost never grow as the input shrinks; a smaller patch is a
    # choice the user makes here (it buys tokens, and compute, back at low resolution).
    patch_size: int | None = None
    depths: tuple[int, ...] | None = None  # block-wise families only: blocks per stage
    widths: tuple[int, ...] | None = None  # block-wise families only: channels per stage


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    arch: str = "resnet18"
    resolution: int = 64
    epochs: int = 4
    # The teacher's own optimiser settings; each one left unset takes the `train` section's value. A sweep
    # trains one teacher, so a searched `train` value must be fixed here for the teacher (the space says so).
    train: StageTrainConfig = field(default_factory=lambda: StageTrainConfig())


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    arch: str = "resnet10t"
    resolution: int = 16
    epochs: int | None = None  # None: train.epochs


@dataclass(frozen=True)
class AssistantConfig:
    # false: one-stage teacher → student pixel distillation (for comparison with TAS)
    enabled: bool = True
    epochs: int | None = None  # None: train.epochs
    # pxd's addition, not the papers': the low-resolution student starts from the assistant's weights
    # (same architecture, new input size), as when fine-tuning at a new resolution. Off by default:
    # the official Pixel Distillation code starts the student from its own (ImageNet) weights.
    init_student: bool = False
    # The assistant's own distillation weights (model compression at the teacher's resolution); each one
    # left unset takes the `distill` section's value (in a sweep: its fixed value, or pxd's default when
    # the student's weight is searched), so searching the student's weights never retrains assistants.
    distill: AssistantDistillConfig = field(default_factory=lambda: AssistantDistillConfig())
    # The assistant's own optimiser settings, likewise over `train`.
    train: StageTrainConfig = field(default_factory=lambda: StageTrainConfig())


_DISTILL_DOC = """Loss weights of the assistant and student stages (the teacher always trains on labels alone).

    Logit KD uses the papers' convex weighting (Hinton et al. 2015; Guo et al., TPAMI 2024, official
    `KDLoss`): ``ce·(1 − α)·CE + α·T²·KL`` with ``α = kd``. ``kd: 0`` is cross-entropy only, ``kd: 1``
    KD only; α > 1 is refused (it would train without the label term). 0 switches any term off.

    One weight field per loss term the registry holds (`pxd.losses.terms`), each followed by the term's
    settings:

"""


def _distill_config() -> type:
    """`DistillConfig`, one weight field per registered loss term (`pxd.losses.terms`) followed by that term's
    settings, in the table's order, with the defaults the terms register."""
    specs: list[tuple[str, type, Any]] = []
    lines = []
    for row in loss_terms():
        specs.append((row.name, float, field(default=float(row.default))))
        lines.append(f"    - ``{row.name}`` ({row.default:g}): {row.doc}")
        for setting in row.settings:
            specs.append((setting.name, float, field(default=float(setting.default))))
            lines.append(f"    - ``{setting.name}`` ({setting.default:g}): {setting.doc}")
    cls = dataclasses.make_dataclass("DistillConfig", specs, frozen=True)
    cls.__module__ = __name__  # picklable (Ray sends configs to trials)
    cls.__doc__ = _DISTILL_DOC + "\n".join(lines) + "\n"
    return cls


DistillConfig = _distill_config()


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"
    # 0.05 / 4: at T = 4 the KD logit gradient α·T·(p_s − p_t) is up to ~4× cross-entropy's, and at 0.05 an
    # assistant distilled from scratch stalls (docs/benchmarks.md). The paper's 0.01 is for
    # ImageNet-pretrained students and 120 epochs.
    lr: float = 0.0125
    weight_decay: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 3  # assistant and student epochs unless they set their own
    device: str = "auto"  # auto: cuda when available
    # Data kept on the training device up to this many bytes (uint8 images); the rest stays on the host.
    max_device_data_bytes: int = 4 * 1024**3
    # channels_last memory format for models and batches on CUDA (ignored on CPU). Off by default: with
    # cuDNN every new input shape of a depthwise-conv model then pays seconds of set-up before its first
    # step, and small models ran no faster (docs/benchmarks.md, "GPU fast path"). Speed only: it is not
    # part of a stage's key.
    channels_last: bool = False
    # The upstream model's forward (teacher or assistant, frozen) compiled with torch.compile for the stages
    # that distil from it. Off by default: compiling costs seconds per process and input shape before the
    # first step, and was not measured to pay at pxd's sizes (docs/benchmarks.md, "Compiled upstream").
    # Speed only: it is not part of a stage's key.
    compile_upstream: bool = False


@dataclass(frozen=True)
class StageTrainConfig:
    """Optimiser settings one stage may set for itself; None takes the `train` section's value."""

    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    batch_size: int | None = None


def _optional_mirror(name: str, source: type, doc: str) -> type:
    """A frozen dataclass with `source`'s fields, each optional (None = not set here)."""
    hints = typing.get_type_hints(source)
    mirror = dataclasses.make_dataclass(
        name, [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(source)], frozen=True
    )
    mirror.__module__ = __name__  # picklable (Ray sends configs to trials)
    mirror.__doc__ = doc
    return mirror


AssistantDistillConfig = _optional_mirror(
    "AssistantDistillConfig", DistillConfig, "The assistant's own distillation weights; None takes `distill`'s value."
)


def set_fields(config: Any) -> dict[str, Any]:
    """The fields a section of optional values (`StageTrainConfig`, `AssistantDistillConfig`) sets."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if getattr(config, f.name) is not None}


def validate_optimiser(prefix: str, train: TrainConfig, given: dict[str, Any] | None = None) -> None:
    """`train` (or a stage's settings over it, `given` being those the stage set itself) is usable."""

    def where(name: str) -> str:  # a value the stage took from `train` was checked there
        return f"{prefix}.{name}" if given is None or name in given else f"train.{name}"

    positive(where("batch_size"), train.batch_size)
    positive(where("lr"), train.lr)
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(where("optimizer"), f"unknown {train.optimizer!r}; use one of {OPTIMIZERS}")
    if train.weight_decay < 0:
        raise ConfigError(where("weight_decay"), "must be ≥ 0")


def validate_distill(prefix: str, distill: DistillConfig, given: dict[str, Any] | None = None) -> None:
    """Every term's weight is a finite number ≥ 0 and every setting > 0 (the terms: `pxd.losses.terms`)."""

    def where(name: str) -> str:
        return f"{prefix}.{name}" if given is None or name in given else f"distill.{name}"

    rows = loss_terms()
    for row in rows:
        value = getattr(distill, row.name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(where(row.name), f"weight must be a finite number ≥ 0 (got {value})")
        if row.maximum is not None and value > row.maximum:
            raise ConfigError(where(row.name), f"must be ≤ {row.maximum:g} (got {value:g}): {row.above_maximum}")
    for setting in (setting for row in rows for setting in row.settings):
        positive(where(setting.name), getattr(distill, setting.name))



def has_weights(model: ModelConfig) -> bool:
    return model.checkpoint is not None or model.pretrained


def positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be > 0 (got {value!r})")


def validate_dataset(ds: DatasetConfig) -> None:
    if ds.kind not in DATASET_KINDS:
        raise ConfigError("dataset.kind", f"unknown {ds.kind!r}; use one of {DATASET_KINDS}")
    positive("dataset.image_size", ds.image_size)
    if not 0 < ds.eval_crop <= 1:
        raise ConfigError("dataset.eval_crop", f"must be in (0, 1] (got {ds.eval_crop})")
    if ds.kind == "synthetic":
        if ds.num_classes < 2:
            raise ConfigError("dataset.num_classes", f"must be ≥ 2 (got {ds.num_classes})")
        train, val = ds.per_class_caps()
        positive("dataset.train_per_class", train)
        positive("dataset.val_per_class", val)
        return
    for name in ("train_per_class", "val_per_class"):
        value = getattr(ds, name)
        if value is not None and value < 0:
            raise ConfigError(f"dataset.{name}", f"a cap must be ≥ 0 (got {value}); leave it unset or 0 to use every image")
    if not 0 < ds.val_fraction < 1:
        raise ConfigError("dataset.val_fraction", f"must be in (0, 1) (got {ds.val_fraction})")
    if ds.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError("dataset.on_bad_image", f"unknown {ds.on_bad_image!r}; use one of {BAD_IMAGE_POLICIES}")
    if ds.cache_dir is not None and Path(ds.cache_dir).expanduser().is_file():
        raise ConfigError("dataset.cache_dir", f"{ds.cache_dir} is a file; point it at a folder (created if missing)")
    if not ds.path:
        raise ConfigError("dataset.path", f"dataset.kind {ds.kind!r} needs a local path; nothing is downloaded")
    if not Path(ds.path).expanduser().exists():
        raise ConfigError("dataset.path", f"{ds.path} does not exist; nothing is downloaded, point it at local files")
