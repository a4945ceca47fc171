"""Non-finite diagnosis: torch-equal normalisation at zero rows, per-term flags, messages."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import finite, losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _rows_with_zero(seed=0, n=6, d=5):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  x[2] = 0.0  # e.g. a pixel feature zeroed by a ReLU, or a class never seen
  return x


def test_l2_normalize_matches_torch_forward_and_gradient_at_a_zero_row():
  x = _rows_with_zero()
  w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(losses.l2_normalize(v) * w))(jnp.asarray(x))
  t = torch.tensor(x, requires_grad=True)
  (F.normalize(t, dim=-1) * torch.tensor(w)).sum().backward()
  np.testing.assert_allclose(losses.l2_normalize(jnp.asarray(x)),
                             F.normalize(torch.tensor(x), dim=-1).numpy(), atol=1e-6)
  assert np.all(np.isfinite(grad))
  # torch's gradient of the zero row is the incoming one / eps: finite, 1e12-sized.
  np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-5)
  # What the earlier form (x / max(jnp.linalg.norm(x), eps)) gave: NaN in that row.
  old = jax.grad(lambda v: jnp.sum(
      v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12) * w))(jnp.asarray(x))
  assert np.isnan(np.asarray(old)[2]).all()


def _torch_regularizer(f, valid, protos, tau):
  v = F.normalize(f, dim=-1)
  mean = (v * valid[:, None]).sum(0) / valid.sum()
  logits = mean @ protos.T / tau
  k = protos.shape[0]
  return torch.log_softmax(logits, dim=-1).sum() / (k * np.log(k))


@pytest.mark.parametrize("zero_is_valid", [False, True])
def test_regulariser_gradient_with_a_zero_feature_row_is_finite_and_torch_equal(zero_is_valid):
  """CONFETI's L_Reg normalises every pixel's feature, masked ones included: one zero
  row (valid or not) made the whole JAX gradient NaN; torch's stays finite."""
  x = _rows_with_zero(3)
  labels = np.array([0, 1, 1 if zero_is_valid else 255, 2, 255, 0])
  protos = np.asarray(losses.l2_normalize(
      jnp.asarray(np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32))))
  fn = lambda v: losses.prototype_regularizer(
      v[None, :, None], jnp.asarray(labels)[None, :, None], jnp.asarray(protos),
      temperature=0.1)
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
  t = torch.tensor(x, requires_grad=True)
  valid = torch.tensor((labels != 255).astype(np.float32))
  ref = _torch_regularizer(t, valid, torch.tensor(protos), 0.1)
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-6)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-4, atol=1e-3)


def _state(**trees):
  fields = dict(seg=types.SimpleNamespace(params={"w": jnp.ones(3)}), batch_stats={},
                teacher=None, gen=None, disc=None, patch_mlp=None, protos=None, banks=None)
  fields.update(trees)
  return types.SimpleNamespace(**fields)


def test_step_flags_mark_loss_terms_and_state_trees():
  state = _state(protos={"p": jnp.array([1.0, jnp.nan])},
                 gen=types.SimpleNamespace(params={"k": jnp.ones(2)}))
  flags = finite.step_flags(state, {"loss_a": jnp.float32(1.0), "loss_b": jnp.float32(jnp.inf)})
  flags = {k: float(v) for k, v in flags.items()}
  assert flags == {"nonfinite/loss_a": 0.0, "nonfinite/loss_b": 1.0,
                   "nonfinite/state:student": 0.0,
                   "nonfinite/state:student BatchNorm statistics": 0.0,
                   "nonfinite/state:G (CUT generator)": 0.0,
                   "nonfinite/state:prototypes": 1.0}


def test_describe_names_the_term_flagged_longest():
  # Window of 10 steps up to 460: loss_reg bad for 4 steps, the rest for 3.
  scalars = {"loss": 1.0, "nonfinite/loss_reg": 0.4, "nonfinite/loss_sc": 0.3,
             "nonfinite/state:student": 0.3}
  plain, flags = finite.split(scalars)
  assert plain == {"loss": 1.0}
  text = finite.describe(flags, step=460, window=10)
  assert "step: 457" in text and "loss_reg" in text and "loss_sc" not in text
  assert finite.first_terms(flags) == ["loss_reg"]


def test_describe_calls_a_state_tree_alone_a_gradient():
  flags = {"loss": 0.5, "state:student": 1.0, "grad_norm": 0.5}
  text = finite.describe(flags, step=20, window=2)
  assert "step: 19" in text and "non-finite gradient" in text and "student" in text


def test_dead_relu_pixel_through_the_bias_free_projection_keeps_weight_gradients_finite():
  """The mechanism of the partial-class divergence: a pixel whose layer4 features are
  all ReLU'd to 0 gives, through CONFETI's bias-free 1x1 `conv_proj`, an exactly zero
  projection row. Its weight gradient is features^T . d(row) = 0 * (gradient at the
  zero row): 0 in torch, 0 * NaN = NaN with jnp.linalg.norm, and the update then turns
  every weight NaN at once. Checked on L_Reg + L_PCL against torch."""
  rng = np.random.default_rng(5)
  pre = rng.normal(size=(8, 6)).astype(np.float32)
  pre[3] = -np.abs(pre[3])  # a dead pixel: every channel below 0
  w = rng.normal(size=(6, 4)).astype(np.float32)
  protos = np.asarray(losses.l2_normalize(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)))
  labels = np.array([0, 1, 2, 1, 0, 255, 2, 1])

  def jax_loss(w_):
    proj = jax.nn.relu(jnp.asarray(pre)) @ w_
    lab = jnp.asarray(labels)[None, :, None]
    reg = losses.prototype_regularizer(proj[None, :, None], lab, jnp.asarray(protos),
                                       temperature=0.1)
    pcl = losses.prototype_contrast(jax.random.key(0), proj[None, :, None], lab,
                                    jnp.asarray(protos), temperature=0.1, num_samples=100)
    return reg + pcl

  grad = jax.grad(jax_loss)(jnp.asarray(w))
  tw = torch.tensor(w, requires_grad=True)
  proj = torch.relu(torch.tensor(pre)) @ tw
  valid = torch.tensor((labels != 255).astype(np.float32))
  reg = _torch_regularizer(proj, valid, torch.tensor(protos), 0.1)
  v = F.normalize(proj[labels != 255], dim=-1)  # all valid pixels sampled (7 < 100)
  pcl = F.cross_entropy(v @ torch.tensor(protos).T / 0.1, torch.tensor(labels[labels != 255]))
  (reg + pcl).backward()
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, tw.grad.numpy(), rtol=1e-4, atol=1e-5)
