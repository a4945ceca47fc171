"""CONFETI feature alignment: prototypes, CAM loss, PCL, regulariser, gates, the whole step.

The prototype update is checked against a numpy re-statement of the reference's
`Prototypes.update_prototypes` loop (docs/reference_code.md §3.3); the losses against hand
computation; the step end to end through the trainer on 8 devices, replayed on one.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import augment, losses, methods, sharding, train
from confeti_jax import prototypes as protos_lib
from confeti_jax.data import pipeline
from tests import trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import common, toy  # noqa: E402


def tiny_confeti_config(cache="", **proto):
  config = toy.get_config("method=confeti,tiny=1")
  config.data.toy.cache_dir = cache
  config.method.pixel_alignment = False
  for key, value in proto.items():
    config.method.proto[key] = value
  return config


# -- numpy re-statement of the reference ------------------------------------------------


def np_upsample_align_corners(x, out_h, out_w):
  """[B, h, w, C] -> [B, H, W, C], bilinear with align_corners=True, explicit loops."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for yy in range(out_h):
    sy = yy * (h - 1) / (out_h - 1)
    y0 = int(np.floor(sy))
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for xx in range(out_w):
      sx = xx * (w - 1) / (out_w - 1)
      x0 = int(np.floor(sx))
      x1, fx = min(x0 + 1, w - 1), sx - x0
      out[:, yy, xx] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                        + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
  return out


def np_update_prototypes(proto, count, v, labels, cam, domain_mask, top_n=32, momentum=0.999):
  """The reference loop: per class ascending, top-n by CAM, weighted mean, EMA, renormalise."""
  proto, count = proto.astype(np.float64).copy(), count.copy()
  _, out_h, out_w = labels.shape
  feats = np_upsample_align_corners(v, out_h, out_w).reshape(-1, v.shape[-1])
  weights = np_upsample_align_corners(cam, out_h, out_w).reshape(-1, cam.shape[-1])
  lab = labels.reshape(-1)
  keep = lab != 255
  if domain_mask is not None:
    keep &= domain_mask.reshape(-1)
  feats, weights, lab = feats[keep], weights[keep], lab[keep]
  for i in np.unique(lab):
    w = weights[lab == i, i]
    f = feats[lab == i]
    order = np.argsort(-w, kind="stable")[:top_n]
    w, f = w[order], f[order]
    before = count[i]
    count[i] += len(order)
    if w.sum() == 0:
      continue
    mean = (w @ f) / w.sum()
    mean /= max(np.linalg.norm(mean), 1e-12)
    if before == 0:
      proto[i] = mean
    else:
      a = min(1 - 1 / (count[i] + 1), 1 - momentum)
      proto[i] = (1 - a) * proto[i] + a * mean
  norms = np.maximum(np.linalg.norm(proto, axis=1, keepdims=True), 1e-12)
  return proto / norms, count


def test_prototype_update_matches_the_reference_loop():
  rng = np.random.default_rng(0)
  b, h, w, d, k, out = 2, 5, 6, 8, 6, (17, 21)
  state = protos_lib.Prototypes.zeros(k, d)
  ref_proto, ref_count = np.zeros((k, d)), np.zeros(k)
  for round_ in range(3):
    v = rng.normal(size=(b, h, w, d)).astype(np.float32)
    # Distinct CAM values (no argsort ties); class 4's CAM is 0 in round 0: its count
    # grows without an update, so it later starts from the zero vector.
    cam = rng.permutation(b * h * w * k).reshape(b, h, w, k).astype(np.float32) / 100.0
    if round_ == 0:
      cam[..., 4] = 0.0
    labels = rng.integers(0, k - 1, size=(b, *out)).astype(np.int32)  # class 5 never seen
    labels[0, :3] = 255
    mask = rng.random((b, *out)) < 0.6 if round_ < 2 else None
    ref_proto, ref_count = np_update_prototypes(ref_proto, ref_count, v, labels, cam, mask)
    cam_up = augment.resize_bilinear(jnp.asarray(cam), out, align_corners=True)
    eligible = jnp.asarray(mask) if mask is not None else jnp.ones(labels.shape, bool)
    means, n_sel, w_sum = protos_lib.cam_weighted_class_means(
        jnp.asarray(v), jnp.asarray(labels), cam_up, eligible, num_classes=k, top_n=32)
    state = protos_lib.update_prototypes(state, means, n_sel, w_sum, momentum=0.999)
    np.testing.assert_allclose(np.asarray(state.protos), ref_proto, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.counts), ref_count)
  assert np.all(np.asarray(state.protos[5]) == 0) and ref_count[5] == 0
  assert 0.99 < np.linalg.norm(np.asarray(state.protos[4])) < 1.01


