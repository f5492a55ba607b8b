"""Built-in model configurations: ``sd21-base`` (the real architecture) and ``tiny``."""

from __future__ import annotations

from pathlib import Path

from adadiff.config import CONFIG_FILE, ModelConfig
from adadiff.errors import ConfigError, ModelFolderError

# The trained weights that ship inside the package, one folder per preset.
SHIPPED = Path(__file__).resolve().parent / "weights"

_CROSS = "CrossAttnDownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"

SD21_UNET: dict = {
    "sample_size": 64,
    "in_channels": 8,  # concat(z_t, lr_latent)
    "out_channels": 4,
    "down_block_types": [_CROSS, _CROSS, _CROSS, "DownBlock2D"],
    "up_block_types": ["UpBlock2D", _CROSS_UP, _CROSS_UP, _CROSS_UP],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD21_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# Same block types and code path as sd21-base, widths small enough for a CPU. Like the SD x4
# upscaler, the full-resolution level has no attention (1024-token self-attention there cost more
# than the rest of the network on 2 cores), and the VAE downsamples by 4 (three blocks), so a
# 128 px tile is a 32x32 latent.
TINY_UNET: dict = {
    **SD21_UNET,
    "down_block_types": ["DownBlock2D", _CROSS, _CROSS, "DownBlock2D"],
    "up_block_types": ["UpBlock2D", _CROSS_UP, _CROSS_UP, "UpBlock2D"],
    "sample_size": 32,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [1, 2, 2, 2],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}

TINY_VAE: dict = {
    **SD21_VAE,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 128,
}


def sd21_base() -> ModelConfig:
    return ModelConfig(
        name="sd21-base", unet=dict(SD21_UNET), vae=dict(SD21_VAE), tile_size=512, tile_overlap=64
    )


def tiny() -> ModelConfig:
    # Overlap 16 px (4 latent rows) keeps a 256x256 input at 81 tiles instead of 121.
    return ModelConfig(
        name="tiny", unet=dict(TINY_UNET), vae=dict(TINY_VAE), tile_size=128, tile_overlap=16
    )


PRESETS = {"sd21-base": sd21_base, "tiny": tiny}

# "--model preset:tiny" always names the built-in preset, even beside a model folder ./tiny.
PRESET_PREFIX = "preset:"


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.removeprefix(PRESET_PREFIX)]()
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; use one of {sorted(PRESETS)} or a model folder path"
        ) from None


def preset_name(model: str | Path | None) -> str | None:
    """The built-in preset ``--model`` names ("tiny" for "tiny" or "preset:tiny"), or None for a
    model folder. A bare preset name that is also a model folder in the working directory is
    refused: the preset would win silently (say after ``adadiff convert-sd21 SRC -o sd21-base``)
    and the run would use other weights than the folder's."""
    if isinstance(model, Path):  # a path given as such names a folder (str() drops "./")
        return None
    name = str(model)
    if name.startswith(PRESET_PREFIX):
        bare = name.removeprefix(PRESET_PREFIX)
        if bare not in PRESETS:
            raise ConfigError(
                f"--model {name}: there is no preset {bare!r}; the presets are "
                f"{', '.join(PRESET_PREFIX + p for p in sorted(PRESETS))}"
            )
        return bare
    if name not in PRESETS:
        return None
    here = Path(name)
    if (here / CONFIG_FILE).is_file() and here.resolve() != (SHIPPED / name).resolve():
        raise ConfigError(
            f"{name!r} is both a built-in preset and the model folder ./{name}; pass ./{name} "
            f"for the folder, or {PRESET_PREFIX}{name} for the preset"
        )
    return name


def is_preset(model: str | Path | None) -> bool:
    """Whether ``--model`` names a preset (see ``preset_name``)."""
    return preset_name(model) is not None


def model_folder(model: str | Path) -> Path | None:
    """The folder ``load_models(model)`` reads weights from; None for a preset with no shipped
    weights (its seeded random init)."""
    name = preset_name(model)
    if name is not None:
        shipped = SHIPPED / name
        return shipped if (shipped / CONFIG_FILE).is_file() else None
    return Path(model).expanduser()


def model_config(model: str | Path) -> ModelConfig:
    """The config ``load_models(model)`` would use, read without torch: a folder's adadiff.json,
    a preset's shipped adadiff.json, or the preset's built-in config."""
    name = preset_name(model)
    if name is not None:
        shipped = SHIPPED / name
        return ModelConfig.load(shipped) if (shipped / CONFIG_FILE).is_file() else preset(name)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise no_model_folder(folder)
    return ModelConfig.load(folder)


def no_model_folder(folder: Path) -> ModelFolderError:
    """The error for a model path that is no folder. A file there (a Stable Diffusion
    checkpoint, say) was called missing."""
    if folder.exists():
        return ModelFolderError(
            f"model folder {folder} is a file, not a folder; give a preset name or a model "
            f"folder ({CONFIG_FILE} beside unet/, vae/ and the weights; see README, model "
            "folders): `adadiff convert-sd21` makes one from a Stable Diffusion 2.1 diffusers "
            "folder"
        )
    return ModelFolderError(f"model folder {folder} does not exist; give a preset name or a folder")
