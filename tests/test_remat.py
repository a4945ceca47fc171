"""Per-stage rematerialisation (model.remat): which blocks are recomputed, and how it parses."""

import re

import jax
import jax.numpy as jnp
import pytest

from confeti_jax.models import DeepLabV2
from confeti_jax.models.resnet import STAGES, remat_stages


def test_remat_stages_accepts_bools_config_strings_and_names():
  assert remat_stages(False) == remat_stages("") == remat_stages("none") == frozenset()
  assert remat_stages(True) == remat_stages("all") == remat_stages("True") == set(STAGES)
  assert remat_stages("layer3, layer4") == remat_stages(("layer4", "layer3")) == {
      "layer3", "layer4"}
  with pytest.raises(ValueError, match="layer5.*layer1, layer2, layer3, layer4"):
    remat_stages("layer3,layer5")


def _checkpointed_blocks(remat):
  """Number of rematerialised regions in the gradient of a ResNet-18 DeepLabV2."""
  model = DeepLabV2(num_classes=3, backbone="resnet18", width=0.125, remat=remat)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

  def loss(params, batch_stats):
    (logits, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                 train=True, mutable=["batch_stats"])
    return jnp.sum(logits)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"])
  # The primitive is 'remat2' in jax 0.10 and 'checkpoint' in later versions.
  return len(re.findall(r"\b(?:checkpoint|remat2?)\[", str(jaxpr)))


def test_only_the_named_stages_are_rematerialised():
  # ResNet-18: two blocks per stage, each block one rematerialised region.
  assert _checkpointed_blocks(False) == 0
  assert _checkpointed_blocks("layer1,layer3") == 4
  assert _checkpointed_blocks(True) == 8
