"""Typed, validated view of params.yaml.

Every hyperparameter lives in params.yaml; this module turns that mapping into frozen
dataclasses and refuses anything it does not understand, naming the key path, the bad
value and what is allowed. Nothing here instantiates classes from strings: choices are
`Literal` values that the library maps to code itself.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params value is missing, unknown, of the wrong type or out of range."""


def _rng(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> dict[str, float]:
    """Range metadata for a numeric field."""
    return {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}


def num(default: Any, **bounds: float) -> Any:
    """A numeric field with inclusive/exclusive bounds checked at load time."""
    return field(default=default, metadata=_rng(**bounds))


@dataclass(frozen=True)
class DataConfig:
    train_source: str = "builtin:photos"
    eval_source: str = "builtin:classic"
    image_column: str = "image"
    min_size: int = num(64, ge=1)
    max_images: int = num(0, ge=0)  # 0 = all images of the source
    samples_per_image: int = num(1, ge=1)  # cache entries per train image, i.e. crops per image per epoch
    train_short_side: tuple[int, int] = (96, 320)
    smooth_share: float = num(0.0, ge=0.0, le=1.0)  # train crops replaced by a detail-free version of themselves
    recolor_share: float = num(0.0, ge=0.0, le=1.0)  # train crops made grey or with their RGB channels reordered
    max_short_side: int | None = num(None, ge=8)  # stored train images' short side; null = train_short_side max
    jpeg_quality: int = num(95, ge=50, le=100)  # for train images that must be re-encoded from JPEG
    chunk_mb: int = num(64, ge=1)  # litdata chunk size
    eval_fraction: float = num(0.1, gt=0.0, lt=1.0)  # used when train and eval share a source
    max_image_pixels: int = num(200_000_000, ge=1)
    num_workers: int = num(0, ge=0)
    seed: int = num(0, ge=0)
    cache_uri: str | None = None  # s3:// gs:// azure:// r2:// prefix for the train cache (multi-node)


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["tiny", "sd-f8c4", "ldm-kl-f4", "sdxl-f8c4", "sd3-f8c16", "flux-f8c16"] = "tiny"
    block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int | None = num(None, ge=1)
    latent_channels: int | None = num(None, ge=1)
    norm_num_groups: int | None = num(None, ge=1)
    mid_block_attention: bool | None = None
    use_quant_conv: bool | None = None
    use_post_quant_conv: bool | None = None
    scaling_factor: float | None = num(None, gt=0.0)
    shift_factor: float | None = None
    gradient_checkpointing: bool = False
    init: Literal["pytorch", "scaled_residual"] = "pytorch"  # starting weights when not init_from
    init_logvar: float | None = num(None, ge=-30.0, le=10.0)  # starting posterior log-variance; null = the init's


@dataclass(frozen=True)
class LossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = num(1.0, ge=0.0)
    perceptual_start: int = num(0, ge=0)  # generator steps on the pixel loss alone before LPIPS joins
    kl_weight: float = num(1e-6, ge=0.0)
    learn_logvar: bool = False
    logvar_init: float = 0.0
    gan: Literal["hinge", "vanilla"] = "hinge"
    disc_start: int = num(0, ge=0)
    disc_factor: float = num(1.0, ge=0.0)
    disc_weight: float = num(0.5, ge=0.0)
    adaptive_weight_max: float = num(1e4, gt=0.0)
    lecam_weight: float = num(0.0, ge=0.0)
    lecam_decay: float = num(0.99, gt=0.0, lt=1.0)
    # the reconstruction term again on the pair's `lowpass_factor`-pixel block means, broadcast back
    # to every pixel: a colour or brightness shift over a block weighs as much as a pixel error
    lowpass_weight: float = num(0.0, ge=0.0)
    lowpass_factor: int = num(8, ge=2)
    # Equivariance regulariser (EQ-VAE, arXiv 2502.09509): the probability, per generator step, of a
    # second decode of the latent sample after a random downscale (and rotation by k x 90°), held
    # to the same transform of the image by the reconstruction and LPIPS terms. 0 = off.
    equivariance: float = num(0.0, ge=0.0, le=1.0)
    equivariance_weight: float = num(1.0, ge=0.0)  # times the plain reconstruction's per-pixel weight
    equivariance_scale: tuple[float, float] = (0.25, 0.96875)  # latent scale drawn from [min, max]
    equivariance_rotate: bool = True
    # Decoder robustness (training/latent_noise.py): the decoded latent gets Gaussian noise of a
    # per-sample scale drawn from [0, latent_noise] latent stds. 0 = off.
    latent_noise: float = num(0.0, ge=0.0, le=4.0)
    # Semi-amortised encoding (training/latent_refine.py): Adam steps on the batch's latents through
    # the decoder (`refine_lr` latent stds per step), then an encoder loss towards them. 0 = off.
    refine_steps: int = num(0, ge=0, le=50)
    refine_lr: float = num(0.05, gt=0.0, le=1.0)
    refine_weight: float = num(1.0, ge=0.0)


@dataclass(frozen=True)
class DiscriminatorConfig:
    ndf: int = num(64, ge=1)
    n_layers: int = num(3, ge=1, le=6)
    norm: Literal["batch", "group", "spectral", "spectral_group", "none"] = "group"


@dataclass(frozen=True)
class TrainConfig:
    resolution: int = num(64, ge=8)
    batch_size: int = num(8, ge=1)
    max_steps: int | None = num(1000, ge=1)  # optimisation windows (each = accumulate_grad_batches batches)
    # null max_steps: the window count is planned to fit this many seconds of training windows on
    # the machine at hand, and the step-valued schedule (loss.disc_start, loss.perceptual_start,
    # val_every, checkpoint_every, the LR schedule's length) is scaled by planned / plan_steps.
    time_budget_s: float = num(0.0, ge=0.0)
    plan_steps: int = num(1000, ge=1)  # the run length the step-valued params are written for
    # explicit max_steps with the step-valued schedule scaled by max_steps / plan_steps, as a budgeted
    # plan of that length scales it: replays another machine's budgeted run without timing
    scale_schedule: bool = False
    accumulate_grad_batches: int = num(1, ge=1)
    lr: float = num(2e-4, gt=0.0)
    disc_lr: float | None = num(None, gt=0.0)
    encoder_lr_scale: float = num(1.0, gt=0.0)  # the encoder's (and quant conv's) lr = lr x this
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = num(0.0, ge=0.0)
    lr_schedule: Literal["constant", "linear_warmup", "cosine"] = "constant"
    warmup_steps: int = num(0, ge=0)
    grad_clip: float = num(1.0, ge=0.0)  # 0 disables clipping
    gan_schedule: Literal["alternate", "both"] = "both"
    precision: Literal["32", "bf16-mixed", "16-mixed", "auto"] = "32"
    ema: bool = True
    ema_decay: float = num(0.999, gt=0.0, lt=1.0)
    decoder_only: bool = False
    init_from: str | None = None
    checkpoint_every: int = num(100, ge=1)
    val_every: int = num(250, ge=1)
    log_every: int = num(10, ge=1)
    max_bad_steps: int = num(20, ge=1)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int = num(1, ge=1)  # per node
    num_nodes: int = num(1, ge=1)  # machines in the job (torchrun / SLURM / MASTER_ADDR + NODE_RANK)
    strategy: Literal["auto", "ddp"] = "auto"  # ddp_spawn and fsdp are refused with the reason (UNSUPPORTED)
    num_workers: int = num(0, ge=0)
    val_images: int = num(16, ge=1)
    seed: int = num(0, ge=0)
    compile: bool = False  # torch.compile the encoder, decoder trunk, discriminator and LPIPS
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # multi-size training (data/crop_sizes.py): each batch at one of these sizes, shrunk to the
    # pixels of `batch_size` crops at `resolution`; null = every batch at `resolution`
    crop_sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EvalConfig:
    resolution: int = num(128, ge=8)
    batch_size: int = num(8, ge=1)
    use_ema: bool = True
    grid_images: int = num(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class ExportConfig:
    dir: str = "models/vae"
    compute_scaling_factor: bool = True
    scaling_images: int = num(64, ge=1)
    register_model: bool = True
    model_name: str = "sdvae"
    # also one bare LDM-layout file, <dir>/<model_name>.safetensors, for A1111/Forge/ComfyUI/InvokeAI
    single_file: bool = True
    single_file_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "sdvae"
    run_name: str | None = None


@dataclass(frozen=True)
class WeightsConfig:
    lpips_vgg: str | None = None  # explicit vgg16 backbone (torchvision .pth or our .safetensors)
    inception: str | None = None  # explicit torch-fidelity Inception state dict
    cache_dir: str | None = None  # None: $SDVAE_CACHE or ~/.cache/sdvae


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML/JSON/MLflow."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and `dvc exp -S` use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return f"list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def _bounds_text(meta: dict[str, float]) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{ops[k]} {v}" for k, v in meta.items() if k in ops)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, path: str, meta: dict[str, float]) -> Any:
    """Check `value` against annotation `tp`; return it in canonical form."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path, meta) if len(args) == 1 else fail(_describe(tp))
    if value is None:
        fail(_describe(tp) + (f" {_bounds_text(meta)}" if meta else ""))
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML reads `32` as int; precision-like choices are strings.
        if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in allowed:
            value = str(value)
        if value not in allowed:
            fail("one of " + ", ".join(repr(a) for a in allowed))
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            fail(_describe(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                fail("a non-empty " + _describe(tp))
            return tuple(_coerce(v, args[0], f"{path}[{i}]", meta) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(_describe(tp))
        return tuple(_coerce(v, a, f"{path}[{i}]", meta) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("int" + (f" {_bounds_text(meta)}" if meta else ""))
    elif tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads `5e-4`, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("float" + (f" {_bounds_text(meta)}" if meta else ""))
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail("str")
        return value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp} at {path}")
    checks = {
        "ge": value >= meta.get("ge", value),
        "gt": "gt" not in meta or value > meta["gt"],
        "le": value <= meta.get("le", value),
        "lt": "lt" not in meta or value < meta["lt"],
    }
    if not all(checks.values()):
        fail(f"{_describe(tp)} {_bounds_text(meta)}")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys in {path or 'params'}: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, data.get(name), key_path)
        elif name in data:
            values[name] = _coerce(data[name], tp, key_path, dict(f.metadata))
    obj = cls(**values)
    _cross_check(obj, path)
    return obj


def _cross_check(obj: Any, path: str) -> None:
    """Constraints that involve more than one key."""
    if isinstance(obj, DataConfig):
        lo, hi = obj.train_short_side
        if not 1 <= lo <= hi:
            raise ConfigError(
                f"{path}.train_short_side: expected [min, max] with 1 <= min <= max, got {list(obj.train_short_side)}"
            )
    if isinstance(obj, LossConfig):
        lo, hi = obj.equivariance_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"{path}.equivariance_scale: expected [min, max] with 0 < min <= max <= 1, "
                f"got {list(obj.equivariance_scale)}"
            )
    if isinstance(obj, ModelConfig) and any(c < 1 for c in obj.block_out_channels or ()):
        raise ConfigError(f"{path}.block_out_channels: expected positive ints, got {list(obj.block_out_channels)}")


def _downsample_factor(model: ModelConfig) -> int:
    from sdvae.architectures import PRESETS  # the presets' geometry has one home

    channels = model.block_out_channels or PRESETS[model.preset].block_out_channels
    return 2 ** (len(channels) - 1)


def _check_sources(data: DataConfig) -> None:
    from sdvae.data.sources import SourceError, parse_source

    for key in ("train_source", "eval_source"):
        try:
            parse_source(getattr(data, key))
        except SourceError as exc:
            raise ConfigError(f"data.{key}: {exc}") from exc


REMOTE_CACHE_SCHEMES = ("s3://", "gs://", "azure://", "r2://")  # object stores litdata streams from


# Values Lightning accepts that training refuses, with the reason (a plain "expected one of" would
# leave the user guessing why a standard strategy is missing).
UNSUPPORTED = {
    ("train", "strategy", "ddp_spawn"): "its launcher hands back only the weights, so the run's windows, history "
    "and plan stay at their initial values in the parent (run.json would report 0 windows, the metrics would be "
    "empty); use ddp, which launches the same processes and keeps them",
    ("train", "strategy", "fsdp"): "gradient clipping, the EMA copy and the last-layer hook of the adaptive GAN "
    "weight act on whole parameters, which FSDP shards; use ddp (gradient checkpointing lowers memory)",
}


def _check_unsupported(data: dict[str, Any]) -> None:
    for (section, key, value), why in UNSUPPORTED.items():
        if isinstance(data.get(section), dict) and data[section].get(key) == value:
            raise ConfigError(f"{section}.{key}: {value} is not supported: {why}")


def _check_config(cfg: Config) -> None:
    """Constraints across sections."""
    _check_sources(cfg.data)
    uri = cfg.data.cache_uri
    if uri is not None and (not uri.startswith(REMOTE_CACHE_SCHEMES) or len(uri.rstrip("/").split("/")) < 3):
        raise ConfigError(
            f"data.cache_uri: expected null or a bucket prefix starting with one of "
            f"{', '.join(REMOTE_CACHE_SCHEMES)} (e.g. s3://bucket/sdvae-cache), got {uri!r}"
        )
    if cfg.train.init_from is None:  # with init_from the architecture comes from that folder
        factor = _downsample_factor(cfg.model)
        for key in ("train.resolution", "eval.resolution"):
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value % factor:
                raise ConfigError(
                    f"{key}: expected a multiple of the model's downsampling factor {factor} "
                    f"(model.preset {cfg.model.preset!r}), got {value}"
                )
    if cfg.train.max_steps is None and cfg.train.time_budget_s <= 0:
        raise ConfigError(
            "train.max_steps: null plans the run to train.time_budget_s, which must then be > 0 "
            f"(got {cfg.train.time_budget_s}); set train.max_steps to a number of windows or give a budget"
        )
    _check_crop_sizes(cfg)
    lo, _ = cfg.data.train_short_side
    if lo < cfg.train.resolution:
        raise ConfigError(
            f"data.train_short_side: min {lo} must be >= train.resolution "
            f"{cfg.train.resolution} (crops are taken after resizing the short side)"
        )


def _check_crop_sizes(cfg: Config) -> None:
    sizes, t = cfg.train.crop_sizes, cfg.train
    if sizes is None:
        return
    # with init_from the architecture comes from that folder: its factor is checked when it loads
    factor = _downsample_factor(cfg.model) if t.init_from is None else 1
    if not sizes or any(s < t.resolution or s % factor for s in sizes):
        raise ConfigError(
            f"train.crop_sizes: expected null or sizes >= train.resolution {t.resolution}"
            + (f", each a multiple of the model's downsampling factor {factor}" if factor > 1 else "")
            + f", got {list(sizes)}"
        )


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Validate a params mapping into a `Config`."""
    _check_unsupported(data or {})
    cfg = _build(Config, data or {}, "")
    _check_config(cfg)
    return cfg


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: params file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return config_from_dict(data)
