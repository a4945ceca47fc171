"""The CPU convolution layer: XLA's numbers, nn.Conv's parameters, nn.Conv's graph off CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax.models import conv as conv_mod
from confeti_jax.models.conv import (
  Conv,
  ConvParams,
  conv2d,
  conv_form,
  plain_conv,
  summed_dilated_conv,
)

# (kernel, stride, padding, dilation, in, out): ResNet 1x1 (strided downsample too), 3x3
# dilated and strided, the CUT discriminator's 4x4 and the generator's unpadded 7x7.
CASES = [(1, 1, 0, 1, 40, 48), (1, 2, 0, 1, 48, 40), (3, 1, 1, 1, 32, 40),
         (3, 2, 2, 2, 36, 32), (3, 1, 4, 4, 32, 33), (4, 1, 1, 1, 32, 32),
         (7, 1, 0, 1, 32, 32)]


def _data(k, cin, cout, seed=0, side=13):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, side, side + 2, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  return x, w


@pytest.mark.parametrize("k,stride,pad,dil,cin,cout", CASES)
def test_tap_gradient_equals_xla_gradient(k, stride, pad, dil, cin, cout):
  """Forward, input gradient and weight gradient agree with lax.conv's to f32 rounding."""
  x, w = _data(k, cin, cout)
  pads = ((pad, pad), (pad, pad))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  ref = lambda x, w: plain_conv(x, w, stride, pads, dil)
  tap = lambda x, w: conv2d(x, w, stride=stride, padding=pad, dilation=dil, form="tap")
  np.testing.assert_allclose(tap(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  g_tap = jax.jit(jax.grad(loss(tap), argnums=(0, 1)))(x, w)
  for a, b in zip(g_tap, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_bfloat16_gradient_close_to_float32():
  x, w = _data(3, 32, 32)
  loss = lambda x, w: jnp.sum(conv2d(x, w, padding=1, form="tap").astype(jnp.float32))
  gx, gw = jax.grad(loss, argnums=(0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  rx, rw = jax.grad(loss, argnums=(0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  assert float(jnp.abs(gw.astype(jnp.float32) - rw).max()) <= 2e-2 * float(jnp.abs(rw).max())


def test_weight_gradient_is_matrix_products_not_a_convolution():
  """The mechanism: the compiled weight gradient holds no convolution (XLA:CPU's slow
  form), while XLA's own holds one."""
  x, w = _data(1, 64, 64)
  hlo = lambda form: jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.sin(conv2d(
      x, w, form=form))))).lower(w, x).compile().as_text()
  assert "convolution(" in hlo("xla")
  assert "convolution(" not in hlo("tap")


def test_formulation_choice():
  assert conv_form(1, 3, 19, backend="cpu") == "tap"
  assert conv_form(3, 64, 64, backend="cpu") == "tap"
  assert conv_form(3, 3, 64, stride=2, backend="cpu") == "xla"     # image input (stem)
  assert conv_form(7, 64, 3, backend="cpu") == "to_image"          # CUT's output conv
  assert conv_form(4, 512, 1, backend="cpu") == "to_image"         # PatchGAN's score
  assert conv_form(4, 64, 1, stride=2, backend="cpu") == "xla"     # strided
  assert conv_form(3, 2048, 19, backend="cpu") == "xla"            # class head
  assert conv_form(1, 64, 64, backend="gpu") == "xla"
  assert conv_form(7, 64, 3, backend="tpu") == "xla"


# (kernel, padding, dilation, in, out): CUT's unpadded 7x7 output conv, PatchGAN's 4x4
# score conv (an output one smaller than its input), a dilated 3x3 to 4 maps.
IMAGE_CASES = [(7, 0, 1, 16, 3), (4, 1, 1, 16, 1), (3, 2, 2, 16, 4)]


@pytest.mark.parametrize("k,pad,dil,cin,cout", IMAGE_CASES)
def test_to_image_form_equals_xla(k, pad, dil, cin, cout):
  """Forward, input and weight gradients of the to-image form agree with lax.conv's, and
  its compiled forward holds no convolution (XLA:CPU's skinny one)."""
  x, w = _data(k, cin, cout)
  pads = ((pad, pad), (pad, pad))
  ref = lambda x, w: plain_conv(x, w, 1, pads, dil)
  ours = lambda x, w: conv2d(x, w, padding=pad, dilation=dil, form="to_image")
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
  assert "convolution(" not in jax.jit(ours).lower(x, w).compile().as_text()
  assert "convolution(" in jax.jit(ref).lower(x, w).compile().as_text()


def test_to_image_form_keeps_bfloat16():
  x, w = _data(3, 16, 3)
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  f = lambda x, w: conv2d(x, w, padding=1, form="to_image")
  assert f(x16, w16).dtype == jnp.bfloat16
  loss = lambda x, w: jnp.sum(f(x, w).astype(jnp.float32))
  gx, gw = jax.grad(loss, argnums=(0, 1))(x16, w16)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  rw = jax.grad(loss, argnums=1)(x, w)
  assert float(jnp.abs(gw.astype(jnp.float32) - rw).max()) <= 2e-2 * float(jnp.abs(rw).max())


@pytest.mark.parametrize("k,pad,dil,bias", [(1, 0, 1, False), (3, 2, 2, True)])
def test_layer_has_nn_conv_parameters_and_outputs(k, pad, dil, bias):
  x, _ = _data(k, 40, 40)
  ours = Conv(48, k, padding=pad, dilation=dil, use_bias=bias, name="c")
  theirs = nn.Conv(48, (k, k), padding=((pad, pad), (pad, pad)), kernel_dilation=(dil, dil),
                   use_bias=bias, bias_init=nn.initializers.zeros, name="c")
  key = jax.random.key(3)
  p_ours, p_theirs = ours.init(key, x), theirs.init(key, x)
  assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_theirs)
  np.testing.assert_allclose(ours.apply(p_ours, x), theirs.apply(p_theirs, x),
                             rtol=1e-5, atol=1e-5)


def test_off_cpu_the_graph_is_nn_convs(monkeypatch):
  """On GPU/TPU the layer traces to exactly the jaxpr nn.Conv traces to."""
  monkeypatch.setattr(conv_mod.jax, "default_backend", lambda: "gpu")
  x, _ = _data(3, 40, 40)
  ours = Conv(48, 3, stride=2, padding=1, use_bias=True, name="c")
  theirs = nn.Conv(48, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True,
                   name="c")
  params = theirs.init(jax.random.key(0), x)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x)))
  assert str(jax.make_jaxpr(grad(ours))(params)) == str(jax.make_jaxpr(grad(theirs))(params))


