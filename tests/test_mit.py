"""MiT + DAFormer / SegFormer heads against a torch statement (tests/torch_mit.py) with the
same random weights, imported through the converters of weights.py; and the pieces the
methods rely on (drop path, the no-decay mask, the FD backbone)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import models, state, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import common  # noqa: E402

torch = pytest.importorskip("torch")
from tests import torch_mit  # noqa: E402

TOL = 1e-4


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _model_cfg(backbone="mit_b0", decoder="daformer"):
  cfg = common.base_config().model
  cfg.backbone, cfg.decoder = backbone, decoder
  return cfg


def _init(model, shape):
  """Variables of `model` for inputs of `shape`, compiled (eager MiT init is slow)."""
  return jax.jit(lambda k: model.init(k, jnp.zeros(shape), train=False))(jax.random.key(0))


def _state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}  # no aliasing


@pytest.mark.parametrize("decoder", ["daformer", "segformer"])
def test_segmentor_matches_torch_in_eval_and_train_mode(decoder):
  torch.manual_seed(0)
  ref = torch_mit.randomise_batch_norms(
      torch_mit.Segmentor("mit_b0", 19, decoder, width=256)).eval()
  x = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
  model = models.build_segmentor(_model_cfg(decoder=decoder), 19)
  variables = jax.jit(lambda k: model.init(k, jnp.asarray(x[:1]), train=False))(
      jax.random.key(0))
  state_dict = {f"model.{k}": v for k, v in _state_dict(ref).items()}  # a UDA checkpoint
  assert weights.detect_format(state_dict) == "daformer"
  variables = weights.merge(variables, weights.convert(state_dict))
  with torch.no_grad():
    want, feats = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  logits, got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  assert _rel(logits, want.permute(0, 2, 3, 1).numpy()) < TOL
  for i in range(4):
    assert _rel(got[f"layer{i + 1}"], feats[i].permute(0, 2, 3, 1).numpy()) < TOL
  # Train mode without a dropout key: batch statistics, nothing dropped (the teacher).
  ref.train()
  with torch.no_grad():
    want_train, _ = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  (logits_train, _), updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, jnp.asarray(x))
  assert _rel(logits_train, want_train.permute(0, 2, 3, 1).numpy()) < TOL
  bn = "fuse_layer.bottleneck.bn" if decoder == "daformer" else "linear_fuse.bn"
  flax_bn = ("bottleneck" if decoder == "daformer" else "fuse", "bn")
  got_mean = updates["batch_stats"][flax_bn[0]][flax_bn[1]]["mean"]
  assert _rel(got_mean, ref.decode_head.state_dict()[f"{bn}.running_mean"].numpy()) < TOL


def test_imagenet_mit_weights_load_as_backbone(tmp_path):
  torch.manual_seed(1)
  encoder = torch_mit.randomise_batch_norms(torch_mit.MiT("mit_b0"))
  state_dict = {**_state_dict(encoder), "head.weight": np.zeros((1000, 256), np.float32)}
  assert weights.detect_format(state_dict) == "mit"
  path = tmp_path / "mit_b0.npz"
  np.savez(path, **state_dict)
  model = models.build_segmentor(_model_cfg(), 19)
  x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
  loaded = weights.load_into(_init(model, x.shape), path, what="backbone")
  _, got = jax.jit(lambda v, x: model.apply(v, x, train=False))(loaded, jnp.asarray(x))
  with torch.no_grad():
    want = encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert _rel(got["layer4"], want[3].permute(0, 2, 3, 1).numpy()) < TOL
  with pytest.raises(weights.WeightsError, match="mit_bN"):
    b1 = models.build_segmentor(_model_cfg("mit_b1"), 19)
    weights.load_into(jax.eval_shape(lambda: b1.init(jax.random.key(0), jnp.asarray(x),
                                                     train=False)), path, what="backbone")


def test_stochastic_depth_and_dropout_only_with_a_key():
  model = models.build_segmentor(_model_cfg(), 19)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = _init(model, x.shape)

  def apply(key, use_key, train):
    rngs = {"dropout": key} if use_key else None
    return model.apply(variables, x, train=train, mutable=["batch_stats"], rngs=rngs)[0][0]

  run = jax.jit(apply, static_argnums=(1, 2))
  key = jax.random.key(3)
  plain = run(key, False, True)
  dropped = run(key, True, True)
  assert not np.allclose(plain, dropped)
  np.testing.assert_array_equal(dropped, run(key, True, True))
  assert not np.allclose(dropped, run(jax.random.key(4), True, True))
  # The key, not BatchNorm's mode, switches them: MinEnt's bn_eval student still drops.
  assert not np.allclose(run(key, True, False), run(key, False, False))
  np.testing.assert_array_equal(run(key, True, False), run(key, True, False))


def test_norm_parameters_skip_weight_decay_when_asked():
  model = models.build_segmentor(_model_cfg(), 19)
  params = _init(model, (1, 64, 64, 3))["params"]
  mask = state.decay_mask(params)
  assert not mask["backbone"]["block1_0"]["norm1"]["scale"]
  assert not mask["backbone"]["patch_embed1"]["norm"]["bias"]
  assert not mask["backbone"]["block1_0"]["attn"]["norm"]["scale"]
  assert mask["backbone"]["block1_0"]["attn"]["q"]["kernel"] and mask["bottleneck"]["bn"]["scale"]
  cfg = common.base_config().optim
  cfg.norm_decay, cfg.warmup_steps = False, 0
  tx = state.segmentor_optimizer(cfg, 100)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
  # Zero gradients: only weight decay moves a parameter (-lr * wd * p).
  assert float(jnp.abs(updates["backbone"]["norm1"]["scale"]).max()) == 0.0
  q = params["backbone"]["block1_0"]["attn"]["q"]["kernel"]
  np.testing.assert_allclose(updates["backbone"]["block1_0"]["attn"]["q"]["kernel"],
                             -cfg.lr * cfg.weight_decay * q, rtol=1e-5)


def test_feature_distance_backbone_is_the_encoder():
  model = models.build_segmentor(_model_cfg(), 19)
  backbone = models.backbone_of(model)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 64, 64, 3)), jnp.float32)
  variables = _init(model, x.shape)
  feats = jax.jit(lambda p: backbone.apply({"params": p}, x, train=False))(
      variables["params"]["backbone"])
  whole = jax.jit(lambda v: model.apply(v, x, train=False)[1])(variables)
  np.testing.assert_allclose(feats["layer4"], whole["layer4"], rtol=1e-5, atol=1e-6)
  assert models.layer4_channels(_model_cfg("mit_b5")) == 512


def test_patch_convolution_equals_the_strided_convolution():
  from confeti_jax.models import mit

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 19, 22, 8)), jnp.float32)   # not divisible by 4
  kernel = jnp.asarray(rng.normal(size=(4, 4, 8, 6)), jnp.float32)
  want = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(mit.patch_conv(x, kernel), want, rtol=1e-5, atol=1e-5)
