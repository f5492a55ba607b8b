"""The two small networks of AdaDiffSR: PFJ (feature modulation) and the MMLE score regressor."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_features(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of float timesteps [B] -> [B, dim], always computed in fp32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    )
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class PFJ(nn.Module):
    """lr_latent, gain -> alpha * lr_latent + beta with (alpha, beta) from a small CNN.

    The output convolution starts at zero, so an untrained PFJ is the identity (alpha=1, beta=0).
    """

    def __init__(self, *, latent_channels: int = 4, gain_dim: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.conv_in = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.gain_proj = nn.Linear(gain_dim, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, 2 * latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, lr_latent: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(lr_latent) + self.gain_proj(gain)[:, :, None, None]
        h = F.silu(self.conv_mid(F.silu(h)))
        out = self.conv_out(h)
        alpha = 1.0 + out[:, : self.latent_channels]
        beta = out[:, self.latent_channels :]
        return alpha * lr_latent + beta


class MMLE(nn.Module):
    """x0 latent, LR latent, timestep -> the six metric scores, predicted from latents alone."""

    def __init__(self, *, latent_channels: int = 4, num_scores: int = 6, hidden: int = 32) -> None:
        super().__init__()
        c, h = latent_channels, hidden
        self.time_dim = h
        self.features = nn.Sequential(
            nn.Conv2d(3 * c, h, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(h, 2 * h, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * h, 2 * h, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.time_proj = nn.Linear(h, 4 * h)
        self.head = nn.Sequential(nn.Linear(4 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, num_scores))

    def forward(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        feats = self.features(torch.cat([x0, lr_latent, x0 - lr_latent], dim=1))
        # Mean and spread of the feature maps: the spread carries texture, which NR scores need.
        pooled = torch.cat([feats.mean(dim=(2, 3)), feats.float().std(dim=(2, 3))], dim=1)
        pooled = pooled + self.time_proj(timestep_features(timestep, self.time_dim))
        return self.head(pooled)
