"""Flax modules of the segmentor and the builder the trainer uses to create it from a config."""

import jax.numpy as jnp

from confeti_jax.models.deeplabv2 import BACKBONES, DeepLabV2
from confeti_jax.models.resnet import ResNetV1c, stage_channels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "BACKBONES", "DTYPES", "DeepLabV2", "ResNetV1c", "build_segmentor", "parse_dtype",
    "stage_channels",
]


def parse_dtype(name: str):
  """Config string -> jnp dtype; configs hold strings so they stay printable and overridable."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; model.dtype must be one of {sorted(DTYPES)}.")
  return DTYPES[name]


def build_segmentor(model_cfg, num_classes: int, **heads) -> DeepLabV2:
  """DeepLabV2 from the `config.model` sub-dict (backbone, width, dtype, aspp_dilations, stem).

  `heads` are the method's auxiliary heads (e.g. cam_head=True, proj_dim=512).
  """
  return DeepLabV2(
      **heads,
      num_classes=num_classes,
      backbone=model_cfg.backbone,
      width=float(model_cfg.width),
      aspp_dilations=tuple(int(d) for d in model_cfg.aspp_dilations),
      dtype=parse_dtype(model_cfg.dtype),
      remat=model_cfg.get("remat", False),
      stem=model_cfg.get("stem", "deep"),  # configs saved before the key existed lack it
  )
