"""bfloat16 compute: one step's loss and gradients stay close to float32, state stays float32.

`model.dtype=bfloat16` changes the convolutions only: parameters, optimiser states,
BatchNorm and InstanceNorm statistics, the EMA teacher, logits, softmax, CUT's image and
losses stay float32 (docs/design.md "Numerics"). The segmentor's gradients are read out of
the real jitted `train_step` by letting the optimiser write them in place of the
parameters; CUT's come from its loss functions directly.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import methods, photometric, style
from confeti_jax import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import toy  # noqa: E402

BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """XLA at -O0 compiles these steps ~40% faster; float32 and bfloat16 get it alike."""
  jax.config.update("jax_disable_most_optimizations", True)  # read at each compilation
  yield
  jax.config.update("jax_disable_most_optimizations", False)  # the suite's setting


def _batch():
  rng = np.random.default_rng(0)
  return {d: {"image": rng.integers(0, 256, (BATCH, 64, 64, 3), dtype=np.uint8),
              "label": rng.integers(0, 19, (BATCH, 64, 64), dtype=np.uint8)}
          for d in ("source", "target")}


def _config(method, dtype):
  config = toy.get_config(f"tiny=1,method={method}")
  config.model.dtype = dtype
  return config


def _gradient_step(method_name, dtype):
  """Jitted state -> (metrics, gradients, new state) of one `train_step` in `dtype`.

  Call it under the monkeypatch of OptGroup.apply_gradients (`_capture_gradients`).
  """
  method = methods.build(_config(method_name, dtype))

  def step(state):
    new_state, metrics = method.train_step(state, _batch(), jax.random.key(1))
    return metrics, new_state.seg.params, new_state
  return jax.jit(step)


def _capture_gradients(monkeypatch):
  monkeypatch.setattr(state_lib.OptGroup, "apply_gradients",
                      lambda self, grads: self.replace(params=grads))
  # Photometric augmentation is float32 image code whatever model.dtype says; leaving it
  # out halves DACS's compile time here (it is tested in test_augment_mix).
  monkeypatch.setattr(photometric, "strong_transform", lambda k1, k2, images, **kw: images)


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def _relative_error(got, want):
  got, want = jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))
  err = sum(float(np.sum((g - w) ** 2)) for g, w in zip(got, want))
  return np.sqrt(err / sum(float(np.sum(w ** 2)) for w in want))


def _heads(grads):
  return {k: v for k, v in grads.items() if k != "backbone"}


@pytest.mark.parametrize("method_name", ["source_only", "dacs"])
def test_bfloat16_step_is_close_to_float32(method_name, monkeypatch):
  """Loss to 1e-4; gradients within twice what rounding the weights to bf16 does in fp32.

  At a random initialisation the backbone gradient is a small residue of cancelling
  terms (the head is N(0, 0.01)): in float32 alone, rounding the parameters to
  bfloat16 moves it by about 25%. That sensitivity, measured here, is the yardstick;
  a float32 part computed in bfloat16 (softmax, loss, BN statistics) would exceed it.
  """
  _capture_gradients(monkeypatch)
  # An rbg key: the same float32 initial state for both runs, compiled in seconds
  # rather than threefry's tens of seconds on CPU.
  init = methods.build(_config(method_name, "float32")).init_state
  state = jax.jit(init)(jax.random.key(0, impl="rbg"))
  rounded = state.replace(seg=state.seg.replace(params=jax.tree.map(
      lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state.seg.params)))
  step32 = _gradient_step(method_name, "float32")
  m32, g32, _ = jax.device_get(step32(state))
  _, g32_rounded, _ = jax.device_get(step32(rounded))
  m16, g16, s16 = _gradient_step(method_name, "bfloat16")(state)

  # What stays float32 under bfloat16 compute.
  assert _dtypes(g16) == {"float32"}
  assert _dtypes(s16.seg.opt_state) <= {"float32", "int32"}
  assert _dtypes(s16.batch_stats) == {"float32"}
  assert _dtypes((s16.teacher, s16.imnet)) <= {"float32"}  # None for source_only
  assert _dtypes(m16) == {"float32"}

  # bfloat16 was really used, and stayed close.
  m16 = jax.device_get(m16)
  assert m16["loss"] != m32["loss"]
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-4)
  sensitivity = _relative_error(g32_rounded, g32)
  assert 0 < _relative_error(g16, g32) < 2 * sensitivity + 0.02
  assert _relative_error(_heads(g16), _heads(g32)) < 0.05


def test_bfloat16_features_and_float32_logits():
  method = methods.build(_config("source_only", "bfloat16"))
  variables = jax.eval_shape(method.init_segmentor, jax.random.key(0))
  assert _dtypes(variables) == {"float32"}
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  logits, feats = jax.eval_shape(lambda v, x: method.model.apply(v, x, train=False),
                                 variables, x)
  assert logits.dtype == jnp.float32
  assert feats["layer4"].dtype == jnp.bfloat16


def _kernels(tree):
  return [x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "kernel" in jax.tree_util.keystr(path)]


def test_bfloat16_cut_losses_and_gradients_are_close_to_float32():
  """CUT's G, D and patch MLPs: the stage-0 / joint-stage losses and their gradients.

  Kernels are compared: the biases of convolutions that feed an InstanceNorm have an
  exact gradient of zero (the mean subtraction removes them), so both dtypes return
  rounding residue there. The yardstick is the float32 gradient's own sensitivity to
  rounding the parameters and images to bfloat16 (measured, seeds 0-3: bf16 / yardstick
  G 0.27-0.34 / 0.17-0.22, F 0.06-0.07 / 0.04, D 0.02-0.03 / 0.01-0.03).
  """
  cut_cfg = _config("confeti", "float32").method.cut
  model32, model16 = (style.build_cut(cut_cfg, dtype) for dtype in ("float32", "bfloat16"))
  gen, disc, mlp = style.init_cut(jax.random.key(0), model32)
  rng = np.random.default_rng(0)
  xs, xt = (jnp.asarray(rng.uniform(-1, 1, (BATCH, 64, 64, 3)), jnp.float32) for _ in "st")

  def losses_and_grads(model, params, xs, xt):
    g, m, d = params
    (_, g_metrics), g_grads = jax.value_and_grad(
        lambda g, m: style.g_loss(model, g, m, d, xs, xt, jax.random.key(3)),
        argnums=(0, 1), has_aux=True)(g, m)
    fake = style.generate(model, g, xs)
    (_, d_metrics), d_grads = jax.value_and_grad(
        lambda d: style.d_loss(model, d, fake, xt), has_aux=True)(d)
    return {**g_metrics, **d_metrics}, (*g_grads, d_grads), fake

  run = jax.jit(losses_and_grads, static_argnums=0)
  params = (gen.params, mlp.params, disc.params)
  rounded = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), t)
  m32, g32, _ = jax.device_get(run(model32, params, xs, xt))
  _, g32_rounded, _ = jax.device_get(run(model32, rounded(params), rounded(xs), rounded(xt)))
  m16, g16, fake16 = jax.device_get(run(model16, params, xs, xt))

  assert _dtypes((m16, g16, fake16)) == {"float32"}
  assert m16["loss_NCE"] != m32["loss_NCE"]  # bfloat16 was really used
  for name in ("loss_G", "loss_G_GAN", "loss_NCE", "loss_NCE_Y", "loss_D"):
    np.testing.assert_allclose(m16[name], m32[name], rtol=2e-3, err_msg=name)
  for network, got, want, rounded_want in zip("GFD", g16, g32, g32_rounded):
    sensitivity = _relative_error(_kernels(rounded_want), _kernels(want))
    error = _relative_error(_kernels(got), _kernels(want))
    assert 0 < error < 2 * sensitivity + 0.02, (network, error, sensitivity)
