"""The single-point pipeline config: one teacher → assistant → student run.

A `pxd train` file and a search-space file share this format; in a search space any leaf may be a
distribution instead of a value (see `orchestrator.space.spec`). Everything that can be checked before
compute is checked here, and every error names its field (`student.resolution: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxd.errors import ConfigError
from pxd.paths import join

__all__ = [
    "DISTILL_TERMS",
    "DatasetConfig",
    "ModelConfig",
    "TeacherConfig",
    "StudentConfig",
    "AssistantConfig",
    "DistillConfig",
    "TrainConfig",
    "StageTrainConfig",
    "AssistantDistillConfig",
    "PipelineConfig",
    "parse_dataclass",
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


# Every loss term's name, in the order stages compute and log them. The table of what each term is
# (`pxd.losses.terms.LOSS_TERMS`) has exactly these rows; a test checks it. Kept here as plain names
# so that importing the config never imports torch.
DISTILL_TERMS = ("ce", "kd", "isrd", "feature", "attention", "pairwise", "mmd", "adversarial")


@dataclass(frozen=True)
class DistillConfig:
    """Loss weights of the assistant and student stages (the teacher always trains on labels alone).

    Logit KD uses the papers' convex weighting (Hinton et al. 2015; Guo et al., TPAMI 2024, official
    `KDLoss`): ``ce·(1 − α)·CE + α·T²·KL`` with ``α = kd``. ``kd: 0`` is cross-entropy only; α > 1 is
    accepted (the label term's weight is then 0 and KD is scaled by α). 0 switches any term off.
    """

    ce: float = 1.0  # scale of the label term: its weight is ce·(1 − kd) while distilling
    kd: float = 0.9  # α, the share of logit KD (paper: 0.9)
    temperature: float = 4.0  # KD temperature T (paper: 4)
    isrd: float = 10.0  # ISRD weight η (paper: 10 at 2× fewer pixels per side, 50 at 4×); student only
    feature: float = 0.0  # cross-resolution feature MSE on every stage with a map larger than 1×1
    attention: float = 0.0  # attention transfer (Zagoruyko & Komodakis 2017; paper β = 1000)
    pairwise: float = 0.0  # RAKD pair-wise similarity (Feng et al., TIP 2021)
    mmd: float = 0.0  # RAKD maximum mean discrepancy
    adversarial: float = 0.0  # RAKD adversarial feature discriminator (non-saturating, own optimiser)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"
    # 0.05 / 4: at T = 4 the KD logit gradient α·T·(p_s − p_t) is up to ~4× cross-entropy's, and at 0.05 an
    # assistant distilled from scratch stalls (0.51 vs 0.88 at 0.0125; docs/benchmarks.md). The paper's
    # 0.01 is for ImageNet-pretrained students and 120 epochs.
    lr: float = 0.0125
    weight_decay: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 3  # assistant and student epochs unless they set their own
    device: str = "auto"  # auto: cuda when available
    # Data kept on the training device up to this many bytes (uint8 images); the rest stays on the host.
    max_device_data_bytes: int = 4 * 1024**3
    # channels_last memory format for models and batches on CUDA (ignored on CPU). Off by default: on an
    # H200 (torch 2.11, cuDNN 9.19) it made every new input shape of a depthwise-conv model
    # (mobilenetv3_small_050) cost 2–7 s before its first step, and small models ran no faster
    # (docs/benchmarks.md, "GPU fast path"). Speed only: it is not part of a stage's key.
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


def _set_fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if getattr(config, f.name) is not None}


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pxd"
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, ignore: tuple[str, ...] = ("search",)) -> PipelineConfig:
        """Parse and validate; raises `ConfigError` naming the first bad field."""
        raw = {k: v for k, v in raw.items() if k not in ignore}
        config = parse_dataclass(cls, raw, prefix="")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def teacher_train(self) -> TrainConfig:
        """What trains the teacher: `train` with the teacher's own settings (`teacher.train`) applied."""
        return dataclasses.replace(self.train, **_set_fields(self.teacher.train))

    @property
    def assistant_train(self) -> TrainConfig:
        """What trains the assistant: `train` with `assistant.train` applied."""
        return dataclasses.replace(self.train, **_set_fields(self.assistant.train))

    @property
    def assistant_distill(self) -> DistillConfig:
        """The assistant's weights: `distill` with the assistant's own settings (`assistant.distill`) applied."""
        return dataclasses.replace(self.distill, **_set_fields(self.assistant.distill))

    @property
    def assistant_epochs(self) -> int:
        return self.assistant.epochs if self.assistant.epochs is not None else self.train.epochs

    @property
    def student_epochs(self) -> int:
        return self.student.epochs if self.student.epochs is not None else self.train.epochs

    def validate(self) -> None:
        """Checks that need no compute (timm names, sizes, paths). Raises `ConfigError`."""
        _validate_dataset(self.dataset)
        _validate_model("teacher", self.teacher)
        _validate_model("student", self.student)
        if self.student.resolution > self.teacher.resolution:
            raise ConfigError(
                "student.resolution",
                f"{self.student.resolution} is larger than teacher.resolution "
                f"{self.teacher.resolution}; pixel distillation needs student ≤ teacher",
            )
        if self.teacher.epochs < 0 or (self.teacher.epochs == 0 and not _has_weights(self.teacher)):
            raise ConfigError(
                "teacher.epochs",
                f"must be > 0 (got {self.teacher.epochs}); 0 is allowed only with "
                "teacher.checkpoint or teacher.pretrained",
            )
        _positive("train.epochs", self.train.epochs)
        if self.assistant.epochs is not None:
            _positive("assistant.epochs", self.assistant.epochs)
        if self.student.epochs is not None:
            _positive("student.epochs", self.student.epochs)
        _validate_optimiser("train", self.train)
        # the teacher's own settings, checked where the user wrote them
        _validate_optimiser("teacher.train", self.teacher_train, given=_set_fields(self.teacher.train))
        if self.train.device not in DEVICES:
            raise ConfigError("train.device", f"unknown {self.train.device!r}; use one of {DEVICES}")
        _validate_distill("distill", self.distill)
        if self.assistant.enabled:
            _validate_optimiser("assistant.train", self.assistant_train, given=_set_fields(self.assistant.train))
            _validate_distill("assistant.distill", self.assistant_distill, given=_set_fields(self.assistant.distill))
        _validate_distill_stages(self)


def _validate_optimiser(prefix: str, train: TrainConfig, given: dict[str, Any] | None = None) -> None:
    def where(name: str) -> str:  # a value the stage took from `train` was checked there
        return f"{prefix}.{name}" if given is None or name in given else f"train.{name}"

    _positive(where("batch_size"), train.batch_size)
    _positive(where("lr"), train.lr)
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(where("optimizer"), f"unknown {train.optimizer!r}; use one of {OPTIMIZERS}")
    if train.weight_decay < 0:
        raise ConfigError(where("weight_decay"), "must be ≥ 0")


def _validate_distill(prefix: str, distill: DistillConfig, given: dict[str, Any] | None = None) -> None:
    def where(name: str) -> str:
        return f"{prefix}.{name}" if given is None or name in given else f"distill.{name}"

    for name in DISTILL_TERMS:
        value = getattr(distill, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(where(name), f"weight must be a finite number ≥ 0 (got {value})")
    _positive(where("temperature"), distill.temperature)


def _validate_distill_stages(cfg: PipelineConfig) -> None:
    """Every distilled stage has a term to train with, and spatial terms a map larger than 1×1."""
    from pxd.losses.terms import stage_loss_weights  # local: keeps `import pxd.config` free of torch

    stages = {"student": (cfg.student.resolution, cfg.distill, "distill")}
    if cfg.assistant.enabled:
        stages = {"assistant": (cfg.teacher.resolution, cfg.assistant_distill, "assistant.distill"), **stages}
    for stage, (resolution, distill, section) in stages.items():
        weights = stage_loss_weights(distill, distilling=True, student_resolution=resolution,
                                     teacher_resolution=cfg.teacher.resolution)
        if not weights:
            raise ConfigError(
                section,
                f"the {stage} stage has no loss term with a weight > 0 (the label term's weight is "
                "ce·(1 − kd); isrd applies only below the teacher's resolution): nothing would train "
                f"it; set {section}.kd or another term > 0",
            )
        if "feature" in weights or "attention" in weights:
            from pxd.losses.feature import spatial_stage_pairs
            from pxd.losses.terms import TermContext
            from pxd.models import meta_tap_info

            context = TermContext(
                student=meta_tap_info(cfg.student, resolution, "student"),
                teacher=meta_tap_info(cfg.teacher, cfg.teacher.resolution, "teacher"),
                student_resolution=resolution, teacher_resolution=cfg.teacher.resolution, temperature=1.0,
            )
            for name in ("feature", "attention"):
                if name in weights:
                    spatial_stage_pairs(context, name)  # ConfigError when no stage is usable


def _has_weights(model: ModelConfig) -> bool:
    return model.checkpoint is not None or model.pretrained


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be > 0 (got {value!r})")


def _validate_dataset(ds: DatasetConfig) -> None:
    if ds.kind not in DATASET_KINDS:
        raise ConfigError("dataset.kind", f"unknown {ds.kind!r}; use one of {DATASET_KINDS}")
    _positive("dataset.image_size", ds.image_size)
    if not 0 < ds.eval_crop <= 1:
        raise ConfigError("dataset.eval_crop", f"must be in (0, 1] (got {ds.eval_crop})")
    if ds.kind == "synthetic":
        if ds.num_classes < 2:
            raise ConfigError("dataset.num_classes", f"must be ≥ 2 (got {ds.num_classes})")
        train, val = ds.per_class_caps()
        _positive("dataset.train_per_class", train)
        _positive("dataset.val_per_class", val)
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


def _validate_model(role: str, model: ModelConfig) -> None:
    # local: importing timm and torch costs seconds, keep `import pxd.config` cheap
    import timm

    from pxd.models import (  # builds on the meta device: no memory, no download
        BLOCKWISE_FAMILIES,
        check_model_supported,
    )

    _positive(f"{role}.resolution", model.resolution)
    if model.arch in BLOCKWISE_FAMILIES:
        if not model.depths or not model.widths:
            raise ConfigError(f"{role}.depths", f"{model.arch} needs depths and widths (one per stage)")
        if len(model.depths) != len(model.widths):
            raise ConfigError(f"{role}.widths", "needs as many entries as depths")
        if any(d < 1 for d in model.depths) or any(w < 1 for w in model.widths):
            raise ConfigError(f"{role}.depths", "depths and widths must be ≥ 1")
    elif not timm.is_model(model.arch):
        close = timm.list_models(f"*{model.arch.split('_')[0]}*")[:5]
        hint = f"; did you mean one of {close}?" if close else "; see timm.list_models()"
        raise ConfigError(f"{role}.arch", f"unknown timm model {model.arch!r}{hint}")
    elif model.depths is not None or model.widths is not None:
        raise ConfigError(f"{role}.depths", f"depths/widths apply only to {BLOCKWISE_FAMILIES}")
    if model.checkpoint is not None and not Path(model.checkpoint).expanduser().is_file():
        raise ConfigError(f"{role}.checkpoint", f"{model.checkpoint} is not a file")
    if model.patch_size is not None and (model.patch_size < 1 or model.resolution % model.patch_size):
        raise ConfigError(f"{role}.patch_size", f"must divide {role}.resolution {model.resolution}")
    check_model_supported(model, role)


# ---------------------------------------------------------------------------------------------
# dict → dataclass, with errors naming the field


def parse_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """A dataclass from a plain mapping, every value checked against its type hint; nested dataclasses,
    `tuple[X, ...]`, `dict[str, X]` and optional fields included. Errors name the dotted field
    (`student.depths.1`, `search.sampler.seed`), `prefix` being the path of `raw` itself."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "config", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in raw if key not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(join(prefix, unknown[0]), f"unknown key; {hint}known keys here: {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in raw:
            raise ConfigError(join(prefix, name), f"missing; {cls.__name__} needs {', '.join(required)}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, join(prefix, name))
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, prefix=name)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return {str(key): _coerce(args[1], item, join(name, key)) for key, item in value.items()}
    if hint is Any:
        return value
    if isinstance(value, dict):
        raise ConfigError(name, f"expected a single value, got a mapping {value!r} (distributions belong in a search space run by `pxd sweep`)")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, join(name, i)) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    return value
