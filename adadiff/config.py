"""Frozen configuration objects, validated on construction and written to ``adadiff.json``.

Nothing here imports torch: the runtime, the CLI and the engines read the same config.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import numbers
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from adadiff.errors import ConfigError, OutputPathError

CONFIG_FILE = "adadiff.json"
CONFIG_VERSION = 1
# tile noise is seeded with (seed, tile) as 32-bit words: a seed of 2**32 or more would share its
# words, and so its noise, with a smaller seed (seed 2**32, tile 0 is seed 0, tile 1)
SEED_LIMIT = 2**32


class Choice(str, enum.Enum):
    """A closed choice; its value is the string of the JSON files and the command line, and it
    compares equal to that string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # the torch backend only


class BackendKind(Choice):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Schedule(Choice):
    ADAPTIVE = "adaptive"
    UNIFORM = "uniform"
    CONTENT = "content"  # each tile's uniform interval from its LR content (ContentConfig)


class Grouping(Choice):
    """How the sampler batches active tiles: all of them (regroup), by timestep, or one tile."""

    REGROUP = "regroup"
    TIMESTEP = "timestep"
    TILE = "tile"


class ExitGain(Choice):
    """Which gain DTSS's saturated exit watches: g_NR (the paper) or the total gain."""

    NR = "nr"
    TOTAL = "total"


class PredictionType(str, enum.Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class MetricKind(str, enum.Enum):
    FULL_REFERENCE = "fr"
    NO_REFERENCE = "nr"


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = [str(m.value) for m in cls]
        raise ConfigError(f"{what} must be one of {allowed}, got {value!r}") from None


def _numbers(
    obj: object, where: str, ints: tuple[str, ...] = (), reals: tuple[str, ...] = ()
) -> None:
    """``ConfigError`` naming ``where`` + the key unless each of ``ints`` is a whole number and
    each of ``reals`` a number: a "128" or 128.0 from a hand-edited adadiff.json loaded
    and failed later in torch or the tiling with a traceback."""
    for name in ints:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where}{name} must be a whole number, got {value!r}")
    for name in reals:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where}{name} must be a number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MetricConfig:
    """One MMLE score. ``weight`` carries the sign: R = sum(weight * score) grows with quality."""

    name: str
    kind: MetricKind
    weight: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(MetricKind, self.kind, "metric kind"))
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"a metric needs a name (a string), got {self.name!r}")
        _numbers(self, f"metric {self.name}: ", reals=("weight",))
        if not math.isfinite(self.weight):  # a NaN weight made every reward NaN
            raise ConfigError(f"metric {self.name}: weight must be finite, got {self.weight}")


# The six MMLE scores. The paper uses PSNR, LPIPS, AHIQ, NLPD (full-reference) and BRISQUE, MUSIQ
# (no-reference); AHIQ and MUSIQ need pretrained networks that cannot be had offline, so SSIM and
# NIQE stand in (adadiff.quality.registry); a folder whose adadiff.json names ahiq or musiq uses
# them once their weights exist locally. Weights carry the sign (higher R = better) and bring
# typical ranges to a common scale: 1 dB PSNR = 0.1, LPIPS/NLPD lower is better, BRISQUE (0..100)
# and NIQE (about 3..25) lower is better.
DEFAULT_METRICS: tuple[MetricConfig, ...] = (
    MetricConfig(name="psnr", kind=MetricKind.FULL_REFERENCE, weight=0.1),
    MetricConfig(name="lpips", kind=MetricKind.FULL_REFERENCE, weight=-2.0),
    MetricConfig(name="ssim", kind=MetricKind.FULL_REFERENCE, weight=1.0),
    MetricConfig(name="nlpd", kind=MetricKind.FULL_REFERENCE, weight=-2.0),
    MetricConfig(name="brisque", kind=MetricKind.NO_REFERENCE, weight=-0.02),
    MetricConfig(name="niqe", kind=MetricKind.NO_REFERENCE, weight=-0.05),
)


