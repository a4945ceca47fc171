"""confeti_jax: unsupervised domain-adaptive semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"
