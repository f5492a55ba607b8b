"""Export wrappers: one module per component whose forward takes exactly the spec's inputs.

The torch backend runs these same wrappers, so the reference and every export share one graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The diffusers models (UNet2DConditionModel, AutoencoderKL) are typed Any here: their methods
# (decode, save_pretrained) and submodules are not visible through nn.Module's types.
DiffusersModel = Any


class UNetWrapper(nn.Module):
    """sample [B, 2C, s, s], timestep [B] -> noise_pred [B, C, s, s], empty prompt built in."""

    text_embedding: torch.Tensor

    def __init__(self, unet: DiffusersModel, text_embedding: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("text_embedding", text_embedding[None].clone(), persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        context = self.text_embedding.expand(sample.shape[0], -1, -1).to(sample.dtype)
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class VAEEncoderWrapper(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> scaled latent mean [B, C, H/f, W/f]."""

    def __init__(self, vae: DiffusersModel, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean = moments[:, : moments.shape[1] // 2]
        return mean * self.scaling_factor


class VAEDecoderWrapper(nn.Module):
    """scaled latent [B, C, h, w] -> image [B, 3, f*h, f*w] in about [-1, 1] (not clamped)."""

    def __init__(self, vae: DiffusersModel, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


class PFJWrapper(nn.Module):
    def __init__(self, pfj: nn.Module) -> None:
        super().__init__()
        self.pfj = pfj

    def forward(self, lr_latent: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return self.pfj(lr_latent, gain)


class MMLEWrapper(nn.Module):
    def __init__(self, mmle: nn.Module) -> None:
        super().__init__()
        self.mmle = mmle

    def forward(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return self.mmle(x0, lr_latent, timestep)