@dataclass(frozen=True, kw_only=True)
class NoiseScheduleConfig:
    """DDPM training schedule; SD-2.1 uses scaled_linear betas 0.00085..0.012 over 1000 steps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: PredictionType = PredictionType.EPSILON
    # The last DDIM jump lands on t = 0. False (Stable Diffusion's scheduler) renoises the clean
    # estimate with alpha_bar_0 < 1, which adds back sqrt(1 - alpha_bar_0) = 0.03 of the predicted
    # noise; True (diffusers' own default) returns the clean estimate itself. On a small model that
    # residual noise decodes as grain.
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        _numbers(self, "noise.", ints=("num_train_timesteps",), reals=("beta_start", "beta_end"))
        object.__setattr__(
            self, "prediction_type", _enum(PredictionType, self.prediction_type, "prediction_type")
        )
        if not isinstance(self.set_alpha_to_one, bool):
            raise ConfigError(
                f"set_alpha_to_one must be true or false, got {self.set_alpha_to_one!r}"
            )
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"betas must satisfy 0 < beta_start < beta_end < 1, got "
                f"{self.beta_start}..{self.beta_end}"
            )
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(
                f"beta_schedule {self.beta_schedule!r} is not supported; use 'scaled_linear' "
                "(Stable Diffusion) or 'linear'"
            )


EXIT_GAINS: tuple[str, ...] = ExitGain.values()


@dataclass(frozen=True, kw_only=True)
class DTSSConfig:
    """Dynamic time-step skipping: every number of the policy lives here, none in code."""

    tau: float = 5e-3
    # growth takes tiers[1] while g_NR < growth_split * tau, the smallest tier tiers[0] after
    growth_split: float = 4.0
    tiers: tuple[int, int, int, int] = (5, 10, 15, 20)  # growth-small, growth, stable, stable-flat
    nr_start_t: int = 500  # NR gains and saturation exits only once t < nr_start_t
    t_start: int = 999
    # Which gain the saturated exit watches: "nr" (the paper: g_NR <= -tau) or "total" (the
    # gain of R_FR + R_NR <= -tau, for weights calibrated to estimate quality as a whole;
    # adadiff.training.calibrate).
    exit_on: str = "nr"

    def __post_init__(self) -> None:
        _numbers(self, "dtss.", ints=("nr_start_t", "t_start"), reals=("tau", "growth_split"))
        # whole numbers only: int() made "5555" (5, 5, 5, 5) and 5.9 five steps
        if not isinstance(self.tiers, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in self.tiers
        ):
            raise ConfigError(f"tiers must be four positive step counts, got {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(int(v) for v in self.tiers))
        if len(self.tiers) != 4 or any(v < 1 for v in self.tiers):
            raise ConfigError(f"tiers must be four positive step counts, got {self.tiers}")
        # "not x > 0" rather than "x <= 0": a NaN from a JSON file fails it too (it made every
        # tile "stable", never growing or exiting)
        if not math.isfinite(self.tau) or not self.tau > 0:
            raise ConfigError(f"tau must be a positive number, got {self.tau}")
        if not math.isfinite(self.growth_split) or not self.growth_split >= 1:
            raise ConfigError(f"growth_split must be a number >= 1, got {self.growth_split}")
        if self.t_start < 1:
            raise ConfigError(f"t_start must be >= 1, got {self.t_start}")
        if self.exit_on not in EXIT_GAINS:
            raise ConfigError(f"exit_on must be one of {EXIT_GAINS}, got {self.exit_on!r}")


@dataclass(frozen=True, kw_only=True)
class PFJConfig:
    hidden: int = 32
    gain_dim: int = 2  # (g_FR, g_NR)

    def __post_init__(self) -> None:
        _numbers(self, "pfj.", ints=("hidden", "gain_dim"))
        if self.hidden < 1 or self.gain_dim < 1:
            raise ConfigError(f"PFJ hidden and gain_dim must be >= 1, got {self}")


MMLE_REFERENCES: tuple[str, ...] = ("input", "hr")


@dataclass(frozen=True, kw_only=True)
class MMLEConfig:
    hidden: int = 32
    metrics: tuple[MetricConfig, ...] = DEFAULT_METRICS
    # What the full-reference scores MMLE predicts compare with: "input", the bicubic-upscaled
    # LR tile (the paper's reading, and all an oracle has at inference), or "hr", the HR crop
    # that labels know at training time, so that a gain means real quality gained (detail) and
    # a loss real quality lost (grain). Settled per model by the quality/compute front.
    reference: str = "input"

    def __post_init__(self) -> None:
        _numbers(self, "mmle.", ints=("hidden",))
        if self.hidden < 2 or self.hidden % 2:
            # the timestep's sine and cosine features fill it in pairs
            raise ConfigError(f"mmle hidden must be an even number >= 2, got {self.hidden}")
        if self.reference not in MMLE_REFERENCES:
            raise ConfigError(
                f"mmle reference must be one of {MMLE_REFERENCES}, got {self.reference!r}"
            )
        if not isinstance(self.metrics, (list, tuple)) or not all(
            isinstance(m, (MetricConfig, dict)) for m in self.metrics
        ):
            raise ConfigError(
                "mmle metrics must be a list of objects with name, kind and weight, got "
                f"{self.metrics!r}"
            )
        metrics = tuple(
            m if isinstance(m, MetricConfig) else MetricConfig(**m) for m in self.metrics
        )
        object.__setattr__(self, "metrics", metrics)
        if not metrics:
            raise ConfigError("MMLE needs at least one metric")
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ConfigError(f"metric names must be unique, got {names}")

    @property
    def num_scores(self) -> int:
        return len(self.metrics)

    def fr_index(self, name: str) -> int | None:
        """The column of the full-reference metric ``name``; None when it is not scored."""
        for i, m in enumerate(self.metrics):
            if m.name == name and m.kind is MetricKind.FULL_REFERENCE:
                return i
        return None

    @property
    def psnr_index(self) -> int | None:
        """The column of full-reference PSNR, which MMLE builds from two errors (the latents'
        and the VAE's reconstruction of the input; input reference only); else None."""
        return self.fr_index("psnr") if self.reference == "input" else None

    @property
    def lpips_index(self) -> int | None:
        """The column of full-reference LPIPS, built from two errors as PSNR is; else None."""
        return self.fr_index("lpips") if self.reference == "input" else None


COLOR_FIXES: tuple[str, ...] = ("none", "wavelet")
SCHEDULES: tuple[str, ...] = Schedule.values()


@dataclass(frozen=True, kw_only=True)
class ColorFixConfig:
    """Colour correction of decoded images against the bicubic-upscaled LR input.

    ``wavelet`` keeps the decoded image's detail and takes its low frequencies (what ``levels``
    dilated 3x3 blurs leave, scales above about 2**levels px) from the input: a latent
    autoencoder shifts a tile's colour by an amount its latents do not show. The runtime
    corrects its output this way and the MMLE oracle scores estimates corrected the same way,
    so the scores describe what the output would be.
    """

    kind: str = "none"
    levels: int = 5

    def __post_init__(self) -> None:
        _numbers(self, "color_fix.", ints=("levels",))
        if self.kind not in COLOR_FIXES:
            raise ConfigError(f"color_fix kind must be one of {COLOR_FIXES}, got {self.kind!r}")
        if not 1 <= self.levels <= 12:
            raise ConfigError(f"color_fix levels must be in [1, 12], got {self.levels}")


@dataclass(frozen=True, kw_only=True)
class ContentConfig:
    """The content schedule: every tile runs a uniform schedule chosen before sampling from its
    LR latent's texture (``runtime.content.latent_texture``): ``flat_interval`` below
    ``threshold``, ``textured_interval`` from it on.

    A small model can add grain to flat tiles at every step while textured tiles keep gaining
    detail; this is the simplest schedule that spends steps by content, and the one an adaptive
    schedule has to beat. ``threshold`` 0 means the model has no rule (the schedule is refused).
    The numbers are fitted per model on validation crops (``benchmarks.front`` reports the best
    rule)."""

    threshold: float = 0.0
    flat_interval: int = 999
    textured_interval: int = 200

    def __post_init__(self) -> None:
        _numbers(
            self, "content.", ints=("flat_interval", "textured_interval"), reals=("threshold",)
        )
        if not self.threshold >= 0:  # NaN too
            raise ConfigError(f"content threshold must be >= 0, got {self.threshold}")
        if self.flat_interval < 1 or self.textured_interval < 1:
            raise ConfigError(
                "content flat_interval and textured_interval must be >= 1, got "
                f"{self.flat_interval}, {self.textured_interval}"
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines a model folder. ``unet`` and ``vae`` are diffusers config kwargs."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    tile_size: int  # pixels of the 4x-upscaled image per tile
    tile_overlap: int  # pixels shared by neighbouring tiles
    scaling_factor: float = 0.18215
    text_tokens: int = 77
    upscale: int = 4
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    dtss: DTSSConfig = field(default_factory=DTSSConfig)
    pfj: PFJConfig = field(default_factory=PFJConfig)
    mmle: MMLEConfig = field(default_factory=MMLEConfig)
    uniform_interval: int = 20
    color_fix: ColorFixConfig = field(default_factory=ColorFixConfig)
    # What runs when the user names no schedule: the model's best on its quality/compute front
    # (benchmarks/front.py), "adaptive" (DTSS), "uniform" (jumps of uniform_interval) or
    # "content" (per-tile uniform intervals, ``content``).
    default_schedule: str = "adaptive"
    content: ContentConfig = field(default_factory=ContentConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("noise", NoiseScheduleConfig),
            ("dtss", DTSSConfig),
            ("pfj", PFJConfig),
            ("mmle", MMLEConfig),
            ("color_fix", ColorFixConfig),
            ("content", ContentConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in fields(cls)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ConfigError(
                        f"unknown keys in {name}: {unknown}; expected some of {sorted(known)}"
                    )
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a JSON object of its keys, got {value!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")
        _numbers(
            self,
            "",
            ints=("tile_size", "tile_overlap", "text_tokens", "upscale", "uniform_interval"),
            reals=("scaling_factor",),
        )
        for name in ("text_tokens", "upscale"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for part, keys in (("unet", ("cross_attention_dim",)), ("vae", ("block_out_channels",))):
            block = getattr(self, part)
            if not isinstance(block, dict):
                raise ConfigError(f"{part} must be a mapping of diffusers config keys")
            missing = [k for k in keys if k not in block]
            if missing:
                raise ConfigError(f"the {part} config needs {missing}")
        self._check_shape_keys()
        if not math.isfinite(self.scaling_factor) or not self.scaling_factor > 0:
            raise ConfigError(
                f"scaling_factor must be a positive number (SD's VAE: 0.18215), got "
                f"{self.scaling_factor}"
            )
        steps = self.noise.num_train_timesteps
        if self.dtss.t_start >= steps:
            raise ConfigError(
                f"dtss t_start {self.dtss.t_start} must be below the noise schedule's "
                f"num_train_timesteps {steps}"
            )
        if not 0 <= self.dtss.nr_start_t <= steps:
            raise ConfigError(
                f"dtss nr_start_t {self.dtss.nr_start_t} must be in [0, {steps}], the noise "
                "schedule's num_train_timesteps"
            )
        f = self.vae_scale_factor
        if self.tile_size % f or self.tile_size < f:
            raise ConfigError(
                f"tile_size {self.tile_size} must be a positive multiple of the VAE factor {f}"
            )
        if not 0 <= self.tile_overlap < self.tile_size or self.tile_overlap % f:
            raise ConfigError(
                f"tile_overlap {self.tile_overlap} must be a multiple of {f} in [0, tile_size)"
            )
        if self.unet.get("in_channels") != 2 * self.latent_channels:
            raise ConfigError(
                f"the UNet must take concat(z, lr_latent): in_channels {2 * self.latent_channels}, "
                f"got {self.unet.get('in_channels')}"
            )
        # diffusers builds 4 output channels when the config names none
        if self.unet.get("out_channels", 4) != self.latent_channels:
            raise ConfigError(
                f"the UNet predicts in the VAE's latent space: out_channels "
                f"{self.latent_channels} (the VAE's latent_channels), got "
                f"{self.unet.get('out_channels', 4)}"
            )
        # diffusers keeps its own copy; the runtime reads only the top-level one
        vae_scaling = self.vae.get("scaling_factor")
        if vae_scaling is not None and (
            not isinstance(vae_scaling, (int, float))
            or not math.isclose(vae_scaling, self.scaling_factor, rel_tol=1e-6)
        ):
            raise ConfigError(
                f"scaling_factor {self.scaling_factor} and vae.scaling_factor {vae_scaling} "
                "differ; the runtime uses the top-level one: set both to the same value"
            )
        if self.uniform_interval < 1:
            raise ConfigError(f"uniform_interval must be >= 1, got {self.uniform_interval}")
        if self.default_schedule not in SCHEDULES:
            raise ConfigError(
                f"default_schedule must be one of {SCHEDULES}, got {self.default_schedule!r}"
            )
        if self.default_schedule == "content" and self.content.threshold <= 0:
            # it loaded, and every run without --schedule then failed asking about --schedule
            raise ConfigError(
                "default_schedule is content, but content.threshold is 0 (no content rule): "
                "set default_schedule to uniform or adaptive, or give content a threshold"
            )

    def _check_shape_keys(self) -> None:
        """``ConfigError`` unless the diffusers keys every shape derives from are whole numbers:
        diffusers accepts a per-block list of cross_attention_dim, and "8" or 8.0 for
        latent_channels went through here to fail later (text_dim raised a TypeError)."""

        def whole(value: object) -> bool:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return False
            return int(value) >= 1

        text = self.unet["cross_attention_dim"]
        if not whole(text):
            raise ConfigError(
                f"unet.cross_attention_dim must be a whole number >= 1, got {text!r}: the UNet "
                "reads one empty-prompt embedding [text_tokens, cross_attention_dim] in every "
                "block, so a per-block list is not supported"
            )
        latent = self.vae.get("latent_channels", 4)
        if not whole(latent):
            raise ConfigError(f"vae.latent_channels must be a whole number >= 1, got {latent!r}")
        widths = self.vae["block_out_channels"]
        if not isinstance(widths, (list, tuple)) or not widths or not all(map(whole, widths)):
            raise ConfigError(
                "vae.block_out_channels must be a non-empty list of whole numbers (the VAE's "
                f"block widths; their count sets its downsampling factor), got {widths!r}"
            )

    def require_content_rule(self, name: str | None = None) -> None:
        """``ConfigError`` unless the content schedule has a rule to run (``content``)."""
        if self.content.threshold <= 0:
            raise ConfigError(
                f"--schedule content needs a content rule, and {name or self.name} has none "
                "(content.threshold is 0 in its adadiff.json); choose uniform or adaptive, or "
                "fit one on validation crops with `python -m benchmarks.front --photos validation`"
            )

    # Derived shapes: every shape in specs, runtime and export follows from these.
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def latent_tile(self) -> int:
        return self.tile_size // self.vae_scale_factor

    @property
    def text_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def with_tiling(self, tile_size: int | None, tile_overlap: int | None) -> ModelConfig:
        return replace(
            self,
            tile_size=self.tile_size if tile_size is None else tile_size,
            tile_overlap=self.tile_overlap if tile_overlap is None else tile_overlap,
        )

    def to_dict(self) -> dict[str, Any]:
        data = _plain(asdict(self))
        data["config_version"] = CONFIG_VERSION
        return data

    def to_json(self) -> str:
        """What ``save`` writes to ``adadiff.json``."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
        """The config a parsed adadiff.json holds; ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source} must hold a JSON object of config keys, not a {type(data).__name__}"
            )
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)  # the first files had none
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(
                f"config_version in {source} must be a whole number >= 1, got {version!r}"
            )
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"{source} is config_version {version}, newer than this adadiff reads "
                f"({CONFIG_VERSION}): upgrade adadiff to load it"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown keys in {source}: {unknown}; expected some of {sorted(known)}"
            )
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(
                f"{source} lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                f"which every model config needs ({', '.join(required)}); start from a complete "
                f"one, such as the shipped adadiff/weights/tiny/{CONFIG_FILE}, and edit it"
            )
        try:
            return cls(**data)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"invalid {source}: {exc}") from exc

    def save(self, folder: Path) -> Path:
        # atomically: calibrate rewrites a model folder's only config in place, and a full disk
        # must leave the old one whole, not a truncated file that no command can load
        path = Path(folder) / CONFIG_FILE
        tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputPathError(
                f"cannot write {path} ({exc.strerror or exc}); the folder's earlier "
                f"{CONFIG_FILE} is unchanged: free space or fix the folder and run again"
            ) from exc
        return path

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file() and (path.exists() or path.is_symlink()):
            raise ConfigError(
                f"{path} is not a file (a folder, or a link that leads to no file): a model "
                f"folder needs its {CONFIG_FILE} there"
            )
        if not path.is_file():
            hint = ""
            if (Path(folder) / "model_index.json").is_file():
                hint = (
                    f" ({folder} looks like a diffusers pipeline folder: make a model folder "
                    f"from it with `adadiff convert-sd21 {folder} -o NEW_FOLDER`)"
                )
            raise ConfigError(f"{path} is missing: a model folder needs its {CONFIG_FILE}{hint}")
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 JSON text: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def digest(self) -> str:
        """A stable hash of the config, used to tie exported files to the model they came from.

        Fields added after exports existed (``default_schedule``, ``dtss.exit_on``,
        ``noise.set_alpha_to_one``, ``content``, ``mmle.reference``) count only when they differ
        from their defaults, so those exports keep their digest."""
        data = self.to_dict()
        if data["default_schedule"] == "adaptive":
            del data["default_schedule"]
        if data["dtss"]["exit_on"] == "nr":
            del data["dtss"]["exit_on"]
        if not data["noise"]["set_alpha_to_one"]:
            del data["noise"]["set_alpha_to_one"]
        if data["content"] == _plain(asdict(ContentConfig())):
            del data["content"]
        if data["mmle"]["reference"] == "input":
            del data["mmle"]["reference"]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _choice(kind: type[Choice], value: object, what: str, hint: str = "") -> Any:
    if value not in kind.values():
        raise ConfigError(f"{what} {value!r} is not one of {', '.join(kind.values())}{hint}")
    return kind(value)


def _whole(value: Any, name: str, least: int) -> int:
    """``value`` as an int (numpy integers too), or a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How a model is opened for a run, one object for ``Upscaler.from_pretrained``,
    ``make_backend``, the scale-out workers and the benchmarks.

    ``model`` is a preset or a model folder (None: ``tiny`` for torch, the exported model
    otherwise); ``engines`` an export folder for onnxruntime and tensorrt; ``max_batch`` the most
    tiles per engine call; ``threads`` the CPU threads (None: ``OMP_NUM_THREADS`` if set, else
    every CPU this process may use)."""

    model: str | Path | None = None
    # Strings are accepted (the command line's and the keyword API's) and become the enums.
    backend: BackendKind | str = BackendKind.TORCH
    device: str = "cpu"
    precision: Precision | str = Precision.FP32
    engines: str | Path | None = None
    seed: int = 0
    tile_size: int | None = None
    tile_overlap: int | None = None
    max_batch: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BackendKind.values():
            raise ConfigError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BackendKind.values())}"
            )
        object.__setattr__(self, "backend", BackendKind(self.backend))
        hint = "; use fp32 (the reference) or fp16"
        object.__setattr__(
            self, "precision", _choice(Precision, self.precision, "--precision", hint)
        )
        # checked here, before any weights load: a float (2.5, or 128.0 from arithmetic) went
        # through and failed deep inside the tiling or batching of the first upscale
        for name, least in (("max_batch", 1), ("seed", 0), ("tile_size", 1), ("tile_overlap", 0)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _whole(value, name, least))
