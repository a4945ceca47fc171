"""Rematerialisation: ResNet stages (model.remat), which blocks are recomputed and how it
parses; CUT generator blocks (method.cut.remat)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax.models import DeepLabV2, cut
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

  return _regions(jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"]))


def _regions(jaxpr):
  """Rematerialised regions in a jaxpr: 'remat2' in jax 0.10, 'checkpoint' later."""
  return len(re.findall(r"\b(?:checkpoint|remat2?)\[", str(jaxpr)))


def test_only_the_named_stages_are_rematerialised():
  # ResNet-18: two blocks per stage, each block one rematerialised region.
  assert _checkpointed_blocks(False) == 0
  assert _checkpointed_blocks("layer1,layer3") == 4
  assert _checkpointed_blocks(True) == 8


def test_generator_remat_keeps_image_taps_and_gradients():
  """`method.cut.remat`: every ResNet block becomes one recomputed region; the parameter
  tree, the image, the taps and the gradients stay those of the plain generator."""
  plain = cut.ResnetGenerator(ngf=4, n_blocks=3)
  remat = cut.ResnetGenerator(ngf=4, n_blocks=3, remat=True)
  x = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  nce = (4, 12, 13)
  params = jax.jit(lambda k: plain.init(k, x, nce_layers=nce))(jax.random.key(0))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: remat.init(jax.random.key(0), x, nce_layers=nce))["params"])

  def loss(model):
    def f(p):
      image, taps = model.apply({"params": p}, x, nce_layers=nce)
      return jnp.mean(image ** 2) + sum(jnp.mean(t ** 3) for t in taps)
    return f

  (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, remat))
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  # atol: the biases that feed an InstanceNorm have an exact gradient of 0 (rounding residue).
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
               g1, g0)
  count = lambda m: _regions(jax.make_jaxpr(jax.grad(loss(m)))(params))
  assert (count(plain), count(remat)) == (0, 3)