def test_uniform_weights_take_the_first_pixels_in_raster_order():
  """Warm-up ties: the first n pixels of the class in (b, y, x) order, as a stable sort."""
  labels = np.zeros((2, 4, 4), np.int32)
  v = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  means, n_sel, w_sum = protos_lib.cam_weighted_class_means(
      jnp.asarray(v), jnp.asarray(labels), jnp.ones((2, 4, 4, 1)), jnp.ones((2, 4, 4), bool),
      num_classes=1, top_n=5)
  expected = v.reshape(-1, 3)[:5].mean(0)
  np.testing.assert_allclose(np.asarray(means[0]), expected / np.linalg.norm(expected),
                             rtol=1e-6)
  assert float(n_sel[0]) == 5 and float(w_sum[0]) == 5


def _mean_row_of_selected(tie_key, weights=None):
  """Mean row y of the 32 pixels selected for one class covering a 2x16x16 image."""
  rows = np.broadcast_to(np.arange(16, dtype=np.float32)[None, :, None], (2, 16, 16))
  v = np.stack([rows, np.ones_like(rows)], -1)                 # features (y, 1)
  weights = jnp.ones((2, 16, 16, 1)) if weights is None else weights
  means, n_sel, _ = protos_lib.cam_weighted_class_means(
      jnp.asarray(v), jnp.zeros((2, 16, 16), jnp.int32), weights, jnp.ones((2, 16, 16), bool),
      num_classes=1, top_n=32, tie_key=tie_key)
  assert float(n_sel[0]) == 32
  return float(means[0, 0] / means[0, 1]), np.asarray(means)


def test_tied_weights_take_a_keyed_random_subset_not_the_top_rows():
  """Warm-up (every weight 1): raster order would take rows 0-1 (mean row 0.5) of a class
  filling rows 0-15; a keyed random order spreads the 32 pixels over the class (mean row
  7.5 in expectation), reproducibly per key. Without ties the key changes nothing."""
  raster, _ = _mean_row_of_selected(None)
  assert raster == pytest.approx(0.5)
  draws = [_mean_row_of_selected(jax.random.key(i))[0] for i in range(40)]
  assert abs(np.mean(draws) - 7.5) < 0.6 and min(draws) > 2.0 and np.std(draws) > 0.3
  assert _mean_row_of_selected(jax.random.key(3))[0] == draws[3]
  rng = np.random.default_rng(0)
  distinct = jnp.asarray(rng.permutation(512).reshape(2, 16, 16, 1).astype(np.float32))
  np.testing.assert_allclose(_mean_row_of_selected(jax.random.key(5), distinct)[1],
                             _mean_row_of_selected(None, distinct)[1], rtol=1e-6)


def test_mean_weighting_equals_the_mean_of_the_upsampled_features():
  """'w/o CAM' prototypes: the plain mean of every eligible class pixel's upsampled
  feature (numpy: the full upsampling, then a masked mean), L2-normalised."""
  rng = np.random.default_rng(2)
  b, h, w, d, k, out = 2, 4, 5, 3, 4, (9, 13)
  v = rng.normal(size=(b, h, w, d)).astype(np.float32)
  labels = rng.integers(0, k - 1, size=(b, *out)).astype(np.int32)   # class 3 never seen
  labels[1, :2] = 255
  eligible = rng.random((b, *out)) < 0.7
  means, counts, sums = protos_lib.class_means_all_pixels(
      jnp.asarray(v), jnp.asarray(labels), jnp.asarray(eligible), num_classes=k)
  feats = np_upsample_align_corners(v, *out)
  for c in range(k):
    sel = (labels == c) & eligible
    assert float(counts[c]) == sel.sum() == float(sums[c])
    if sel.sum() == 0:
      assert np.all(np.asarray(means[c]) == 0)
      continue
    mean = feats[sel].mean(0)
    np.testing.assert_allclose(np.asarray(means[c]), mean / np.linalg.norm(mean),
                               rtol=1e-5, atol=1e-6)


