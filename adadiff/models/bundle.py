"""The set of torch modules that make one AdaDiffSR model, and its folder on disk.

Folder layout (diffusers layout for the big parts, safetensors everywhere)::

    adadiff.json                 config, schedule defaults, metric names and weights
    unet/config.json             diffusers UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors
    vae/config.json, vae/diffusion_pytorch_model.safetensors
    pfj.safetensors, mmle.safetensors (its metadata names its columns: ``mmle_metadata``)
    text_embedding.safetensors   the empty-prompt embedding, key "embedding", [tokens, dim]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adadiff.artifacts import weights_digest
from adadiff.config import CONFIG_FILE, ColorFixConfig, MMLEConfig, ModelConfig
from adadiff.errors import ModelFolderError
from adadiff.models.networks import MMLE, PFJ
from adadiff.models.wrappers import (
    DiffusersModel,
    MMLEWrapper,
    PFJWrapper,
    UNetWrapper,
    VAEDecoderWrapper,
    VAEEncoderWrapper,
)
from adadiff.presets import SHIPPED, no_model_folder, preset, preset_name

WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_EMBEDDING = "text_embedding.safetensors"
MMLE_WEIGHTS = "mmle.safetensors"
# mmle.safetensors' metadata key: what its output columns mean (``mmle_metadata``)
MMLE_META_KEY = "adadiff.mmle"


@dataclass
class TorchModels:
    config: ModelConfig
    unet: DiffusersModel
    vae: DiffusersModel
    pfj: PFJ
    mmle: MMLE
    text_embedding: torch.Tensor
    source: str

    def wrappers(self) -> dict[str, nn.Module]:
        s = self.config.scaling_factor
        mods: dict[str, nn.Module] = {
            "unet": UNetWrapper(self.unet, self.text_embedding),
            "vae_encoder": VAEEncoderWrapper(self.vae, s),
            "vae_decoder": VAEDecoderWrapper(self.vae, s),
            "pfj": PFJWrapper(self.pfj),
            "mmle": MMLEWrapper(self.mmle),
        }
        for m in mods.values():
            m.eval()
        return mods

    def save(self, folder: str | Path, *, half: bool = False) -> Path:
        """Write the model folder. ``half`` stores the UNet's and VAE's floating-point weights
        as fp16 (half the bytes); loading casts them back to the modules' fp32."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in (("unet", self.unet), ("vae", self.vae)):
            module.save_pretrained(folder / name, safe_serialization=True)
            if half:
                path = folder / name / WEIGHTS
                state = _read_safetensors(path)
                save_file(
                    {
                        k: v.half().contiguous() if v.is_floating_point() else v
                        for k, v in state.items()
                    },
                    str(path),
                )
        save_file(_contiguous(self.pfj.state_dict()), str(folder / "pfj.safetensors"))
        save_file(
            _contiguous(self.mmle.state_dict()),
            str(folder / MMLE_WEIGHTS),
            metadata=mmle_metadata(self.config),
        )
        save_file({"embedding": self.text_embedding.contiguous()}, str(folder / TEXT_EMBEDDING))
        self.config.save(folder)
        return folder


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def build_modules(cfg: ModelConfig) -> tuple[DiffusersModel, DiffusersModel, PFJ, MMLE]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _build(UNet2DConditionModel, "unet", cfg)
    vae = _build(AutoencoderKL, "vae", cfg)
    c = cfg.latent_channels
    pfj = PFJ(latent_channels=c, gain_dim=cfg.pfj.gain_dim, hidden=cfg.pfj.hidden)
    return unet, vae, pfj, mmle_for(cfg)


def _build(cls: type, part: str, cfg: ModelConfig) -> DiffusersModel:
    try:
        return cls(**getattr(cfg, part))
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(
            f"the {part!r} block of {cfg.name}'s {CONFIG_FILE} does not build a "
            f"{cls.__name__}: {exc}"
        ) from exc


