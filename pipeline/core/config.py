"""The params.yaml contract: typed, frozen, validated once at the edge.

`load_config(path)` is the only place that reads params.yaml. Everything below it receives a
`Config` object. User mistakes raise `ConfigError` with one line per problem, each naming the
dotted key, what is allowed and what was given (``train.lr_d: must be > 0, got -1``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.datasets import DATASETS as DATASET_REGISTRY
from pipeline.core.draws import Phase
from pipeline.core.losses import LOSSES as LOSS_REGISTRY
from pipeline.core.models import ARCHS, NORMS

# the names each registry holds: adding a dataset, loss, architecture or norm is one entry there
DATASETS = tuple(DATASET_REGISTRY)
TARGETS = tuple(name for name, d in DATASET_REGISTRY.items() if d.can_be_target)
LOSSES = tuple(LOSS_REGISTRY)


class ConfigError(ValueError):
    """A user mistake in params: the message is ready to print as is."""


class _Section(BaseModel):
    # strict: a string where a bool or a number belongs (`yes`, "3"), a float where an integer
    # belongs (1.0) and non-finite numbers are refused, never coerced
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: Literal[DATASETS] = "grid"  # type: ignore[valid-type]
    path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    n_samples: int = Field(50_000, gt=0, description="points drawn for ring/grid, images for shapes")
    resolution: int | None = Field(
        None, description="image side for shapes (default 32) / imagefolder (default 64), a power of two 8..256"
    )
    channels: Literal[1, 3] | None = Field(None, description="shapes / imagefolder: 1 (grey) or 3 (RGB)")
    labels: Literal["none", "folders"] = Field("none", description="imagefolder: class = first sub-folder")
    # CycleGAN: domain B (Y), unpaired with domain A (X) = `name`; both built-in image sets
    target: Literal[TARGETS] | None = None  # type: ignore[valid-type]

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and (v < 8 or v > 256 or v & (v - 1)):
            raise ValueError(f"must be a power of two in 8..256, got {v}")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if DATASET_REGISTRY[self.name].path and not self.path:
            raise ValueError(f"data.path: required when data.name is {self.name}")
        if self.labels == "folders" and self.name != "imagefolder":
            raise ValueError(f"data.labels: folders labels an imagefolder, got data.name {self.name}")
        if self.target is not None and self.name not in TARGETS:
            raise ValueError(f"data.target: domain A (data.name) must be {' or '.join(TARGETS)}, got {self.name}")
        if self.target is not None and self.target == self.name:
            raise ValueError(f"data.target: must differ from data.name, got {self.target}")
        return self


class ModelConfig(_Section):
    family: Literal["gan", "cyclegan"] = "gan"  # cyclegan: two generators X->Y, Y->X, two discriminators
    arch: Literal[tuple(ARCHS)] = "mlp"  # type: ignore[valid-type]
    z_dim: int = Field(2, gt=0)
    hidden: int = Field(128, gt=0, description="MLP width / DCGAN and ResNet base channels")
    d_hidden: int | None = Field(None, gt=0, description="the discriminator's own width, null = model.hidden")
    layers: int = Field(3, gt=0, description="MLP hidden layers")
    d_norm: Literal[tuple(NORMS)] = "none"  # type: ignore[valid-type]
    d_activation: Literal["relu", "leaky_relu", "tanh"] = "leaky_relu"
    conditional: bool = False
    pack: int = Field(1, ge=1)
    attention: int | None = Field(None, description="resnet: a self-attention block at this resolution, null = none")

    @property
    def d_width(self) -> int:
        """The discriminator's width: `d_hidden`, or `hidden` when that is null."""
        return self.hidden if self.d_hidden is None else self.d_hidden

    @model_validator(mode="after")
    def _attention_side(self) -> "ModelConfig":
        a = self.attention
        if a is not None and self.arch != "resnet":
            raise ValueError(f"model.attention: only arch resnet has self-attention, got arch {self.arch}")
        if a is not None and (a < 8 or a > 256 or a & (a - 1)):
            raise ValueError(f"model.attention: must be a power of two in 8..256 (a resolution), got {a}")
        return self

    @model_validator(mode="after")
    def _conditional_unpacked(self) -> "ModelConfig":
        if self.conditional and self.pack > 1:
            raise ValueError(f"model.pack: conditional models judge single samples, got pack {self.pack}")
        return self


