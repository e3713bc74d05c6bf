"""The plan's sections as frozen dataclasses whose fields are their tables (:func:`entry`):
each key's check, default (for the augmentation: the value that switches it off) and meaning,
from which the key lists, off values and section checks are derived."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from medplan.errors import MedplanError
from medplan.plan.checks import (Check, choice, fail, flag, integer, number, numbers, pair, span, text,
                                 unknown_key)

SPLIT_STRATEGIES = ("kfold", "group_kfold")
#: who augments: medplan's BatchAugmenter (the keys below), or nnU-Net v2's default 2D pipeline
#: (batchgeneratorsv2, :mod:`medplan.data.nnunet_aug`), which ignores the keys below
AUGMENTATION_BACKENDS = ("medplan", "nnunet")
OPTIMIZERS = ("AdamW", "Adam")
LR_SCHEDULES = ("rex", "constant")  # medplan.trainers.schedule.SCHEDULES (kept equal by a test)
MONITORS = ("val_mIoU", "val_mDSC", "val_loss")
NORMALIZATION_SCHEMES = ("zscore", "minmax")
MAX_SEED = 2**32 - 1


# ----------------------------------------------------------------------------- frozen JSON values
class FrozenDict(dict):
    """A JSON object inside a frozen plan: reads as a dict, refuses changes (copy it with ``dict(d)``)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a plan is frozen; change its JSON and read it again with Plan.from_json")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:  # pickle and deepcopy without __setitem__
        return FrozenDict, (dict(self),)


def freeze(value: Any) -> Any:
    """JSON -> plan value: lists become tuples, objects FrozenDicts (recursively)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    return value


def thaw(value: Any) -> Any:
    """Plan value -> JSON: sections to objects, tuples to lists, FrozenDicts to dicts (fresh copies)."""
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- the tables
def entry(check: Check, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """One row of a section's table: the key's check, its default (none: the key is required)
    and what it means. Used as a dataclass field default."""
    metadata = {"check": check, "doc": doc}
    if isinstance(default, dict):  # a dataclass default must be hashable: a fresh copy per plan
        return field(default_factory=lambda: FrozenDict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def json_keys_field() -> Any:
    # the keys the JSON held, in its order (None: every key), so to_json gives the same JSON back
    return field(default=None, repr=False, compare=False, metadata={"json_keys": True})


def rows(cls: type) -> list[dataclasses.Field]:
    """The fields of a section (or the plan) made with :func:`entry`: one per JSON key."""
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


def has_default(f: dataclasses.Field) -> bool:
    """Whether the key is optional (it has a value for when it is absent)."""
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def default_of(f: dataclasses.Field) -> Any:
    """The value of an absent optional key."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class Section:
    """A frozen section of the plan; its table is its fields (see :func:`entry`)."""

    #: a rule between the section's keys, run after each key's own check: (value, key, source, plan)
    rule: ClassVar[Callable[[dict, str, Any, "dict | None"], None] | None] = None
    json_keys: tuple[str, ...] | None

    @classmethod
    def table(cls) -> list[dataclasses.Field]:
        """The rows of the section's table: one field per key (its check and meaning in ``metadata``)."""
        return rows(cls)

    @classmethod
    def spec(cls) -> dict[str, Check]:
        return {f.name: f.metadata["check"] for f in rows(cls)}

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return tuple(f.name for f in rows(cls) if not has_default(f))

    @classmethod
    def check(cls, value: Any, key: str, source: Any, plan: dict | None = None) -> Any:
        """Check a JSON object of this section (keys known, required ones there, each value, the rule)."""
        if not isinstance(value, dict):
            raise fail(key, "an object", value, source)
        spec = cls.spec()
        for sub in value:
            if sub not in spec:
                raise unknown_key(str(sub), spec, f"in '{key}': ", source)
        missing = [r for r in cls.required() if r not in value]
        if missing:
            raise MedplanError(f"'{key}' lacks key(s) {', '.join(missing)}", source)
        for sub, sub_value in value.items():
            spec[sub](sub_value, f"{key}.{sub}", source, plan)
        if cls.rule is not None:
            cls.rule(value, key, source, plan)
        return value

    @classmethod
    def from_checked(cls, value: dict) -> "Section":
        """From checked JSON (no checks here)."""
        return cls(**{k: freeze(v) for k, v in value.items()}, json_keys=tuple(value))  # type: ignore[call-arg]

    @classmethod
    def from_json(cls, value: Any, source: str | Path = "plans.json", key: str | None = None) -> "Section":
        """Check and build one section from its JSON object."""
        cls.check(value, key or cls.KEY, source)  # type: ignore[attr-defined]
        return cls.from_checked(value)

    def to_json(self) -> dict:
        """The JSON object: the keys it was read with, in their order, plus any set since."""
        return {k: thaw(getattr(self, k)) for k in written_keys(self)}