def test_gathered_upsampled_features_equal_the_full_upsampling():
  rng = np.random.default_rng(1)
  v = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  index = jnp.asarray(rng.integers(0, 2 * 13 * 9, size=(7, 4)))
  full = np.asarray(augment.resize_bilinear(jnp.asarray(v), (13, 9), align_corners=True))
  got = protos_lib.gather_upsampled(jnp.asarray(v), index, (13, 9))
  np.testing.assert_allclose(np.asarray(got), full.reshape(-1, 3)[np.asarray(index)],
                             rtol=1e-5, atol=1e-6)


# -- losses -----------------------------------------------------------------------------


def test_cam_bce_against_hand_computation():
  scores = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
  labels = np.array([[[0, 0], [255, 2]], [[1, 1], [1, 255]]], np.int32)
  target = np.array([[1, 0, 1], [0, 1, 0]], np.float64)
  p = 1 / (1 + np.exp(-scores.astype(np.float64)))
  expected = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
  got = losses.cam_bce(jnp.asarray(scores), jnp.asarray(labels), 3)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_pixel_sampling_is_a_uniform_subset_of_valid_pixels():
  valid = jnp.asarray(np.arange(100) % 3 != 0)
  index, keep = losses.sample_pixels(jax.random.key(0), valid, 20)
  index, keep = np.asarray(index), np.asarray(keep)
  assert keep.all() and len(set(index)) == 20 and np.asarray(valid)[index].all()
  index, keep = losses.sample_pixels(jax.random.key(0), valid, 1000)  # more than valid
  index, keep = np.asarray(index), np.asarray(keep)
  assert len(index) == 100 and keep.sum() == 66
  assert set(index[keep]) == set(np.flatnonzero(np.asarray(valid)))
  counts = np.zeros(100)  # every valid pixel drawn about equally often
  for s in range(200):
    i, _ = losses.sample_pixels(jax.random.key(s), valid, 20)
    counts[np.asarray(i)] += 1
  assert counts[np.asarray(valid)].min() > 25 and counts[~np.asarray(valid)].sum() == 0


def test_prototype_contrast_and_regulariser_against_hand_computation():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3, 4)).astype(np.int32)
  labels[1, 0] = 255
  protos = rng.normal(size=(4, 5)).astype(np.float32)
  protos /= np.linalg.norm(protos, axis=1, keepdims=True)
  v = feats.reshape(-1, 5) / np.linalg.norm(feats.reshape(-1, 5), axis=1, keepdims=True)
  y = labels.reshape(-1)
  valid = y != 255
  logits = v @ protos.T / 0.1
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected_pcl = -np.mean(log_p[valid, y[valid]])
  got = losses.prototype_contrast(jax.random.key(3), jnp.asarray(feats), jnp.asarray(labels),
                                  jnp.asarray(protos), temperature=0.1, num_samples=4096)
  np.testing.assert_allclose(float(got), expected_pcl, rtol=1e-5)

  mean = v[valid].mean(0)
  z = mean @ protos.T / 0.1
  s = np.sum(z - np.log(np.exp(z).sum())) / (4 * math.log(4))
  for variant, expected in (("code", s), ("diversity", -s)):
    got = losses.prototype_regularizer(jnp.asarray(feats), jnp.asarray(labels),
                                       jnp.asarray(protos), temperature=0.1, variant=variant)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # At a uniform mean prediction the code's term is at its maximum -1, the paper's at +1.
  flat = np.zeros((1, 1, 1, 5), np.float32)
  for variant, expected in (("code", -1.0), ("diversity", 1.0)):
    got = losses.prototype_regularizer(jnp.asarray(flat), jnp.zeros((1, 1, 1), jnp.int32),
                                       jnp.asarray(protos), temperature=0.1, variant=variant)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_prototypes_carry_no_gradient():
  rng = np.random.default_rng(4)
  feats = jnp.asarray(rng.normal(size=(1, 3, 3, 4)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 3, size=(1, 3, 3)).astype(np.int32))
  protos = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  for fn in (lambda p: losses.prototype_contrast(jax.random.key(0), feats, labels, p,
                                                 temperature=0.1, num_samples=8),
             lambda p: losses.prototype_regularizer(feats, labels, p, temperature=0.1)):
    assert np.all(np.asarray(jax.grad(fn)(protos)) == 0)
  grad_feats = jax.grad(lambda f: losses.prototype_contrast(
      jax.random.key(0), f, labels, protos, temperature=0.1, num_samples=8))(feats)
  assert np.any(np.asarray(grad_feats) != 0)


