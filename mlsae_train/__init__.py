"""Stage 2: train sparse dictionaries on cached residual-stream activations: the multi-layer TopK SAE
(MLSAE, ``--arch mlsae``, the default), a TopK SAE per layer (``per-layer``) or an acausal TopK
crosscoder (``crosscoder``), all behind one interface (:class:`Dictionary`, dictionary.py).

``load_sae(path)`` returns the trained dictionary (``sae.arch`` names its family): ``sae(x)``
reconstructs x [N, L, d_model] (the run's layers; an MLSAE takes any [..., d_model]) in input space,
``sae.encode(x)`` gives the active latents ``(values, indices)`` after ReLU, and ``sae.W_dec`` is
[n_latents, d_model] (per-layer [L, n_latents, d_model], crosscoder [n_latents, L, d_model]).
``sae.encode(x, screen=True)`` picks the same latents through the exact bfloat16 screen, faster where
bfloat16 matmuls are fast.
"""

from .checkpoint import load_sae, save_sae
from .config import TrainConfig
from .crosscoder import Crosscoder
from .dictionary import Dictionary
from .families import FAMILIES
from .model import MultiLayerSAE
from .per_layer import PerLayerSAEs
from .trainer import train

__all__ = ["FAMILIES", "Crosscoder", "Dictionary", "MultiLayerSAE", "PerLayerSAEs", "TrainConfig", "load_sae", "save_sae", "train"]
