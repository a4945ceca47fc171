"""CFContra: memory banks, pseudo-labels, the four-term loss and the step, against numpy
re-statements of the official code's algorithm (NCHW loops as the code writes them).

The re-statements follow `get_pseudo_labels`, `calculate_average`,
`calculate_src_center`, `HybridMemory.forward` and `HM.backward` of
shiyutang/Coarse-to-fine-UDA (docs/peers.md §5), written independently in numpy.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import best_snapshot, losses, methods, train
from confeti_jax import prototypes as protos
from confeti_jax import state as state_lib
from confeti_jax.methods import cfcontra
from confeti_jax.models import heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402

K = 19


# -- numpy re-statements of the official code -------------------------------------------
def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_pseudo_labels(feat, centres, threshold):
  """get_pseudo_labels: feat [B, D, h, w], centres [K, D] -> [B, h, w] (255 = ignored)."""
  b, _, h, w = feat.shape
  dist = np.zeros((b, len(centres), h, w), np.float64)
  for n in range(b):
    for t in range(len(centres)):
      dist[n, t] = np.linalg.norm(feat[n] - centres[t][:, None, None], axis=0)
  dmin = dist.min(axis=1, keepdims=True)
  idx = dist.argmin(axis=1)
  second = dist.copy()
  second[second == dmin] = 1000
  dsec = second.min(axis=1)
  idx[np.abs(dmin[:, 0] - dsec) < threshold] = 255
  return idx


def np_one_hot20(label, k):
  """process_label: [B, h, w] -> [B, k + 1, h, w], labels >= k in the last channel."""
  trunk = np.where(label < k, label, k)
  return np.stack([(trunk == c) for c in range(k + 1)], axis=1).astype(np.float64)


def np_calculate_average(feat, label, k):
  """calculate_average: per image and class avgpool(f * m) / (avgpool(m) + 1e-6), mean
  over the batch, F.normalize."""
  onehot = np_one_hot20(label, k)
  scale = onehot.mean(axis=(2, 3))
  centres = []
  for c in range(k):
    per_image = [(feat[i] * onehot[i, c]).mean(axis=(1, 2)) / (scale[i, c] + 1e-6)
                 for i in range(feat.shape[0])]
    centres.append(np.mean(per_image, axis=0))
  return np_normalize(np.stack(centres))


def np_warmup_source_centres(batches, k):
  """calculate_src_center over (feat, label, pred) batches: per image and class, the mean
  of pixels labelled and predicted c; entries averaged per class, F.normalize. Returns
  {class: centre} for the classes seen (the code asserts that all K are)."""
  entries = {}
  for feat, label, pred in batches:
    correct = np_one_hot20(label, k) * np_one_hot20(pred, k)
    scale = correct.mean(axis=(2, 3))
    for n in range(feat.shape[0]):
      for t in range(k):
        if scale[n, t] == 0:
          continue
        entries.setdefault(t, []).append(
            (feat[n] * correct[n, t]).mean(axis=(1, 2)) / (scale[n, t] + 1e-6))
  return {t: np_normalize(np.mean(v, axis=0)) for t, v in entries.items()}


def np_hm_backward(bank, centres, momentum):
  """HM.backward's loop over index = arange(K)."""
  bank = bank.copy()
  for idx, feat in enumerate(centres):
    bank[idx] = momentum * bank[idx] + (1.0 - momentum) * feat
    norm = np.linalg.norm(bank[idx])
    bank[idx] /= norm if norm != 0 else 1
  return bank


def np_hybrid_memory_loss(inputs, labels, bank, temp):
  """HybridMemory.forward with labels = arange(K): masked softmax (global mean shift,
  eps 1e-6), then nll_loss(log(p + 1e-6)) ignoring -1."""
  z = np_normalize(inputs)
  logits = z @ bank.T / temp
  exps = np.exp(logits - logits.mean())
  p = exps / (exps.sum(axis=1, keepdims=True) + 1e-6)
  valid = labels != -1
  return -np.mean(np.log(p[valid, labels[valid]] + 1e-6))


def _nhwc(x):
  return np.ascontiguousarray(np.moveaxis(x, 1, -1))


