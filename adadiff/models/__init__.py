"""PyTorch reference modules: diffusers UNet and VAE, PFJ, MMLE, export wrappers, model folders.

Importing this package imports torch; ``import adadiff`` does not.
"""

from adadiff.models.bundle import TorchModels, build_random, load_models
from adadiff.models.networks import MMLE, PFJ

__all__ = ["MMLE", "PFJ", "TorchModels", "build_random", "load_models"]
