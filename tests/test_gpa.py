"""GPA (global photometric alignment) against a numpy statement of its formula, and in
CONFETI's step as `method.style=gpa`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import gpa


def np_rgb_to_lab(rgb):
  """scikit-image's rgb2lab (D65, 2 deg) written out in float64; rgb in [0, 1]."""
  lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = lin @ np.array(gpa.RGB_TO_XYZ).T / np.array(gpa.WHITE_D65)
  f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], -1)


def np_match(source, template):
  """scikit-image's `_match_cumulative_cdf`: unique values, CDFs, np.interp."""
  values, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
  t_values, t_counts = np.unique(template, return_counts=True)
  mapped = np.interp(np.cumsum(counts) / source.size, np.cumsum(t_counts) / template.size,
                     t_values)
  return mapped[inverse]


def np_gamma(source_l, target_l):
  """The gamma solving mean((L_s/100)^g) = mean(L_t/100), by a dense scan then refined."""
  s, goal = np.clip(source_l / 100, 0, 1), np.mean(np.clip(target_l / 100, 0, 1))
  grid = np.exp(np.linspace(np.log(0.1), np.log(10), 20001))
  err = np.abs(np.array([np.mean(s ** g) for g in grid]) - goal)
  return grid[np.argmin(err)]


def test_lab_matches_known_values_and_round_trips():
  rgb = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.7]])
  lab = np.asarray(gpa.rgb_to_lab(jnp.asarray(rgb)))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.02)
  np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)   # sRGB red
  np.testing.assert_allclose(lab, np_rgb_to_lab(rgb), atol=1e-3)
  rng = np.random.default_rng(0)
  colours = rng.random((500, 3))
  back = np.asarray(gpa.lab_to_rgb(gpa.rgb_to_lab(jnp.asarray(colours))))
  np.testing.assert_allclose(back, colours, atol=2e-4)


def test_histogram_matching_follows_scikit_image_rule_with_ties():
  rng = np.random.default_rng(1)
  source = rng.integers(0, 12, 300).astype(np.float32)       # many ties, as flat regions
  template = (rng.normal(size=200) * 5 + 20).astype(np.float32)
  template[:50] = 3.0
  got = np.asarray(gpa.match_histogram(jnp.asarray(source), jnp.asarray(template)))
  np.testing.assert_allclose(got, np_match(source, template), rtol=1e-5, atol=1e-4)


def test_gpa_matches_the_numpy_statement():
  rng = np.random.default_rng(2)
  src = rng.integers(0, 256, (2, 12, 10, 3)).astype(np.float32)
  tgt = np.clip(rng.normal(90, 30, (2, 12, 10, 3)), 0, 255).astype(np.float32)
  got = np.asarray(gpa.gpa_source_to_target(jnp.asarray(src), jnp.asarray(tgt)))
  for i in range(2):
    lab_s = np_rgb_to_lab(src[i] / 255).reshape(-1, 3)
    lab_t = np_rgb_to_lab(tgt[i] / 255).reshape(-1, 3)
    gamma = np_gamma(lab_s[:, 0], lab_t[:, 0])
    assert float(gpa.lightness_gamma(jnp.asarray(lab_s[:, 0]), jnp.asarray(lab_t[:, 0]))) \
        == pytest.approx(gamma, rel=1e-3)
    aligned = np.stack([100 * np.clip(lab_s[:, 0] / 100, 0, 1) ** gamma,
                        np_match(lab_s[:, 1], lab_t[:, 1]), np_match(lab_s[:, 2], lab_t[:, 2])],
                       -1)
    want = np.asarray(gpa.lab_to_rgb(jnp.asarray(aligned))).reshape(src[i].shape) * 255
    np.testing.assert_allclose(got[i], want, atol=0.5)
    # The aligned image's a/b histograms are the target's, its mean lightness too.
    lab_out = np_rgb_to_lab(got[i] / 255).reshape(-1, 3)
    assert abs(lab_out[:, 0].mean() - lab_t[:, 0].mean()) < 1.5
  assert got.min() >= 0 and got.max() <= 255


def test_gpa_style_runs_in_the_confeti_step():
  """`method.style=gpa` with PCL and no generator: one finite step, no CUT state."""
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from confeti_jax import methods
  from configs import toy

  config = toy.get_config("method=confeti,tiny=1")
  config.method.style = "gpa"
  config.method.stage = 1
  config.method.stages = "1"
  method = methods.build(config)
  assert method.cut is None and not method.trains_generator
  state = jax.jit(method.init_state)(jax.random.key(0))
  rng = np.random.default_rng(0)
  b, (h, w) = config.train.batch_size, config.data.crop_size
  batch = {d: {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8),
               "label": jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.uint8)}
           for d in ("source", "target")}
  new_state, metrics = jax.jit(method.train_step)(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
