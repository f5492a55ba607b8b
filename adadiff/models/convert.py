"""Turn a stock Stable-Diffusion-2.1 diffusers folder into an adadiff model folder.

The UNet's ``conv_in`` is widened from C to 2C input channels (z_t and the LR latent); the new
channels start at zero, so the converted UNet computes exactly what the stock one did until
fine-tuning teaches it to use the LR latent. The VAE is copied, the empty-prompt text embedding is
computed once with the stock CLIP text encoder, and PFJ/MMLE get a fresh seeded init.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adadiff.config import ModelConfig
from adadiff.errors import BackendUnavailableError, ConfigError, ModelFolderError
from adadiff.models.bundle import WEIGHTS, TorchModels, mmle_for
from adadiff.models.networks import PFJ
from adadiff.presets import sd21_base

DEFAULT_SCALING_FACTOR = 0.18215
TEXT_WEIGHTS = "model.safetensors"
TEXT_WEIGHTS_INDEX = "model.safetensors.index.json"
TEXT_WEIGHTS_INDEX_FP16 = "model.safetensors.index.fp16.json"  # transformers' variant name
FP16 = "fp16"  # the hub's name for half-precision weight files


def convert_sd21(
    src: str | Path,
    dst: str | Path,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert the diffusers folder ``src`` into a new adadiff model folder ``dst``; returns dst."""
    src, dst = Path(src), Path(dst)
    say = log or (lambda _msg: None)
    _check_dst(dst)
    if not src.is_dir():
        raise ModelFolderError(
            f"{src} is not a folder; expected a Stable Diffusion 2.1 diffusers folder with "
            "unet/, vae/, text_encoder/ and tokenizer/"
        )
    # Fail on a missing extra before any of the slow work.
    transformers = _import_transformers()

    say("reading configs")
    unet_cfg = _read_json(src / "unet" / "config.json", "the diffusers UNet2DConditionModel config")
    vae_cfg = _read_json(src / "vae" / "config.json", "the diffusers AutoencoderKL config")
    sched_path = src / "scheduler" / "scheduler_config.json"
    sched_cfg = _read_json(sched_path, "the scheduler config") if sched_path.is_file() else None
    if sched_cfg is None:
        say(f"no {sched_path}, using the SD-2.1 noise schedule defaults")
    cfg = _model_config(src, dst, unet_cfg, vae_cfg, sched_cfg, sched_path)

    unet_weights = _need_weights(src / "unet", WEIGHTS, "the UNet weights")
    vae_weights = _need_weights(src / "vae", WEIGHTS, "the VAE weights")
    tok_dir = src / "tokenizer"
    if not tok_dir.is_dir():
        raise ModelFolderError(
            f"{tok_dir} is missing; it should be the CLIP tokenizer folder "
            "(vocab.json + merges.txt, or tokenizer.json)"
        )
    te_dir = src / "text_encoder"
    _read_json(te_dir / "config.json", "the transformers CLIPTextModel config")
    te_variant = None
    fp32 = (te_dir / TEXT_WEIGHTS_INDEX).is_file() or (te_dir / TEXT_WEIGHTS).is_file()
    if not fp32 and (te_dir / TEXT_WEIGHTS_INDEX_FP16).is_file():
        # sharded fp16 variant: model.fp16-0000N-of-0000M.safetensors; fp32 files come first,
        # as for the UNet and the VAE (a full hub snapshot holds both)
        te_variant = FP16
    elif not (te_dir / TEXT_WEIGHTS_INDEX).is_file():
        te_weights = _need_weights(
            te_dir, TEXT_WEIGHTS, "the CLIP text encoder weights", bin_name="pytorch_model.bin"
        )
        te_variant = FP16 if te_weights.name != TEXT_WEIGHTS else None
    for path in (unet_weights, vae_weights):
        if path.name != WEIGHTS:
            say(f"reading the fp16 file {path} (the model is converted to fp32)")

    from diffusers import AutoencoderKL, UNet2DConditionModel

    say("reading unet")
    state = _read_safetensors(unet_weights)
    c = cfg.latent_channels
    say(f"widening conv_in {c} -> {2 * c}")
    w = state.get("conv_in.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == c:
        wide = torch.zeros(w.shape[0], 2 * c, *w.shape[2:], dtype=w.dtype)
        wide[:, :c] = w
        state["conv_in.weight"] = wide
    unet = _build(UNet2DConditionModel, cfg.unet, src / "unet" / "config.json")
    _load_strict(unet, state, unet_weights)
    del state

    say("reading vae")
    vae = _build(AutoencoderKL, cfg.vae, src / "vae" / "config.json")
    _load_strict(vae, modern_attention_keys(_read_safetensors(vae_weights)), vae_weights)

    say("computing the empty-prompt text embedding")
    text = _empty_prompt_embedding(transformers, tok_dir, te_dir, cfg.text_tokens, te_variant)
    if tuple(text.shape) != (cfg.text_tokens, cfg.text_dim):
        raise ModelFolderError(
            f"{te_dir} gives an empty-prompt embedding of shape {tuple(text.shape)}, but the UNet "
            f"in {src / 'unet'} expects ({cfg.text_tokens}, {cfg.text_dim}) "
            "(cross_attention_dim); the text encoder does not belong to this UNet"
        )

    say(f"initialising PFJ and MMLE (seed {seed})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pfj = PFJ(latent_channels=c, gain_dim=cfg.pfj.gain_dim, hidden=cfg.pfj.hidden)
        mmle = mmle_for(cfg)
    for m in (unet, vae, pfj, mmle):
        m.eval().requires_grad_(False)
    models = TorchModels(cfg, unet, vae, pfj, mmle, text, source=f"converted from {src}")

    # Not tempfile.mkdtemp: its 0o700 mode would stick to DST after the rename.
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise ModelFolderError(_unwritable(dst, exc)) from exc
    try:
        say(f"writing {dst}")
        try:
            models.save(tmp)
        except Exception as exc:  # OSError, or safetensors' SafetensorError for a short write
            if not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
                raise
            raise ModelFolderError(_unwritable(dst, exc)) from exc
        # safetensors writes its files 0o600; a model folder is for every user of the machine,
        # as `adadiff train ship` leaves its own.
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        _check_dst(dst)  # someone may have written there while we converted
        if dst.is_dir():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say("done")
    return dst


def _check_dst(dst: Path) -> None:
    if dst.is_dir():
        # the folder is written beside DST and renamed into place: the working directory
        # ("-o .") cannot be replaced so, and was refused as not empty after the slow work
        if dst.resolve() == Path.cwd().resolve():
            raise ModelFolderError(
                f"{dst} is the working directory; pick a new folder for the converted model "
                "(a name under it, such as sd21-adadiff)"
            )
        if any(dst.iterdir()):
            raise ModelFolderError(
                f"{dst} already exists and is not empty; pick a new folder for the converted model"
            )
    elif dst.exists():
        raise ModelFolderError(f"{dst} exists and is not a folder; pick a new folder for the model")
    else:
        # Checked before the slow work, which would otherwise end in this error.
        ancestor = dst.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ModelFolderError(
                f"cannot create {dst}: {ancestor} is not a folder; pick a new folder for the model"
            )


def _unwritable(dst: Path, exc: BaseException) -> str:
    # str(exc) may be empty (OSError(), a bare SafetensorError): no IndexError over the real one
    reason = getattr(exc, "strerror", None) or next(iter(str(exc).splitlines()), type(exc).__name__)
    return (
        f"cannot write the model folder {dst} ({reason}); free space or pick a folder you can "
        "write to, then run again"
    )


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError(
            "converting a Stable Diffusion folder needs transformers for the CLIP text encoder: "
            'pip install "adadiff[convert]"'
        ) from exc
    return transformers


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; it should be {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not readable JSON ({what}): {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} should hold a JSON object ({what})")
    return data


def _need_weights(folder: Path, name: str, what: str, *, bin_name: str | None = None) -> Path:
    path = folder / name
    if path.is_file():
        return path
    # what `--variant fp16` downloads fetch instead (e.g. diffusion_pytorch_model.fp16.safetensors)
    variant = folder / name.replace(".safetensors", f".{FP16}.safetensors")
    if variant.is_file():
        return variant
    bin_path = folder / (bin_name or name.replace(".safetensors", ".bin"))
    if bin_path.is_file():
        raise ModelFolderError(
            f"{path} is missing ({what}); only {bin_path.name} is there and this converter reads "
            "safetensors only: convert it to safetensors first (e.g. load it with diffusers or "
            "transformers and save_pretrained(..., safe_serialization=True))"
        )
    raise ModelFolderError(f"{path} is missing; it should be {what} in safetensors format")


def _constructor_kwargs(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a diffusers config.json that ``cls.__init__`` accepts (no ``_class_name``)."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in config.items() if not k.startswith("_") and k in params}


def _model_config(
    src: Path,
    dst: Path,
    unet_cfg: dict[str, Any],
    vae_cfg: dict[str, Any],
    sched_cfg: dict[str, Any] | None,
    sched_path: Path,
) -> ModelConfig:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _constructor_kwargs(UNet2DConditionModel, unet_cfg)
    vae = _constructor_kwargs(AutoencoderKL, vae_cfg)
    unet_path, vae_path = src / "unet" / "config.json", src / "vae" / "config.json"

    latent = int(vae.get("latent_channels", 4))
    src_in = unet.get("in_channels", 4)
    if src_in != latent or unet.get("out_channels", 4) != latent:
        raise ModelFolderError(
            f"{unet_path} has in_channels {src_in} and out_channels {unet.get('out_channels', 4)}; "
            f"a stock SD-2.1 UNet has both equal to the VAE's latent_channels ({latent}). "
            "Is this folder already converted, or an upscaler/inpainting model?"
        )
    # The runtime passes only (sample, timestep, text): a UNet that also needs SDXL's
    # added_cond_kwargs or class labels would convert, then fail on the first upscale.
    extra = {
        k: unet[k]
        for k in ("addition_embed_type", "class_embed_type", "num_class_embeds")
        if unet.get(k) is not None
    }
    if extra:
        raise ModelFolderError(
            f"{unet_path} sets {extra}: this UNet needs extra conditioning inputs (an SDXL or "
            "class-conditioned model), which adadiff does not pass; convert a "
            "Stable Diffusion 2.1 folder"
        )
    if "cross_attention_dim" not in unet:
        raise ModelFolderError(
            f"{unet_path} has no cross_attention_dim; is it a text-to-image UNet?"
        )
    if "block_out_channels" not in vae:
        raise ModelFolderError(f"{vae_path} has no block_out_channels")
    if vae.get("shift_factor") not in (None, 0, 0.0):
        # The adadiff VAE wrappers only scale latents; a shifted latent space would decode wrong.
        raise ModelFolderError(
            f"{vae_path} sets shift_factor {vae['shift_factor']}; only SD-2.1-style VAEs "
            "(no shift) are supported"
        )
    scaling = vae.get("scaling_factor")
    scaling = DEFAULT_SCALING_FACTOR if scaling is None else float(scaling)
    unet["in_channels"] = 2 * latent
    vae["scaling_factor"] = scaling

    base = sd21_base()
    noise = base.noise
    if sched_cfg is not None:
        if sched_cfg.get("trained_betas") is not None:
            raise ModelFolderError(
                f"{sched_path} uses trained_betas, which adadiff's noise schedule cannot express"
            )
        known = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "prediction_type",
        )
        try:
            noise = replace(noise, **{k: sched_cfg[k] for k in known if k in sched_cfg})
        except (ConfigError, ValueError, TypeError) as exc:
            raise ModelFolderError(
                f"{sched_path} has an unsupported noise schedule: {exc}"
            ) from exc

    # SD-2.1-base's tiles in latent positions (64, 8 overlapping: 512/64 px at its VAE factor 8),
    # kept for a VAE of another factor: 512 px at factor 2 would be 256 latents a side, 16x the
    # convolution work per tile and 256x the first attention level's.
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    tile = base.latent_tile * factor
    overlap = base.tile_overlap // base.vae_scale_factor * factor
    try:
        return replace(
            base,
            name=dst.name or base.name,
            unet=unet,
            vae=vae,
            scaling_factor=scaling,
            noise=noise,
            tile_size=tile,
            tile_overlap=overlap,
        )
    except ConfigError as exc:
        raise ModelFolderError(
            f"{src}: the configs do not make a valid adadiff model: {exc}"
        ) from exc


def _build(cls: type, kwargs: dict[str, Any], config_path: Path) -> nn.Module:
    # The random init is overwritten by the stock weights; fork_rng keeps the caller's RNG intact.
    with torch.random.fork_rng(devices=[]):
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelFolderError(
                f"cannot build {cls.__name__} from {config_path}: {exc}"
            ) from exc


# diffusers before 0.15 named the VAE's attention projections query/key/value/proj_attn; the
# stock SD-2.1-base VAE file still does, and diffusers renames them when it loads.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with old-style VAE attention names mapped to today's diffusers names."""
    out = {}
    for key, tensor in state.items():
        match = _OLD_ATTENTION.match(key)
        if match:
            prefix, old, kind = match.groups()
            key = f"{prefix}{_NEW_ATTENTION[old]}.{kind}"
        out[key] = tensor
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
        raise ModelFolderError(f"{path} is not a readable safetensors file: {exc}") from exc


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelFolderError(
            f"{path} does not match its config.json: missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ModelFolderError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, its config.json implies "
                f"{tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


def _empty_prompt_embedding(
    transformers: Any, tok_dir: Path, te_dir: Path, tokens: int, variant: str | None = None
) -> torch.Tensor:
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a broken folder
        raise ModelFolderError(f"{tok_dir} is not a loadable CLIP tokenizer folder: {exc}") from exc
    try:
        encoder = transformers.CLIPTextModel.from_pretrained(
            str(te_dir), local_files_only=True, variant=variant
        )
    except Exception as exc:
        raise ModelFolderError(f"{te_dir} is not a loadable CLIPTextModel folder: {exc}") from exc
    # The tokenizer's model_max_length can be a huge sentinel; the UNet was trained on 77 tokens.
    ids = tokenizer(
        "", padding="max_length", max_length=tokens, truncation=True, return_tensors="pt"
    ).input_ids
    encoder = encoder.float().eval()
    try:
        with torch.no_grad():
            hidden = encoder(ids).last_hidden_state
    except (IndexError, RuntimeError, ValueError) as exc:
        raise ModelFolderError(
            f"the text encoder in {te_dir} cannot encode {tokens} tokens from {tok_dir}: {exc}"
        ) from exc
    return hidden[0].float().contiguous()