def check_diffusers_config(module: DiffusersModel, path: Path) -> None:
    """Refuse a folder whose ``unet/config.json`` or ``vae/config.json`` disagrees with
    adadiff.json, which is what the modules are built from: fields such as attention_head_dim
    or norm_eps change what the network computes without changing any tensor's shape."""
    if not path.is_file():
        return  # adadiff.json alone defines the modules
    on_disk = read_json(path)
    if not isinstance(on_disk, dict):
        raise ModelFolderError(f"{path} should hold a JSON object (the diffusers config)")
    built = json.loads(json.dumps(dict(module.config), default=list))
    differ = sorted(
        key
        for key, value in on_disk.items()
        if not key.startswith("_") and key in built and built[key] != value
    )
    if differ:
        shown = ", ".join(f"{k}: {on_disk[k]!r} there, {built[k]!r} here" for k in differ[:4])
        raise ModelFolderError(
            f"{path} disagrees with {CONFIG_FILE} ({shown}{' ...' if len(differ) > 4 else ''}); "
            f"the modules are built from {CONFIG_FILE}: make the two agree"
        )


def mmle_for(cfg: ModelConfig) -> MMLE:
    """An untrained MMLE of ``cfg``'s shape (torch's global RNG draws its weights)."""
    return MMLE(
        latent_channels=cfg.latent_channels,
        num_scores=cfg.mmle.num_scores,
        hidden=cfg.mmle.hidden,
        psnr_index=cfg.mmle.psnr_index,
        lpips_index=cfg.mmle.lpips_index,
    )


def mmle_targets(mmle: MMLEConfig, fix: ColorFixConfig) -> dict[str, Any]:
    """What an MMLE's output columns mean and its shape: its metrics (not their weights, which
    calibration changes and which only the policy reads), their reference, the colour fix of
    the images its labels scored, and its width."""
    return {
        "hidden": mmle.hidden,
        "metrics": [(m.name, m.kind.value) for m in mmle.metrics],
        "reference": mmle.reference,
        "color_fix": "none" if fix.kind == "none" else f"{fix.kind}:{fix.levels}",
    }


def changed_targets(then: dict[str, Any], now: dict[str, Any], here: str) -> list[str]:
    """Each of ``mmle_targets`` that differs, as "KEY THEN there, NOW ``here``"."""
    return [f"{k} {then[k]} there, {now[k]} {here}" for k in now if then[k] != now[k]]


def mmle_columns(cfg: ModelConfig) -> dict[str, Any]:
    """What an MMLE's output columns mean, as JSON reads it back: ``mmle_targets`` and the
    columns built from two errors (``MMLE.split_columns``)."""
    split = {"psnr": cfg.mmle.psnr_index, "lpips": cfg.mmle.lpips_index}
    return json.loads(json.dumps({**mmle_targets(cfg.mmle, cfg.color_fix), "split_columns": split}))


def mmle_metadata(cfg: ModelConfig) -> dict[str, str]:
    """mmle.safetensors' metadata: ``mmle_columns``. The weights hold no names: without these a
    config that lists the same metrics in another order loads them and reads every column as
    another metric. One key, because safetensors writes several in a random order and a
    shipped folder's files must be the same bytes each time."""
    return {MMLE_META_KEY: json.dumps(mmle_columns(cfg), sort_keys=True)}


def check_mmle_metadata(cfg: ModelConfig, path: Path) -> None:
    """Refuse an mmle.safetensors whose metadata says it predicts other columns than ``cfg``'s
    (a file written before adadiff recorded them has none and is not checked)."""
    if not path.is_file():
        return  # load_state says what is wrong with it
    stored = _read_metadata(path).get(MMLE_META_KEY)
    if stored is None:
        return
    try:
        then = json.loads(stored)
    except json.JSONDecodeError:
        then = None
    if not isinstance(then, dict):
        raise ModelFolderError(
            f"{path}: its {MMLE_META_KEY!r} metadata is not a JSON object ({stored[:80]!r}); "
            "write the folder again (adadiff train ship) or take the file from a good copy"
        )
    now = mmle_columns(cfg)
    changed = [
        f"{key} {json.dumps(then[key], sort_keys=True)} there, "
        f"{json.dumps(value, sort_keys=True)} in {CONFIG_FILE}"
        for key, value in now.items()
        if key in then and then[key] != value
    ]
    if changed:
        raise ModelFolderError(
            f"{path} predicts other scores than {path.parent / CONFIG_FILE} lists "
            f"({'; '.join(changed)}), so each score would be read as another metric; put back "
            "the mmle block and color_fix it was written with (the metrics in that order), or "
            "make labels and train MMLE for this config"
        )


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        raise ModelFolderError(f"{path} is not a readable safetensors file: {exc}") from exc


