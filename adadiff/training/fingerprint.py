"""Which latent space a VAE state reads: a fingerprint of its encoder's tensors, and whether two
states share one. The trainers and the assembly of a model folder check it, so that a decoder,
a UNet or a shipped folder never meets latents of another encoder."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

# The VAE keys that make the latent space: a decoder fits only the encoder it was trained on.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def _encoder_items(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for key in sorted(state):
        if key.startswith(ENCODER_PREFIXES):
            yield key, state[key]


def hash_tensors(digest: Any, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed each named tensor's name and bytes into a hashlib digest."""
    for key, value in items:
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())


def encoder_fingerprint(vae_state: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoder's (and quant_conv's) tensors: which latent space this is."""
    digest = hashlib.sha256()
    hash_tensors(digest, _encoder_items(vae_state))
    return digest.hexdigest()


def same_encoder(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two VAE states read the same latent space: the same encoder tensors, or the same
    once rounded to fp16, since a folder shipped with ``--half`` holds its encoder in fp16."""
    if encoder_fingerprint(a) == encoder_fingerprint(b):
        return True

    def rounded(state: dict[str, torch.Tensor]) -> str:
        return encoder_fingerprint(
            {k: v.half() if v.is_floating_point() else v for k, v in _encoder_items(state)}
        )

    return rounded(a) == rounded(b)
