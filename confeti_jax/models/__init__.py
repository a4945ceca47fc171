"""Flax modules of the segmentor and the builder the trainer uses to create it from a config."""

import jax.numpy as jnp

from confeti_jax.models import daformer, deeplabv2
from confeti_jax.models.daformer import DAFormer
from confeti_jax.models.deeplabv2 import BACKBONES, DeepLabV2
from confeti_jax.models.mit import MIT_VARIANTS
from confeti_jax.models.resnet import ResNetV1c, stage_channels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "BACKBONES", "DTYPES", "DAFormer", "DeepLabV2", "ResNetV1c", "backbone_of",
    "build_segmentor", "is_transformer", "layer4_channels", "parse_dtype", "stage_channels",
]


def parse_dtype(name: str):
  """Config string -> jnp dtype; configs hold strings so they stay printable and overridable."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; model.dtype must be one of {sorted(DTYPES)}.")
  return DTYPES[name]


def is_transformer(backbone: str) -> bool:
  return backbone in MIT_VARIANTS


def build_segmentor(model_cfg, num_classes: int, **heads):
  """The segmentor of the `config.model` sub-dict: DeepLabV2 on a ResNet-V1c backbone
  (backbone, width, dtype, aspp_dilations, stem), or DAFormer on a MiT encoder
  (`backbone=mit_b0..mit_b5`, `decoder`: daformer | segformer; width and the ASPP
  dilations do not apply).

  `heads` are the method's auxiliary heads (e.g. cam_head=True, proj_dim=512).
  """
  dtype = parse_dtype(model_cfg.dtype)
  remat = model_cfg.get("remat", False)
  if is_transformer(model_cfg.backbone):
    if heads.get("aux_classifier"):
      raise ValueError("ADVENT's multi-level head (method.multi_level) exists for DeepLabV2 "
                       "only; set method.multi_level=False with a MiT backbone.")
    heads.pop("aux_classifier", None)
    return DAFormer(**heads, num_classes=num_classes, backbone=model_cfg.backbone,
                    decoder=model_cfg.get("decoder", "daformer"), dtype=dtype, remat=remat)
  return DeepLabV2(
      **heads,
      num_classes=num_classes,
      backbone=model_cfg.backbone,
      width=float(model_cfg.width),
      aspp_dilations=tuple(int(d) for d in model_cfg.aspp_dilations),
      dtype=dtype,
      remat=remat,
      stem=model_cfg.get("stem", "deep"),  # configs saved before the key existed lack it
  )


def backbone_of(segmentor, **kwargs):
  """The backbone module a segmentor runs under 'backbone' (for DACS's ImageNet copy)."""
  if isinstance(segmentor, DAFormer):
    return daformer.backbone_of(segmentor, **kwargs)
  return deeplabv2.backbone_of(segmentor, **kwargs)


def layer4_channels(model_cfg) -> int:
  """Width of the backbone's last stage ('layer4'), the features CFContra contrasts."""
  if is_transformer(model_cfg.backbone):
    return MIT_VARIANTS[model_cfg.backbone][0][3]
  depth = deeplabv2.backbone_depth(model_cfg.backbone)
  return stage_channels(depth, float(model_cfg.width))[3]