# -- gates and wiring --------------------------------------------------------------------


def test_reference_gates_at_the_warm_up_boundaries():
  config = toy.get_config("method=confeti,tiny=1")
  config.method.pixel_alignment = False
  config.method.proto.cam_mix_after = common.method_config("confeti").proto.cam_mix_after
  config.method.proto.pcl_after = common.method_config("confeti").proto.pcl_after
  method = methods.build(config)
  expected = {  # cam_mix, pcl_source, pcl_mixed, pcl_target / cam_weights / all_pixels
      1999: (False, False, False, False), 2000: (False, False, False, False),
      2001: (True, False, False, False), 2999: (True, False, False, False),
      3000: (True, False, True, False), 3001: (True, True, True, True)}
  for step, (cam_mix, src, mix, after) in expected.items():
    g = {k: bool(v) for k, v in method.gates(step).items()}
    assert (g["cam_mix"], g["pcl_source"], g["pcl_mixed"]) == (cam_mix, src, mix), step
    assert g["pcl_target"] == g["cam_weights"] == g["all_pixels"] == after, step


def test_config_switches_are_validated_and_model_b_has_no_target_pcl():
  method = methods.build(tiny_confeti_config())
  assert not method.trains_target_pcl  # the reference gates it on the generator training
  assert methods.build(tiny_confeti_config(target_pcl="always")).trains_target_pcl
  for key, bad in (("source", "target"), ("weighting", "max"), ("reg_variant", "prodA")):
    with pytest.raises(ValueError, match=key):
      methods.build(tiny_confeti_config(**{key: bad}))