# -- pseudo-labels, centres, updates, loss ------------------------------------------------
def test_pseudo_labels_match_the_code_with_margin_and_ties():
  rng = np.random.default_rng(0)
  centres = np_normalize(rng.normal(size=(5, 8)))
  feat = rng.normal(scale=0.3, size=(2, 8, 6, 7))
  expected = np_pseudo_labels(feat, centres, 0.05)
  got = np.asarray(protos.nearest_centre_labels(jnp.asarray(_nhwc(feat), jnp.float32),
                                                jnp.asarray(centres, jnp.float32), 0.05))
  assert ((expected == 255).any() and (expected != 255).any())  # the margin bites
  np.testing.assert_array_equal(got, expected)
  # A feature equidistant to two centres is a tie: the code replaces both minima by 1000,
  # so the gap is huge and the first of them is kept; a near-tie within t is ignored.
  c = np.eye(3, 4, dtype=np.float32)
  f = np.array([[[[1.0, 1.0, 0.0, 0.0], [1.0, 0.98, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]]],
               np.float32)
  got = np.asarray(protos.nearest_centre_labels(jnp.asarray(f), jnp.asarray(c), 0.05))
  np.testing.assert_array_equal(got, [[[0, 255, 0]]])
  np.testing.assert_array_equal(np_pseudo_labels(np.moveaxis(f, -1, 1), c, 0.05), got)


def test_batch_centres_match_calculate_average():
  rng = np.random.default_rng(1)
  feat = rng.normal(size=(2, 6, 5, 4))
  label = rng.integers(0, 7, size=(2, 5, 4))
  label[0, 0] = 255
  got = protos.batch_centres(jnp.asarray(_nhwc(feat), jnp.float32), jnp.asarray(label), K)
  expected = np_calculate_average(feat, label, K)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[7:] == 0)  # absent classes: zero rows


def test_momentum_update_matches_hm_backward():
  rng = np.random.default_rng(2)
  bank = np_normalize(rng.normal(size=(K, 6)))
  centres = np_normalize(rng.normal(size=(K, 6)))
  centres[3] = 0  # absent class: the centre keeps its direction
  got = protos.momentum_update(jnp.asarray(bank, jnp.float32), jnp.asarray(centres,
                                                                            jnp.float32), 0.9)
  expected = np_hm_backward(bank, centres, 0.9)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got)[3], bank[3], rtol=1e-5)


def test_memory_bank_nce_matches_hybrid_memory():
  rng = np.random.default_rng(3)
  inputs = rng.normal(size=(40, 6)) * 3.0
  bank = np_normalize(rng.normal(size=(K, 6)))
  labels = rng.integers(0, K, size=40)
  labels[::5] = 255
  got = losses.memory_bank_nce(jnp.asarray(inputs, jnp.float32), jnp.asarray(labels),
                               jnp.asarray(bank, jnp.float32), temperature=0.07)
  expected = np_hybrid_memory_loss(inputs, np.where(labels == 255, -1, labels), bank, 0.07)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  none = losses.memory_bank_nce(jnp.asarray(inputs, jnp.float32), jnp.full((40,), 255),
                                jnp.asarray(bank, jnp.float32), temperature=0.07)
  assert float(none) == 0.0


def test_warmup_accumulation_matches_calculate_src_center():
  rng = np.random.default_rng(4)
  batches = []
  for _ in range(2):
    feat = rng.normal(size=(2, 5, 4, 4))
    label = rng.integers(0, K, size=(2, 4, 4))
    pred = np.where(rng.random((2, 4, 4)) < 0.6, label, rng.integers(0, K, size=(2, 4, 4)))
    batches.append((feat, label, pred))
  total, count = jnp.zeros((K, 5)), jnp.zeros((K,))
  for feat, label, pred in batches:
    correct = protos.correctly_predicted(jnp.asarray(label), jnp.asarray(pred))
    total, count = protos.accumulate(total, count, jnp.asarray(_nhwc(feat), jnp.float32),
                                     correct, K)
  got = np.asarray(protos.finalize(total, count))
  expected = np_warmup_source_centres(batches, K)
  assert 3 < len(expected) < K  # some classes seen, some never correctly predicted
  for c in range(K):
    np.testing.assert_allclose(got[c], expected.get(c, np.zeros(5)), rtol=1e-5, atol=1e-6)


def test_pseudo_label_stats():
  pseudo = jnp.asarray([0, 1, 255, 2, 3, 255])
  truth = jnp.asarray([0, 2, 1, 2, 255, 255])
  acc, coverage, acc_code = protos.pseudo_label_stats(pseudo, truth)
  np.testing.assert_allclose([float(acc), float(coverage), float(acc_code)],
                             [2 / 3, 3 / 4, 2 / 4])


