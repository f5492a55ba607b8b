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
        if self.conv_out.bias is not None:  # always, for a Conv2d made with a bias
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
    # The spread carries texture, which NR scores need. Its statistics are computed in fp32
    # and handed back in the features' dtype, so a half-precision MMLE stays half.
    mean = feats.mean(dim=(2, 3))
    if feats.shape[2] * feats.shape[3] == 1:  # a tile of 8 latent px or less: no spread to
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)  # measure (std would be NaN)
    spread = feats.float().std(dim=(2, 3)).to(feats.dtype)
    return torch.cat([mean, spread], dim=1)


class MMLE(nn.Module):
    """x0 latent, LR latent, timestep -> the six metric scores, predicted from latents alone.

    The full-reference scores compare the decoded x0 with the LR input in pixels, so they carry
    the VAE's reconstruction error of that input, which no latent shows directly. A second
    branch on the LR latent alone estimates that error (``recon_error``: standardised log10 of
    the MSE and, with ``lpips_index``, of the LPIPS between the input and its reconstruction;
    trained on its own targets, see ``adadiff.training.mmle``) and feeds it to the head.

    PSNR (column ``psnr_index``) and LPIPS (``lpips_index``) are built from that estimate: their
    head columns give log10 of the error between the decoded x0 and the decoded LR latent, and
    the two errors add: PSNR = -10 log10(10^a + 10^r), LPIPS = 10^a + 10^r. For MSE the cross
    term is small; for LPIPS the sum ranks the real score almost as well (Spearman 0.99 on
    hold-out trajectories of the tiny model).

    Buffers set by the trainer, one column per part (0: MSE/PSNR, 1: LPIPS): ``recon_scale``
    and ``latent_scale`` (mean, std: standardised output -> log10 error), ``column_scale``
    (the score column's standardisation; (0, 1) once baked to raw scores) and ``recon_used``
    (1: the branch's per-crop estimate enters the score; 0: only its training mean does, for a
    part whose estimate does not carry over to photos the branch never saw).
    """

    recon_scale: torch.Tensor
    latent_scale: torch.Tensor
    column_scale: torch.Tensor
    recon_used: torch.Tensor

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        num_scores: int = 6,
        hidden: int = 32,
        psnr_index: int | None = None,
        lpips_index: int | None = None,
    ) -> None:
        super().__init__()
        c, h = latent_channels, hidden
        for name, index in (("psnr_index", psnr_index), ("lpips_index", lpips_index)):
            if index is not None and not 0 <= index < num_scores:
                raise ValueError(f"{name} {index} is not one of {num_scores} scores")
        if psnr_index is not None and psnr_index == lpips_index:
            raise ValueError(f"psnr_index and lpips_index are both {psnr_index}")
        self.psnr_index, self.lpips_index = psnr_index, lpips_index
        parts = 2 if lpips_index is not None else 1
        self.register_buffer("recon_scale", torch.tensor([[-3.7, -1.5], [0.5, 0.3]])[:, :parts])
        self.register_buffer("latent_scale", torch.tensor([[-3.0, -0.7], [-0.2, 0.3]]))
        self.register_buffer("column_scale", torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        self.register_buffer("recon_used", torch.ones(parts))
        self.time_dim = h
        self.features = _pooled_cnn(3 * c, h)
        self.time_proj = nn.Linear(h, 4 * h)
        self.recon_features = _pooled_cnn(c, h)
        self.recon_head = nn.Sequential(nn.Linear(4 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, parts))
        self.recon_proj = nn.Linear(parts, 4 * h)
        self.head = nn.Sequential(nn.Linear(4 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, num_scores))

    @property
    def split_columns(self) -> tuple[tuple[int, int], ...]:
        """(score column, part) of each score built from a latent and a reconstruction error."""
        columns = ((self.psnr_index, 0), (self.lpips_index, 1))
        return tuple((col, part) for col, part in columns if col is not None)

    def recon_error(self, lr_latent: torch.Tensor) -> torch.Tensor:
        """[B, parts]: the LR input's reconstruction errors, standardised log10 (MSE, LPIPS)."""
        return self.recon_head(_mean_and_spread(self.recon_features(lr_latent)))

    def parts(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(head output [B, S], recon_error [B, parts]); the PSNR and LPIPS columns of the head
        output are the standardised log10 errors between decode(x0) and decode(lr_latent)."""
        feats = self.features(torch.cat([x0, lr_latent, x0 - lr_latent], dim=1))
        # Only its own targets train the branch, so it stays an estimate of those errors.
        recon = self.recon_error(lr_latent).detach()
        pooled = (
            _mean_and_spread(feats)
            # the sinusoid in fp32, the projection in the module's own dtype
            + self.time_proj(
                timestep_features(timestep, self.time_dim).to(self.time_proj.weight.dtype)
            )
            + self.recon_proj(recon)
        )
        return self.head(pooled), recon

    def combine(self, out: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        columns = list(out.unbind(dim=1))
        for col, part in self.split_columns:
            a = (out[:, col] * self.latent_scale[1, part] + self.latent_scale[0, part]) * _LN10
            estimate = recon[:, part] * self.recon_used[part]
            r = (estimate * self.recon_scale[1, part] + self.recon_scale[0, part]) * _LN10
            top = torch.maximum(a, r)
            total = top + torch.log(torch.exp(a - top) + torch.exp(r - top))  # ln(sum of errors)
            score = -10.0 / _LN10 * total if part == 0 else torch.exp(total)
            columns[col] = (score - self.column_scale[0, part]) / self.column_scale[1, part]
        return torch.stack(columns, dim=1)

    def forward(
        self, x0: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return self.combine(*self.parts(x0, lr_latent, timestep))
