"""Stage 2: train multi-layer TopK sparse autoencoders (MLSAEs) on cached residual-stream activations.

``load_sae(path)`` returns a trained :class:`MultiLayerSAE`: ``sae(x)`` reconstructs x [..., d_model]
in input space, ``sae.encode(x)`` gives the k active latents ``(values, indices)`` after ReLU, and
``sae.W_dec`` is [n_latents, d_model]. ``sae.encode(x, screen=True)`` picks the same latents through the
exact bfloat16 screen, faster where bfloat16 matmuls are fast.
"""

from .checkpoint import load_sae, save_sae
from .config import TrainConfig
from .model import MultiLayerSAE
from .trainer import train

__all__ = ["MultiLayerSAE", "TrainConfig", "load_sae", "save_sae", "train"]