def test_squashed_resize_fills_the_frame_as_the_code_does():
  """data.source.keep_ratio=False: GTA5 frames go to exactly 1280x640 (no crop left to
  take), as the code's fixed-size PIL resize; the default keeps the 16:9 aspect."""
  from PIL import Image

  from confeti_jax.data import pipeline
  assert pipeline.squash_size(1052, 1914, (1280, 640)) == (640, 1280)
  assert pipeline.squash_size(1914, 1052, (1280, 640)) == (1280, 640)  # portrait
  assert pipeline.keep_ratio_size(1052, 1914, (1280, 640)) == (640, 1164)
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, size=(53, 96, 3), dtype=np.uint8)  # GTA5's aspect
  label = rng.integers(0, 19, size=(53, 96), dtype=np.uint8)
  sample = {"image": image, "label": label}
  squash = pipeline.TrainTransform((64, 32), (32, 64), 1.0, 0.0, keep_ratio=False)
  out = squash.random_map(sample, np.random.default_rng(0))
  np.testing.assert_array_equal(
      out["image"], np.asarray(Image.fromarray(image).resize((64, 32), Image.BILINEAR)))
  np.testing.assert_array_equal(
      out["label"], np.asarray(Image.fromarray(label).resize((64, 32), Image.NEAREST)))
  kept = pipeline.TrainTransform((64, 32), (32, 64), 1.0, 0.0).random_map(
      sample, np.random.default_rng(0))
  assert (kept["label"][:, -6:] == 255).all()  # 32x58 padded: the aspect was kept


# -- heads ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,names", [
    ("none", set()), ("linear", {"fc1"}), ("moco", {"fc1", "fc2"}),
    ("byol", {"fc1", "bn1", "fc2"}), ("simclr", {"fc1", "bn1", "fc2", "bn2"})])