class LossConfig(_Section):
    name: Literal[LOSSES] = "nonsaturating"  # type: ignore[valid-type]
    gp_weight: float = Field(10.0, ge=0.0)
    clip: float = Field(0.01, gt=0.0)
    r1_gamma: float = Field(0.1, ge=0.0)
    cycle_weight: float = Field(10.0, ge=0.0, description="CycleGAN: L1 cycle-consistency weight lambda")
    identity_weight: float = Field(0.0, ge=0.0, description="CycleGAN: L1 identity-mapping weight, 0 = off")


class AdaConfig(_Section):
    enabled: bool = False
    target: float = Field(0.6, gt=0.0, lt=1.0)
    interval: int = Field(4, gt=0)
    speed_img: int = Field(500_000, gt=0, description="images for p to cross [0, 1] at full speed")
    p_max: float = Field(0.7, gt=0.0, le=1.0, description="cap on p: above ~0.75 augmentations leak into G")


class TrainConfig(_Section):
    steps: int = Field(10_000, gt=0)
    batch_size: int = Field(256, gt=0, description="global batch, split across workers")
    lr_g: float = Field(1e-3, gt=0.0)
    lr_d: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = Field((0.5, 0.999), strict=False)  # a YAML list; its items stay strict
    lr_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="both learning rates fall linearly by this fraction by the last step"
    )
    n_critic: int = Field(1, ge=1, le=Phase.MAX_CRITIC_STEPS)  # each critic step has its own random streams
    update: Literal["alternating", "simultaneous"] = "alternating"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    ema: float = Field(0.999, ge=0.0, lt=1.0, description="generator EMA decay, 0 = off")
    # what D sees of reals and fakes: ADA (settings in train.ada) or DiffAugment; exclusive
    augment: Literal["none", "ada", "diffaugment"] = "none"
    ada: AdaConfig = AdaConfig()
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each Ray worker holds; torch uses as many threads")
    use_gpu: Literal["auto", True, False] = "auto"
    deterministic: bool = Field(
        True, description="GPUs: deterministic algorithms and no TF32, so a rerun repeats bit for bit (CPU always is)"
    )
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0)
    log_every: int = Field(200, gt=0)
    pool_size: int = Field(50, ge=0, description="CycleGAN: history pool of past fakes per D, 0 = off")
    # the stability monitor (pipeline.core.monitor): how often it judges, and what a `diverged` verdict does
    monitor_every: int = Field(50, gt=0, description="steps between the stability monitor's verdicts")
    on_divergence: Literal["warn", "stop", "rollback"] = "rollback"
    rollback_lr_factor: float = Field(0.5, gt=0.0, lt=1.0, description="rollback: both learning rates times this")
    max_rollbacks: int = Field(3, ge=0, description="rollback: at most this many, then the run stops")

    @model_validator(mode="before")
    @classmethod
    def _one_augment(cls, raw: Any) -> Any:
        """`train.augment: ada` and `train.ada.enabled: true` say the same thing: each implies the other."""
        if not isinstance(raw, dict):
            return raw
        ada = raw.get("ada") if isinstance(raw.get("ada"), dict) else {}
        augment, enabled = raw.get("augment", "none"), ada.get("enabled")
        if augment == "diffaugment" and enabled is True:
            raise ValueError("train.augment: diffaugment and ADA (train.ada.enabled: true) are exclusive; pick one")
        if augment == "ada" and enabled is False:
            raise ValueError("train.ada.enabled: false contradicts train.augment: ada")
        if enabled is True and augment == "none":
            return {**raw, "augment": "ada"}
        if augment == "ada" and enabled is None:
            return {**raw, "ada": {**ada, "enabled": True}}
        return raw

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"must be two numbers in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _simultaneous_single_critic(self) -> "TrainConfig":
        if self.update == "simultaneous" and self.n_critic != 1:
            raise ValueError(f"train.n_critic: simultaneous updates take one critic step, got {self.n_critic}")
        return self

    @model_validator(mode="after")
    def _batch_divisible(self) -> "TrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size: must be divisible by train.num_workers ({self.num_workers}), got {self.batch_size}"
            )
        return self


class TuneConfig(_Section):
    num_samples: int = Field(8, gt=0)
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    search_alg: Literal["random", "optuna"] = "random"
    metric: str = "w1"
    mode: Literal["min", "max"] = "min"
    max_concurrent: int = Field(2, gt=0)
    # the documented `dvc repro pipelines/tune/dvc.yaml` runs as is: a search over the learning rates
    search_space: dict[str, Any] = {
        "train.lr_g": {"loguniform": [0.0001, 0.01]},
        "train.lr_d": {"loguniform": [0.0001, 0.01]},
    }