# -- the step ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """3 steps of the tiny toy through the trainer (8 devices) with every term switched on.

  Gates at 0/1 (CAM mixed from step 1; PCL mixed from step 1, source and target from
  step 2) and the target term forced on, so the three steps cross each gate.
  """
  cache = str(tmp_path_factory.mktemp("toy_cache"))
  workdir = str(tmp_path_factory.mktemp("confeti_run"))
  config = tiny_confeti_config(cache, cam_mix_after=0, pcl_after=1, target_pcl="always")
  init, state = trained.train_keeping_init(config, workdir)
  return config, workdir, init, state


def test_end_to_end_gates_and_terms(e2e):
  config, workdir, init, state = e2e
  assert int(state.step) == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  parts = [k for k in rows[0] if k.startswith("loss_")]
  for r in rows:
    np.testing.assert_allclose(r["loss"], sum(r[k] for k in parts), rtol=1e-5, atol=1e-6)
  on = lambda key: [r[key] != 0 for r in rows]
  assert on("loss_src_cam") == [True] * 3
  assert on("loss_mix_cam") == [False, True, True]
  assert on("loss_mix_pcl") == [False, True, True]
  assert on("loss_src_pcl") == [False, False, True]
  assert on("loss_src_reg") == [False, False, True]
  assert rows[-1]["protos_initialised"] > 0
  assert "conv_cam" in state.seg.params and "conv_proj" in state.teacher["params"]
  assert np.all(np.asarray(init.protos.protos) == 0)
  # Unit rows, or zero rows for classes never seen / whose selected CAM weights were
  # all 0 so far (the reference then counts the pixels but skips the update).
  norms = np.linalg.norm(np.asarray(state.protos.protos), axis=1)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)) and np.sum(norms > 0.5) > 3
  assert np.all(norms[np.asarray(state.protos.counts) == 0] == 0)
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    assert json.load(f)["model"].startswith("confeti/")


@pytest.fixture(scope="module")
def single_device(e2e):
  """The e2e run's step compiled for one device, with a fresh pair of data iterators."""
  config, _, init, _ = e2e
  mesh = sharding.make_mesh(1)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), init)
  step = train.make_train_step(methods.build(config), config, mesh, shardings)

  def run(state, steps):
    src_iter, tgt_iter = pipeline.make_train_iterators(config)
    state = jax.device_put(state, shardings)
    for _ in range(steps):
      batch = {"source": next(src_iter), "target": next(tgt_iter)}
      state, scalars = step(state, sharding.to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(scalars)

  return run


def test_single_device_replay_equals_sharded_run(e2e, single_device):
  _, _, init, sharded = e2e
  single, _ = single_device(init, 3)
  # Adam-moved weights agree to a fraction of the lr (1e-3), as in test_dacs.py; the
  # statistics and prototypes are not Adam-moved.
  weights = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  for pick in (lambda s: s.seg.params, lambda s: s.teacher):
    jax.tree.map(weights, pick(single), pick(sharded))
  for pick in (lambda s: s.batch_stats, lambda s: s.protos.protos):
    jax.tree.map(close, pick(single), pick(sharded))
  np.testing.assert_array_equal(single.protos.counts, sharded.protos.counts)


def _kill_last_layer4_block(params):
  """A very negative bias on layer4's last BN: every layer4 feature is ReLU'd to 0."""
  last = max(k for k in params["backbone"] if k.startswith("layer4_"))
  block = params["backbone"][last]
  bn = max(k for k in block if k.startswith("bn"))
  block[bn] = {**block[bn], "bias": block[bn]["bias"] - 1e4}
  return params


def test_zero_layer4_features_keep_the_joint_step_finite(e2e, single_device):
  """Issue 21's divergence on demand: all-zero post-ReLU layer4 features give exactly
  zero `conv_proj` rows, which L_Reg / L_PCL normalise. With `jnp.linalg.norm` the
  first update turned every weight NaN (0 * NaN); the torch-equal norm keeps the step
  finite, as the reference's `F.normalize` does."""
  _, _, init, _ = e2e
  seg = init.seg.replace(params=_kill_last_layer4_block(jax.tree.map(np.array, init.seg.params)))
  teacher = jax.tree.map(np.array, init.teacher)
  teacher["params"] = _kill_last_layer4_block(teacher["params"])
  state, scalars = single_device(init.replace(seg=seg, teacher=teacher), 3)
  assert scalars["loss_src_reg"] != 0 and np.isfinite(scalars["loss"])
  for name, tree in (("student", state.seg.params), ("teacher", state.teacher),
                     ("prototypes", state.protos.protos)):
    leaves = jax.tree.leaves(tree)
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves), name


def test_semantic_consistency_variants_against_hand_computation():
  rng = np.random.default_rng(5)
  stylised = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  original = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  protos = rng.normal(size=(5, 4)).astype(np.float32)
  phi = {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
         "bias": rng.normal(size=(4,)).astype(np.float32)}
  mapped = stylised @ phi["kernel"] + phi["bias"]
  expected = {"prototype": np.mean((mapped @ protos.T - original @ protos.T) ** 2),
              "mse": np.mean((mapped - original) ** 2)}
  for variant, value in expected.items():
    got = losses.semantic_consistency(variant, jnp.asarray(stylised), jnp.asarray(original),
                                      jnp.asarray(protos), jax.tree.map(jnp.asarray, phi))
    np.testing.assert_allclose(float(got), value, rtol=1e-5)
  # 'ce': the stylised logits against the original's argmax (mean over all pixels).
  target = original.argmax(-1)
  log_p = stylised - np.log(np.exp(stylised).sum(-1, keepdims=True))
  expected_ce = -np.mean(np.take_along_axis(log_p, target[..., None], -1))
  got = losses.semantic_consistency("ce", jnp.asarray(stylised), jnp.asarray(original))
  np.testing.assert_allclose(float(got), expected_ce, rtol=1e-5)
  with pytest.raises(ValueError, match="variant"):
    losses.semantic_consistency("kl", jnp.asarray(stylised), jnp.asarray(original))
