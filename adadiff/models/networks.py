"""The two small networks of AdaDiffSR: PFJ (feature modulation) and the MMLE score regressor."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

_LN10 = math.log(10.0)


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


def _pooled_cnn(in_channels: int, hidden: int) -> nn.Sequential:
    """Three stride-2 convolutions: a [B, 2*hidden, s/8, s/8] feature map."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(2 * hidden, 2 * hidden, 3, stride=2, padding=1),
        nn.SiLU(),
    )


def _mean_and_spread(feats: torch.Tensor) -> torch.Tensor:
    # The spread carries texture, which NR scores need.
    return torch.cat([feats.mean(dim=(2, 3)), feats.float().std(dim=(2, 3))], dim=1)


class MMLE(nn.Module):
    """x0 latent, LR latent, timestep -> the six metric scores, predicted from latents alone.

    The full-reference scores compare the decoded x0 with the LR input in pixels, so they carry
    the VAE's reconstruction error of that input, which no latent shows directly. A second
    branch on the LR latent alone estimates that error (``recon_error``: standardised log10
    MSE, trained on its own target, see ``adadiff.training.mmle``) and feeds it to the head.

    PSNR (column ``psnr_index``, when the config scores it) is built from that estimate: the
    head gives log10 of the MSE between the decoded x0 and the decoded LR latent, and the two
    errors add, -10 log10(10^a + 10^r). The errors are nearly orthogonal, so the sum is close.
    Buffers set by the trainer: ``recon_scale`` (mean, std of the log10 targets),
    ``latent_scale`` (the head's output -> log10 MSE; set so that it starts out as standardised
    PSNR) and ``psnr_scale`` (the column's standardisation; (0, 1) once baked to raw scores).
    """

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        num_scores: int = 6,
        hidden: int = 32,
        psnr_index: int | None = None,
    ) -> None:
        super().__init__()
        c, h = latent_channels, hidden
        if psnr_index is not None and not 0 <= psnr_index < num_scores:
            raise ValueError(f"psnr_index {psnr_index} is not one of {num_scores} scores")
        self.psnr_index = psnr_index
        self.register_buffer("recon_scale", torch.tensor([-3.7, 0.5]))
        self.register_buffer("latent_scale", torch.tensor([-3.0, -0.2]))
        self.register_buffer("psnr_scale", torch.tensor([0.0, 1.0]))
        self.time_dim = h
        self.features = _pooled_cnn(3 * c, h)
        self.time_proj = nn.Linear(h, 4 * h)
        self.recon_features = _pooled_cnn(c, h)
        self.recon_head = nn.Sequential(nn.Linear(4 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, 1))
        self.recon_proj = nn.Linear(1, 4 * h)
        self.head = nn.Sequential(nn.Linear(4 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, num_scores))

    def recon_error(self, lr_latent: torch.Tensor) -> torch.Tensor:
        """[B, 1]: the LR input's reconstruction error, standardised log10 MSE."""
        return self.recon_head(_mean_and_spread(self.recon_features(lr_latent)))

    def parts(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(head output [B, S], recon_error [B, 1]); the PSNR column of the head output is the
        standardised log10 MSE between decode(x0) and decode(lr_latent)."""
        feats = self.features(torch.cat([x0, lr_latent, x0 - lr_latent], dim=1))
        # Only its own target trains the branch, so it stays an estimate of that error.
        recon = self.recon_error(lr_latent).detach()
        pooled = (
            _mean_and_spread(feats)
            + self.time_proj(timestep_features(timestep, self.time_dim))
            + self.recon_proj(recon)
        )
        return self.head(pooled), recon

    def combine(self, out: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        p = self.psnr_index
        if p is None:
            return out
        a = (out[:, p] * self.latent_scale[1] + self.latent_scale[0]) * _LN10  # ln latent MSE
        r = (recon[:, 0] * self.recon_scale[1] + self.recon_scale[0]) * _LN10  # ln recon MSE
        top = torch.maximum(a, r)
        psnr = -10.0 / _LN10 * (top + torch.log(torch.exp(a - top) + torch.exp(r - top)))
        psnr = (psnr - self.psnr_scale[0]) / self.psnr_scale[1]
        return torch.cat([out[:, :p], psnr[:, None], out[:, p + 1 :]], dim=1)

    def forward(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return self.combine(*self.parts(x0, lr_latent, timestep))