class EvalConfig(_Section):
    n_samples: int = Field(2500, gt=0)
    every: int = Field(1000, ge=0)  # in-training evaluation every N steps (and at the end); 0 = off
    live_samples: int = Field(1000, ge=50)  # samples per in-training evaluation


class ExportConfig(_Section):
    formats: list[Literal["torchscript", "onnx"]] = ["torchscript", "onnx"]
    model_name: str = Field("ganpipe-generator", min_length=1)


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str = Field("ganpipe", min_length=1)
    flush_timeout_s: float = Field(
        120.0,
        ge=0,
        description="at the end of training, how long to wait for an absent server to take buffered metrics",
    )


class StorageConfig(_Section):
    root: str = ".ganpipe/ray"
    s3_endpoint_url: str | None = None

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.strip():  # Ray would write its run folders into the working folder
            raise ValueError("must be s3://bucket/prefix or a local path, got an empty string")
        # `s3:/b`, `S3://b` or `gs://b` would otherwise become a local folder of that name
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]+:/", v) and not v.startswith("s3://"):
            raise ValueError(f"must be s3://bucket/prefix or a local path, got {v!r}")
        if v.startswith("s3://") and not v[len("s3://") :].split("/")[0]:
            raise ValueError(f"names no bucket, got {v!r}")
        return v


class RayConfig(_Section):
    address: str | None = None
    num_cpus: int | None = Field(2, gt=0, description="CPUs for a local Ray; null = all")


