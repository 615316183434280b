"""Stage 3: analyse trained dictionaries of every family (metrics, MMCS, residual statistics, how latents spread over layers)."""

from .layer_distributions import latent_layer_table, layer_distributions, layer_statistics, variance_ratios
from .mmcs import mmcs

__all__ = ["latent_layer_table", "layer_distributions", "layer_statistics", "mmcs", "variance_ratios"]