def test_projection_heads_follow_table_1(kind, names):
  head = heads.ProjectionHead(kind=kind, features=5)
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  variables = head.init(jax.random.key(1), x, train=False)
  assert set(variables.get("params", {})) == names
  y, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
  assert y.shape == ((2, 3, 3, 8) if kind == "none" else (2, 3, 3, 5))
  if kind == "moco":  # Linear - ReLU - Linear, by hand
    p = variables["params"]
    h = np.maximum(np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    np.testing.assert_allclose(np.asarray(y), h @ p["fc2"]["kernel"] + p["fc2"]["bias"],
                               rtol=1e-5, atol=1e-5)
    bound = 1 / np.sqrt(8)  # torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(p["fc1"]["kernel"]).max() <= bound and np.abs(p["fc1"]["bias"]).max() <= bound
  if kind == "simclr":  # the last BatchNorm1d (train mode) whitens over all pixels
    flat = np.asarray(y).reshape(-1, 5)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
  with pytest.raises(ValueError, match="projection head"):
    heads.ProjectionHead(kind="mlp")


# -- the method ------------------------------------------------------------------------
def _config(**contrast):
  config = toy.get_config("method=cfcontra,tiny=1")
  config.method.contrast.warmup_source_images = 8  # batch 8: one step each
  config.method.contrast.warmup_target_images = 8
  for key, value in contrast.items():
    config.method.contrast[key] = value
  return config


@pytest.mark.parametrize("terms,update", [("all", "cross"), ("all", "domain"),
                                          ("intra", "cross")])
def test_bank_life_cycle_matches_the_code(terms, update):
  method = methods.build(_config(terms=terms, bank_update=update))
  assert (method.warmup_source, method.warmup_total) == (1, 2)
  rng = np.random.default_rng(5)
  f = lambda: rng.normal(size=(2, 6, 4, 4))
  lab = lambda: rng.integers(0, 4, size=(2, 4, 4))
  banks = protos.Banks.zeros(K, 6)
  fs, ls, ps, ft = f(), lab(), lab(), f()
  # step 0: source warm-up from pixels labelled and predicted c.
  banks = method.update_banks(banks, 0, jnp.asarray(_nhwc(fs), jnp.float32), jnp.asarray(ls),
                              jnp.asarray(ps), jnp.asarray(_nhwc(ft), jnp.float32),
                              jnp.asarray(lab()))
  expected = np_warmup_source_centres([(fs, ls, ps)], K)
  for c in range(K):
    np.testing.assert_allclose(np.asarray(banks.source)[c], expected.get(c, np.zeros(6)),
                               rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(banks.target) == 0)
  # step 1: target warm-up with pseudo-labels from the source bank.
  src_bank = np.asarray(banks.source, np.float64)
  ft = f() * 0.2
  lt = np_pseudo_labels(ft, src_bank, 0.05)
  banks = method.update_banks(banks, 1, jnp.asarray(_nhwc(fs), jnp.float32), jnp.asarray(ls),
                              jnp.asarray(ps), jnp.asarray(_nhwc(ft), jnp.float32),
                              jnp.asarray(lt))
  np.testing.assert_allclose(np.asarray(banks.source), src_bank, rtol=1e-6)
  tgt_bank = np.asarray(banks.target, np.float64)
  assert np.abs(tgt_bank).sum() > 0
  # step 2: momentum updates in the code's order.
  fs2, ls2, ft2, lt2 = f(), lab(), f(), lab()
  banks = method.update_banks(banks, 2, jnp.asarray(_nhwc(fs2), jnp.float32), jnp.asarray(ls2),
                              jnp.asarray(ls2), jnp.asarray(_nhwc(ft2), jnp.float32),
                              jnp.asarray(lt2))
  c_s, c_t = np_calculate_average(fs2, ls2, K), np_calculate_average(ft2, lt2, K)
  if terms == "all" and update == "cross":
    exp_src = np_hm_backward(np_hm_backward(src_bank, c_t, 0.9), c_s, 0.9)
    exp_tgt = np_hm_backward(np_hm_backward(tgt_bank, c_s, 0.9), c_t, 0.9)
  else:
    exp_src, exp_tgt = np_hm_backward(src_bank, c_s, 0.9), np_hm_backward(tgt_bank, c_t, 0.9)
  np.testing.assert_allclose(np.asarray(banks.source), exp_src, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(banks.target), exp_tgt, rtol=1e-5, atol=1e-6)


# -- the in-place bank order of the code's backward ------------------------------------
def torch_contrast_step(fs, ls, ft, lt, src, tgt, *, in_place=True, momentum=0.9, temp=0.07):
  """The code's contrast in torch: four HybridMemory calls (created in train_minent's
  order) on two shared banks, one backward; each call's backward multiplies by its bank
  and then moves it in place (HM.backward). in_place=False hands every call a copy.

  fs, ft: [1, D, h, w] features; ls, lt: [1, h, w] labels (255 = ignored); src, tgt:
  [K, D] banks. Returns (d/dfs, d/dft, final source bank, final target bank, the order
  in which the four backward calls ran)."""
  import torch
  import torch.nn.functional as F

  ran = []

  class BankProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, centres, bank, name):
      ctx.bank, ctx.name = bank, name
      ctx.save_for_backward(centres)
      return z.mm(bank.t())

    @staticmethod
    def backward(ctx, grad):
      ran.append(ctx.name)
      (centres,) = ctx.saved_tensors
      grad_z = grad.mm(ctx.bank)
      for c in range(len(centres)):
        ctx.bank[c] = momentum * ctx.bank[c] + (1 - momentum) * centres[c]
        norm = ctx.bank[c].norm()
        ctx.bank[c] /= norm if norm != 0 else 1
      return grad_z, None, None, None

  def memory(f, labels, bank, centres, name):
    logits = BankProduct.apply(F.normalize(f, dim=1), centres,
                               bank if in_place else bank.clone(), name) / temp
    e = torch.exp(logits - logits.mean())
    return F.nll_loss(torch.log(e / (e.sum(1, keepdim=True) + 1e-6) + 1e-6), labels,
                      ignore_index=-1)

  d = fs.shape[1]
  f_s, f_t = torch.tensor(fs, requires_grad=True), torch.tensor(ft, requires_grad=True)
  src_bank, tgt_bank = torch.tensor(src), torch.tensor(tgt)
  c_s, c_t = (torch.tensor(np_calculate_average(f.astype(np.float64), y, K), dtype=torch.float32)
              for f, y in ((fs, ls), (ft, lt)))
  y_s, y_t = (torch.tensor(np.where(y == 255, -1, y).reshape(-1)).long() for y in (ls, lt))
  flat = lambda f: f.permute(0, 2, 3, 1).reshape(-1, d)
  loss_s = memory(flat(f_s), y_s, src_bank, c_s, "src")
  loss_t = memory(flat(f_t), y_t, tgt_bank, c_t, "tgt")
  loss_tgt2src = memory(flat(f_t), y_t, src_bank, c_t, "tgt2src")
  loss_src2tgt = memory(flat(f_s), y_s, tgt_bank, c_s, "src2tgt")
  loss = 1e-3 * loss_s + 1e-3 * loss_t
  loss = loss + 1e-3 * loss_src2tgt + 1e-3 * loss_tgt2src
  loss.backward()
  return f_s.grad.numpy(), f_t.grad.numpy(), src_bank.numpy(), tgt_bank.numpy(), ran