class Config(_Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cyclegan_checks(self) -> "Config":
        cyc, target = self.model.family == "cyclegan", self.data.target
        if cyc and target is None:
            raise ValueError("data.target: model.family cyclegan needs a second domain (digits or mnist5k), got null")
        if not cyc and target is not None:
            raise ValueError(f"data.target: only model.family cyclegan uses a second domain, got {target}")
        if not cyc:
            return self
        refused = {
            "model.arch": (self.model.arch != "dcgan", f"cyclegan uses the dcgan discriminator, got {self.model.arch}"),
            "model.conditional": (self.model.conditional, "cyclegan is unconditional, got true"),
            "model.pack": (self.model.pack != 1, f"cyclegan judges single images, got {self.model.pack}"),
            "train.update": (self.train.update != "alternating", "cyclegan supports alternating, got simultaneous"),
            "train.augment": (
                self.train.augment != "none",
                f"cyclegan does not support augmentation yet, got {self.train.augment}",
            ),
            "train.precision": (self.train.precision == "fp16", "cyclegan supports fp32 and bf16, got fp16"),
        }
        for key, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"{key}: {why}")
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        dataset, arch = DATASET_REGISTRY[self.data.name], ARCHS[self.model.arch]
        if dataset.kind != "any" and arch.kind != dataset.kind:
            fits = " or ".join(n for n, a in ARCHS.items() if a.kind == dataset.kind)
            what = "2D data" if dataset.kind == "points" else "image data"
            raise ValueError(f"model.arch: {what} ({self.data.name}) needs {fits}, got {self.model.arch}")
        if (self.train.batch_size // self.train.num_workers) % self.model.pack:
            raise ValueError(
                f"model.pack: the per-worker batch ({self.train.batch_size // self.train.num_workers}) "
                f"must be divisible by it, got {self.model.pack}"
            )
        if self.model.conditional and dataset.labels == "none":
            labelled = ", ".join(n for n, d in DATASET_REGISTRY.items() if d.labels == "classes")
            raise ValueError(
                f"model.conditional: {self.data.name} has no class labels; use {labelled} or an npz with 'y'"
            )
        if dataset.kind == "images" and self.data.resolution is not None:  # fails before prepare, not after
            side, channels = self.data.resolution, self.data.channels or 3
            try:
                arch.check_shape([channels, side, side])
            except ValueError as e:
                raise ValueError(f"{e} (data.resolution {side})") from None
        if arch.kind == "points" and self.train.augment == "diffaugment":
            raise ValueError("train.augment: diffaugment transforms images; 2D data (arch mlp) takes none or ada")
        if arch.kind == "points" and NORMS[self.model.d_norm].dense is None:
            images = " or ".join(n for n, a in ARCHS.items() if a.kind == "images")
            raise ValueError(
                f"model.d_norm: {self.model.d_norm} norm needs image data (arch {images}), got {self.model.d_norm}"
            )
        loss = LOSS_REGISTRY[self.loss.name]
        if self.train.precision == "fp16" and (loss.gradient_penalty or self.loss.r1_gamma > 0):
            raise ValueError(
                "train.precision: fp16 loss scaling does not cover gradient penalties (WGAN-GP, R1); use bf16 or fp32"
            )
        if self.train.precision == "fp16" and self.train.update == "simultaneous":
            raise ValueError("train.precision: fp16 supports alternating updates only; use bf16 or fp32")
        if self.train.use_gpu is True:
            check_on_gpu(self)
        if loss.per_sample_critic and NORMS[self.model.d_norm].couples_samples:
            raise ValueError(
                f"model.d_norm: batch norm couples the samples of a batch, but a {self.loss.name} critic must "
                "score each sample alone (the Kantorovich dual; the WGAN-GP penalty is per sample); use none, "
                "layer or instance, got batch"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def public_dict(self) -> dict[str, Any]:
        """`to_dict` with credentials removed (pipeline.core.secrets): the form every written copy takes."""
        from pipeline.core.secrets import redact_tree

        return redact_tree(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as MLflow params."""
        return flatten(self.to_dict())

    def fingerprint(self, *keys: str) -> str:
        """Stable short hash of the given sections or dotted keys (everything when none given)."""
        d = self.to_dict()
        flat = self.flat()
        picked = {k: d[k] if k in d else flat[k] for k in (keys or d.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values. A mapping whose own keys are dotted (tune.search_space) is one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not _keyed_by_params(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


_TYPES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "finite_number": "a finite number",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error -> `key: must be ..., got X`."""
    key = ".".join(str(p) for p in err["loc"])
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind in _OPS:
        limit = next(iter(ctx.values()))
        limit = f"{limit:g}" if isinstance(limit, float) else limit
        return f"{key}: must be {_OPS[kind]} {limit}, got {got!r}"
    if kind == "literal_error":
        return f"{key}: must be one of {ctx.get('expected', '')}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if ":" in msg.split(" ")[0]:
            return msg  # already names its key
        return f"{key}: {msg}" if key else msg
    if kind == "missing":
        return f"{key}: required"
    if kind in _TYPES:
        return f"{key}: must be {_TYPES[kind]}, got {got!r}"
    return f"{key}: {err['msg'].lower()}, got {got!r}"


def check_on_gpu(cfg: Config) -> None:
    """Refusals that hold only when training runs on GPUs (checked by the validator for
    `train.use_gpu: true`, and once `auto` is resolved to GPUs)."""
    if cfg.train.num_workers > 1 and cfg.model.d_norm == "batch" and cfg.loss.r1_gamma > 0:
        raise ValueError(
            "model.d_norm: batch norm on 2+ GPU workers becomes SyncBatchNorm, which has no second derivative, "
            f"but R1 (loss.r1_gamma: {cfg.loss.r1_gamma}) differentiates D's gradient; use none, layer, instance "
            "or spectral, set loss.r1_gamma: 0, or train on one GPU worker, got batch"
        )


def build_config(raw: dict[str, Any] | None) -> Config:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err) for err in e.errors())) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last), and
    reading scalars as YAML 1.2 does, like DVC (ruamel.yaml): only true/false are booleans (`yes`,
    `on` stay strings, which the schema then refuses), and 1e-4 is a number, not a string."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # a list or a mapping as a key: not hashable
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a name, got a {key_node.id}")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key}: given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_UniqueKeyLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold keys and values (a mapping), got a {type(data).__name__}")
    return data or {}


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    raw = read_yaml(path)
    if not raw:  # an emptied params.yaml must not silently mean "all defaults"
        raise ConfigError(f"{path}: empty; it must hold the params (see the repository's params.yaml)")
    if overrides:
        raw = deep_merge(raw, unflatten(overrides))
    return build_config(raw)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` merged into `base`, nested mappings merged key by key; a mapping keyed by
    dotted params keys (tune.search_space) replaces the old one whole (two distributions for one key
    would make no sense)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _keyed_by_params(v):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _keyed_by_params(d: dict[str, Any]) -> bool:
    return any("." in str(k) for k in d)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