def written_keys(obj: Any) -> list[str]:
    """The JSON keys ``to_json`` writes: those read, in their order, plus any given a value since."""
    table = rows(type(obj))
    if obj.json_keys is None:
        return [f.name for f in table]
    keys = list(obj.json_keys)
    for f in table:  # a key absent from the JSON but given a value since (dataclasses.replace)
        if f.name not in keys and (not has_default(f) or getattr(obj, f.name) != default_of(f)):
            keys.append(f.name)
    return keys


def section_check(cls: type[Section]) -> Check:
    def check(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        return cls.check(value, key, source, plan)

    check.spec = cls.spec()  # type: ignore[attr-defined]  (read by check_overrides)
    check.section = cls  # type: ignore[attr-defined]
    return check


def nullable(check: Check) -> Check:
    def nullable(value: Any, key: str, source: Any, plan: dict | None) -> Any:
        return value if value is None else check(value, key, source, plan)

    nullable.spec = getattr(check, "spec", None)  # type: ignore[attr-defined]
    nullable.section = getattr(check, "section", None)  # type: ignore[attr-defined]
    return nullable


# ----------------------------------------------------------------------------- sections
def _split_rule(value: dict, key: str, source: Any, plan: dict | None) -> None:
    if value.get("strategy") == "group_kfold" and not value.get("group_column"):
        raise MedplanError("'split.group_column' must name the cases.csv column of the groups (patients) "
                           "when split.strategy is group_kfold", source)


@dataclass(frozen=True, kw_only=True)
class Split(Section):
    """How the kept cases are cut into folds (:mod:`medplan.splits`)."""

    KEY: ClassVar[str] = "split"
    rule: ClassVar = staticmethod(_split_rule)
    strategy: str = entry(choice(SPLIT_STRATEGIES), doc="kfold, or group_kfold: patient-aware")
    n_folds: int = entry(integer(2), doc="number of folds")
    seed: int = entry(integer(0, MAX_SEED), doc="seed of the split")
    group_column: str | None = entry(text(optional=True), None, "cases.csv column of the groups (group_kfold)")
    json_keys: tuple[str, ...] | None = json_keys_field()


def _normalization_rule(value: dict, key: str, source: Any, plan: dict | None) -> None:
    if value["scheme"] == "zscore":
        for sub in ("mean", "std"):
            if sub not in value:
                raise MedplanError(f"'normalization' (zscore) lacks key {sub!r}", source)
        if plan is not None and (len(value["mean"]) != plan.get("channels") or len(value["std"]) != plan.get("channels")):
            raise MedplanError("'normalization' needs one mean and one std per channel", source)


@dataclass(frozen=True, kw_only=True)
class Normalization(Section):
    """Intensity normalization on the 0..255 scale, applied on the fly after augmentation
    (:func:`medplan.preprocessing.normalize`)."""

    KEY: ClassVar[str] = "normalization"
    rule: ClassVar = staticmethod(_normalization_rule)
    scheme: str = entry(choice(NORMALIZATION_SCHEMES), doc="zscore: (x - mean[c]) / std[c]; minmax: x / 255")
    mean: tuple[float, ...] = entry(numbers(number(), "numbers (one per channel)"), (), "per channel (zscore)")
    std: tuple[float, ...] = entry(numbers(number(0, lo_open=True), "positive numbers (one per channel)"), (),
                                   "per channel (zscore)")
    json_keys: tuple[str, ...] | None = json_keys_field()


def augmentation_entry(off: Any, check: Check, doc: str) -> Any:
    """One row of the augmentation table: the value that switches it off, its check, its meaning."""
    return entry(check, off, doc)


@dataclass(frozen=True, kw_only=True)
class Augmentation(Section):
    """The augmentation table: every key of ``plans.json["augmentation"]`` with the value that
    switches it off (a missing key is off), its check and its meaning. The planner starts from
    the off values (:meth:`off_json`), the augmenter reads this object."""

    KEY: ClassVar[str] = "augmentation"
    backend: str = augmentation_entry("medplan", choice(AUGMENTATION_BACKENDS, suggest=True),
                                      "medplan: the keys below; nnunet: nnU-Net v2's default 2D augmentation "
                                      "(batchgeneratorsv2, CPU loader workers), the keys below unused")
    rotation_deg: float = augmentation_entry(0.0, number(0, 180), "rotation, uniform in [-r, r] degrees")
    p_rotation: float = augmentation_entry(0.0, number(0, 1), "probability of a rotation")
    scale: tuple[float, float] = augmentation_entry((1.0, 1.0), span(0), "content magnification range (> 1 enlarges)")
    p_scale: float = augmentation_entry(0.0, number(0, 1), "probability of scaling")
    hflip: bool = augmentation_entry(False, flag, "horizontal flips (each sample with p = 0.5)")
    vflip: bool = augmentation_entry(False, flag, "vertical flips (each sample with p = 0.5)")
    rot90: bool = augmentation_entry(False, flag, "quarter turns (each sample with p = 0.5)")
    brightness: float = augmentation_entry(0.0, number(0, 1), "brightness factor in [1-b, 1+b]")
    contrast: float = augmentation_entry(0.0, number(0, 1), "contrast factor in [1-c, 1+c] around the mean")
    p_intensity: float = augmentation_entry(0.0, number(0, 1), "probability of brightness and of contrast")
    saturation: float = augmentation_entry(0.0, number(0, 1), "saturation factor in [1-s, 1+s] (RGB only)")
    hue: float = augmentation_entry(0.0, number(0, 0.5), "hue shift in [-h, h] turns (RGB only)")
    p_color: float = augmentation_entry(0.0, number(0, 1), "probability of colour jitter")
    gamma: tuple[float, float] = augmentation_entry((1.0, 1.0), span(0), "gamma range on 0..1 intensities")
    p_gamma: float = augmentation_entry(0.0, number(0, 1), "probability of a gamma change")
    noise_std: float = augmentation_entry(0.0, number(0, 1), "gaussian noise std on 0..1 intensities")
    p_noise: float = augmentation_entry(0.0, number(0, 1), "probability of noise")
    blur_sigma: tuple[float, float] = augmentation_entry((0.5, 1.0), span(0), "gaussian blur sigma range (pixels)")
    p_blur: float = augmentation_entry(0.0, number(0, 1), "probability of a blur")
    json_keys: tuple[str, ...] | None = json_keys_field()

    @classmethod
    def off_json(cls) -> dict:
        """Every key with the value that switches it off (the planner's starting point)."""
        return cls().to_json()


@dataclass(frozen=True, kw_only=True)
class Optimizer(Section):
    KEY: ClassVar[str] = "optimizer"
    name: str = entry(choice(OPTIMIZERS, case_insensitive=True), doc="AdamW or Adam")
    weight_decay: float = entry(number(0), 0.01, "decoupled (AdamW) or L2 (Adam) weight decay")
    betas: tuple[float, float] = entry(pair(0.0, 1.0), (0.9, 0.999), "Adam's betas")
    json_keys: tuple[str, ...] | None = json_keys_field()


@dataclass(frozen=True, kw_only=True)
class Schedule(Section):
    KEY: ClassVar[str] = "lr_schedule"
    name: str = entry(choice(LR_SCHEDULES, case_insensitive=True),
                      doc="rex: lr_t = lr_0 (1 - z)/(1 - z/2), stepped per optimizer step; constant")
    json_keys: tuple[str, ...] | None = json_keys_field()


@dataclass(frozen=True, kw_only=True)
class Epochs(Section):
    KEY: ClassVar[str] = "epochs"
    lr_search: int = entry(integer(1), doc="epochs of each LR-search run")
    cv: int = entry(integer(1), doc="epochs of each cross-validation fold")
    json_keys: tuple[str, ...] | None = json_keys_field()

    def for_stage(self, stage: str) -> int:
        """The budget of a training stage (``cv`` or ``lr_search``)."""
        if stage not in ("cv", "lr_search"):
            raise MedplanError(f"unknown training stage {stage!r} (cv or lr_search)")
        return int(getattr(self, stage))


@dataclass(frozen=True, kw_only=True)
class EarlyStopping(Section):
    KEY: ClassVar[str] = "early_stopping"
    monitor: str = entry(choice(MONITORS), doc="validation metric watched")
    mode: str = entry(choice(("max", "min")), doc="max: higher is better")
    patience: int | None = entry(integer(1, optional=True), None, "epochs without improvement (null: never stop)")
    min_delta: float = entry(number(0), 0.0, "smallest change that counts as an improvement")
    json_keys: tuple[str, ...] | None = json_keys_field()


@dataclass(frozen=True, kw_only=True)
class Duplicates(Section):
    KEY: ClassVar[str] = "duplicates"
    hash: str | None = entry(text(optional=True), None, "perceptual hash of the near-duplicate search")
    hash_size: int | None = entry(integer(1, optional=True), None, "hash size in bits per side")
    threshold: int | None = entry(integer(0, optional=True), None, "Hamming distance of a near-duplicate")
    n_dropped: int | None = entry(integer(0, optional=True), None, "cases dropped as duplicates")
    json_keys: tuple[str, ...] | None = json_keys_field()


def _window_rule(value: dict, key: str, source: Any, plan: dict | None) -> None:
    if not value["high"] > value["low"]:
        raise fail(key, "a window with high > low", value, source)


@dataclass(frozen=True, kw_only=True)
class IntensityWindow(Section):
    """dataset.json's one window for images with more than 8 bits; prediction maps new images
    through the same window."""

    KEY: ClassVar[str] = "intensity_window"
    rule: ClassVar = staticmethod(_window_rule)
    low: float = entry(number(), doc="maps to 0")
    high: float = entry(number(), doc="maps to 255")
    images: int | None = entry(integer(0), None, "images it was measured on")
    source: str | None = entry(text(), None, "where it comes from")
    json_keys: tuple[str, ...] | None = json_keys_field()