def _contrast_batch(seed, d=32, h=6, w=8):
  """One batch of class-structured features (classes 0-5) near unit banks."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(K, d))
  ls, lt = rng.integers(0, 6, size=(1, h, w)), rng.integers(0, 6, size=(1, h, w))
  fs = mu[ls] + 0.7 * rng.normal(size=(1, h, w, d))
  ft = mu[lt] + 0.5 * rng.normal(size=d) + 0.7 * rng.normal(size=(1, h, w, d))
  lt[0, 0, :3] = 255
  src, tgt = (np_normalize(mu + 0.3 * rng.normal(size=mu.shape)) for _ in range(2))
  f32 = lambda x: np.asarray(x, np.float32)
  return f32(np.moveaxis(fs, 3, 1)), ls, f32(np.moveaxis(ft, 3, 1)), lt, f32(src), f32(tgt)


def _jax_contrast_grads(method, fs, ls, ft, lt, src, tgt):
  banks = protos.Banks.zeros(K, fs.shape[1]).replace(source=jnp.asarray(src),
                                                     target=jnp.asarray(tgt))

  def total(f_s, f_t):
    terms = method.contrast_terms(f_s, jnp.asarray(ls), f_t, jnp.asarray(lt), banks)
    return sum(method.weights[n] * v for n, v in terms.items())

  grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(_nhwc(fs)), jnp.asarray(_nhwc(ft)))
  return [np.moveaxis(np.asarray(g), -1, 1) for g in grads]


def test_feature_gradients_follow_the_codes_in_place_bank_order():
  """Default 'in_place' = torch running the code; 'start' = torch with a bank copy per
  call (the paper's reading). The two differ by a few 1e-2 relative on every batch."""
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  in_place = methods.build(_config())
  start = methods.build(_config(bank_gradients="start"))
  gaps = []
  for seed in (0, 1):
    batch = _contrast_batch(seed)
    g_s, g_t, src_end, tgt_end, ran = torch_contrast_step(*batch)
    assert ran == ["src2tgt", "tgt2src", "tgt", "src"]  # the order cfcontra.py assumes
    got_s, got_t = _jax_contrast_grads(in_place, *batch)
    assert rel(got_s, g_s) < 1e-4 and rel(got_t, g_t) < 1e-4
    p_s, p_t, _, _, _ = torch_contrast_step(*batch, in_place=False)
    got_s, got_t = _jax_contrast_grads(start, *batch)
    assert rel(got_s, p_s) < 1e-4 and rel(got_t, p_t) < 1e-4
    gaps += [rel(p_s, g_s), rel(p_t, g_t)]
    # The banks after the step: update_banks (an active step) = torch's in-place result.
    fs, ls, ft, lt, src, tgt = batch
    banks = protos.Banks.zeros(K, fs.shape[1]).replace(source=jnp.asarray(src),
                                                       target=jnp.asarray(tgt))
    banks = in_place.update_banks(banks, 2, jnp.asarray(_nhwc(fs)), jnp.asarray(ls),
                                  jnp.asarray(ls), jnp.asarray(_nhwc(ft)), jnp.asarray(lt))
    np.testing.assert_allclose(np.asarray(banks.source), src_end, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(banks.target), tgt_end, rtol=1e-5, atol=1e-6)
  assert 1e-2 < min(gaps) and max(gaps) < 1e-1, gaps  # the size cfcontra.py states


def test_source_centres_switch_reads_all_labelled_pixels():
  """'labelled' (paper Eq. 9) averages every labelled pixel; the code's 'correct' only
  the correctly predicted ones."""
  rng = np.random.default_rng(6)
  fs, ls = rng.normal(size=(2, 6, 4, 4)), rng.integers(0, 4, size=(2, 4, 4))
  pred = np.where(rng.random((2, 4, 4)) < 0.5, ls, (ls + 1) % 4)
  for rule, expected_pred in (("correct", pred), ("labelled", ls)):
    method = methods.build(_config(source_centres=rule))
    banks = method.update_banks(protos.Banks.zeros(K, 6), 0, jnp.asarray(_nhwc(fs), jnp.float32),
                                jnp.asarray(ls), jnp.asarray(pred),
                                jnp.asarray(_nhwc(fs), jnp.float32), jnp.asarray(ls))
    expected = np_warmup_source_centres([(fs, ls, expected_pred)], K)
    for c in range(4):
      np.testing.assert_allclose(np.asarray(banks.source)[c], expected[c], rtol=1e-5,
                                 atol=1e-6)


def test_head_is_frozen_unless_train_head():
  """The code never optimises its head (optax set_to_zero); train_head=True trains it."""
  for train_head, frozen in ((False, True), (True, False)):
    method = methods.build(_config(train_head=train_head))
    params = {"backbone": {"w": jnp.ones(3)}, "aspp_0": {"w": jnp.ones(2)},
              cfcontra.HEAD_KEY: {"fc1": {"kernel": jnp.ones((2, 2))}}}
    group = state_lib.OptGroup.create(params, method.tx)
    for _ in range(2):  # step 0 of the warm-up schedule has a ~0 rate
      group = group.apply_gradients(jax.tree.map(jnp.ones_like, params))
    head_moved = float(jnp.abs(group.params[cfcontra.HEAD_KEY]["fc1"]["kernel"] - 1).max())
    assert (head_moved == 0.0) == frozen
    assert float(jnp.abs(group.params["backbone"]["w"] - 1).max()) > 0


def test_style_stage_builds_the_adain_trainer_and_bad_switches_fail():
  config = toy.get_config("method=cfcontra,tiny=1")
  config.method.stage = "style"
  assert isinstance(methods.build(config), cfcontra.AdaINTraining)
  for key, value, match in (("stage", "both", "stage"), ("contrast.terms", "cross", "terms"),
                            ("contrast.bank_update", "pixel", "bank_update"),
                            ("contrast.bank_gradients", "end", "bank_gradients"),
                            ("contrast.source_centres", "all", "source_centres")):
    bad = toy.get_config("method=cfcontra,tiny=1")
    node, leaf = (bad.method.contrast, key.split(".")[1]) if "." in key else (bad.method, key)
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
      methods.build(bad)


def test_end_to_end_three_steps(tmp_path):
  """Through train.train_and_evaluate: warm-up (steps 1-2) gates the contrast off, step 3
  adds the four 1e-3 terms, the head stays at its initial draw, the banks are unit."""
  config = _config()
  config.data.toy.cache_dir = str(tmp_path / "cache")
  config.data.crop_size = (32, 32)  # compile-bound: small crops, one (final) checkpoint
  config.train.checkpoint_every_steps = 100
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["contrast_active"] for r in rows] == [0.0, 0.0, 1.0]
  for r in rows:
    terms = sum(1e-3 * r[f"loss_contra_{n}"] for n in ("src", "tgt", "tgt2src", "src2tgt"))
    minent_part = (r["loss_src_seg"] + 0.1 * r["loss_src_seg_aux"] + 1e-3 * r["loss_ent"]
                   + 2e-4 * r["loss_ent_aux"])
    np.testing.assert_allclose(r["loss_contra"], r["contrast_active"] * terms, rtol=1e-5)
    np.testing.assert_allclose(r["loss"], minent_part + r["loss_contra"], rtol=1e-5)
    assert 0.0 <= r["pseudo_acc"] <= 1.0 and 0.0 <= r["pseudo_coverage"] <= 1.0
  # The head is exactly its initial draw (train.create_state's key, fold 1 for the head).
  method = methods.build(config)
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  head0 = method.head.init(jax.random.fold_in(init_key, 1),
                           jnp.zeros((1, 1, 1, method.feature_dim)), train=False)["params"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(head0),
               jax.device_get(state.seg.params[cfcontra.HEAD_KEY]))
  norms = np.linalg.norm(np.asarray(state.banks.source), axis=-1)
  np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    latest = json.load(f)
  assert latest["step"] == 3
  # The one evaluation is the best so far: best.json and best/3 hold what was evaluated.
  abstract = jax.eval_shape(method.inference_variables, state)
  best, record = best_snapshot.restore(workdir, jax.tree.map(
      lambda a, b: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=b.sharding), abstract,
      method.inference_variables(state)))
  assert (record["step"], record["miou"]) == (3, latest["miou"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(best),
               jax.device_get(method.inference_variables(state)))