def build_random(cfg: ModelConfig, seed: int = 0) -> TorchModels:
    """Seeded random init: the same seed gives the same weights on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, pfj, mmle = build_modules(cfg)
        text = torch.randn(cfg.text_tokens, cfg.text_dim) * 0.5
    models = TorchModels(
        cfg, unet, vae, pfj, mmle, text, source=f"{cfg.name} (random init, seed {seed})"
    )
    for m in (unet, vae, pfj, mmle):
        m.eval().requires_grad_(False)
    return models


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file() and (path.exists() or path.is_symlink()):
        raise ModelFolderError(
            f"{path} is not a file (a folder, or a link that leads to no file); a model folder "
            "needs the weights file there (see README, model folders)"
        )
    if not path.is_file():
        raise ModelFolderError(
            f"{path} is missing; a model folder needs it (see README, model folders)"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        raise ModelFolderError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_state(module: nn.Module, path: Path) -> None:
    """Load weights strictly; a missing key or a shape mismatch names the file and the tensor."""
    state = _read_safetensors(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelFolderError(
            f"{path} does not match the model config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ModelFolderError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(own[key].shape)}"
            )
        # load_state_dict casts: integer weights loaded truncated, with no word
        if own[key].is_floating_point() and not tensor.is_floating_point():
            raise ModelFolderError(
                f"{path}: tensor {key!r} is {tensor.dtype}, the model needs floating-point "
                "weights (fp32, fp16 or bf16)"
            )
    module.load_state_dict(state)


def load_folder(folder: str | Path) -> TorchModels:
    folder = Path(folder)
    if not folder.is_dir():
        raise no_model_folder(folder)
    cfg = ModelConfig.load(folder)
    with torch.random.fork_rng(devices=[]):
        unet, vae, pfj, mmle = build_modules(cfg)
    check_diffusers_config(unet, folder / "unet" / "config.json")
    check_diffusers_config(vae, folder / "vae" / "config.json")
    load_state(unet, folder / "unet" / WEIGHTS)
    load_state(vae, folder / "vae" / WEIGHTS)
    load_state(pfj, folder / "pfj.safetensors")
    check_mmle_metadata(cfg, folder / MMLE_WEIGHTS)  # first: it says more than a shape does
    load_state(mmle, folder / MMLE_WEIGHTS)
    emb = _read_safetensors(folder / TEXT_EMBEDDING)
    text = emb.get("embedding")
    if (
        text is None
        or tuple(text.shape) != (cfg.text_tokens, cfg.text_dim)
        or not text.is_floating_point()
    ):
        raise ModelFolderError(
            f"{folder / TEXT_EMBEDDING} must hold a floating-point 'embedding' of shape "
            f"({cfg.text_tokens}, {cfg.text_dim}), got "
            f"{None if text is None else (tuple(text.shape), text.dtype)}"
        )
    for m in (unet, vae, pfj, mmle):
        m.eval().requires_grad_(False)
    return TorchModels(cfg, unet, vae, pfj, mmle, text.float(), source=str(folder))


def load_models(model: str | Path, *, seed: int = 0) -> TorchModels:
    """A preset name (shipped weights if present, else seeded random init) or a model folder."""
    name = preset_name(model)
    if name is not None:
        shipped = SHIPPED / name
        if (shipped / "adadiff.json").is_file():
            return load_folder(shipped)
        return build_random(preset(name), seed=seed)
    return load_folder(Path(model).expanduser())  # as model_folder and model_config read it


def describe(models: TorchModels) -> dict:
    return {
        "source": models.source,
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (
                ("unet", models.unet),
                ("vae", models.vae),
                ("pfj", models.pfj),
                ("mmle", models.mmle),
            )
        },
        "config_digest": models.config.digest(),
        "weights_digest": _weights_digest(models.source),
    }


def _weights_digest(source: str) -> str | None:
    """The folder's weights digest; None for a seeded random init (no folder)."""
    folder = Path(source)
    return weights_digest(folder) if (folder / CONFIG_FILE).is_file() else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path} is not UTF-8 JSON text: {exc}") from exc
    except OSError as exc:
        raise ModelFolderError(f"cannot read {path}: {exc.strerror or exc}") from exc