def test_summed_head_equals_four_dilated_convolutions():
  """DeepLabV2's CPU head: output, input and kernel gradients of the four-branch sum."""
  dilations = (6, 12, 18, 24)
  x, _ = _data(3, 40, 5, side=20)
  kernels = [_data(3, 40, 5, seed=s)[1] for s in range(4)]
  ref = lambda x, ks: sum(plain_conv(x, k, 1, ((d, d), (d, d)), d)
                          for k, d in zip(ks, dilations))
  ours = lambda x, ks: summed_dilated_conv(x, ks, dilations)
  np.testing.assert_allclose(ours(x, kernels), ref(x, kernels), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, ks: jnp.sum(jnp.sin(f(x, ks)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(x, kernels)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, kernels)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_parameters_alone_are_the_layers_parameters():
  x, _ = _data(3, 40, 40)
  layer = Conv(48, 3, padding=1, use_bias=True, bias_init=nn.initializers.normal(), name="c")
  alone = ConvParams(48, 3, use_bias=True, bias_init=nn.initializers.normal(), name="c")
  key = jax.random.key(5)
  jax.tree.map(np.testing.assert_array_equal, layer.init(key, x), alone.init(key, 40))


def test_block_outputs_keep_their_own_buffers():
  """The residual-chain barriers survive XLA:CPU's pipeline with `compiler_options` (and
  would be dropped without), one per block of a ResNet-18."""
  from confeti_jax.models.resnet import ResNetV1c

  model = ResNetV1c(depth=18, width=0.125)
  x = jnp.ones((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  hlo = lambda options: jax.jit(lambda v: model.apply(v, x, train=False),
                                compiler_options=options).lower(variables).compile().as_text()
  assert hlo(conv_mod.compiler_options()).count("opt-barrier") == 8
  assert hlo(None).count("opt-barrier") == 0
