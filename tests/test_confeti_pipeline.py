"""CONFETI's pixel alignment and stages: L_SC gradients, the joint step, stage handoff.

One tiny two-stage run (joint stage, then the second stage with the generator frozen)
goes through `stages.run` on 8 devices; its joint stage is replayed on one device.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import augment, checkpoint, methods, sharding, stages, style, train
from confeti_jax.data import pipeline
from confeti_jax.methods import confeti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402


def tiny_config(cache="", **method):
  config = toy.get_config("method=confeti,tiny=1")
  config.data.toy.cache_dir = cache
  config.train.steps = 2
  config.eval.every_steps = 2
  config.method.proto.cam_mix_after = 0
  config.method.proto.pcl_after = 0  # target PCL and CAM weights from step 1
  for key, value in method.items():
    config.method[key] = value
  return config


def test_stage_plan_hands_each_stage_its_predecessor(tmp_path):
  config = tiny_config(stages="0,1,2")
  plan = confeti.CONFETI.stage_plan(config, str(tmp_path))
  assert [name for name, _, _ in plan] == ["stage0", "stage1", "stage2"]
  (_, c0, w0), (_, c1, w1), (_, c2, w2) = plan
  assert (c0.method.stage, c0.eval.every_steps) == (0, 0)
  assert c0.train.steps == config.method.stage0_steps
  assert c1.method.cut_from == w0 and c2.method.cut_from == w1
  assert tuple(c2.data.crop_size) == tuple(config.method.stage2_crop)
  assert tuple(c1.data.crop_size) == tuple(config.data.crop_size)
  assert confeti.CONFETI.stage_plan(tiny_config(pixel_alignment=False), str(tmp_path)) is None
  # Training-free styles have no generator, so no CUT stage 0 is scheduled.
  for style_name in ("fda", "gpa"):
    plan = confeti.CONFETI.stage_plan(tiny_config(style=style_name), str(tmp_path))
    assert [name for name, _, _ in plan] == ["stage1", "stage2"]
  with pytest.raises(ValueError, match="trains only CUT"):
    confeti.CONFETI.stage_plan(tiny_config(style="fda", stages="0"), str(tmp_path))
  with pytest.raises(ValueError, match="stages"):
    confeti.parse_stages("1,3")
  # The second stage alone needs a generator: the error names the missing stage 1 run.
  (_, alone, _), = confeti.CONFETI.stage_plan(tiny_config(stages="2"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="stage1"):
    methods.build(alone)


def test_semantic_consistency_trains_only_the_generator_and_phi():
  config = tiny_config(stages="1")
  method = methods.build(config)
  assert method.trains_generator and method.has_phi and method.trains_target_pcl
  state = jax.jit(method.init_state)(jax.random.key(0))
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.integers(0, 256, size=(2, 64, 64, 3)), jnp.uint8)
  xs = style.pixels_to_cut(pixels)
  forward = style.generator_forward(method.cut, state.gen.params, xs, xs)
  protos = jnp.asarray(rng.normal(size=(19, method.proto_dim)), jnp.float32)

  def loss(params, fake):
    value, _ = method.semantic_consistency(params, state.batch_stats,
                                           augment.normalize(pixels), fake, protos)
    return value

  # One compiled gradient instead of op-by-op dispatch (the eager form took ~100 s).
  g_params, g_fake = jax.device_get(
      jax.jit(jax.grad(loss, argnums=(0, 1)))(state.seg.params, forward.fake[:2]))
  for name, sub in g_params.items():
    norm = sum(float(np.sum(np.abs(x))) for x in jax.tree.leaves(sub))
    assert (norm > 0) == (name == confeti.PHI_KEY), name
  assert float(np.sum(np.abs(g_fake))) > 0
  fake_grads = jnp.zeros_like(forward.fake).at[:2].set(g_fake)
  (g_gen,) = forward.pullback((fake_grads, jax.tree.map(jnp.zeros_like, forward.real_taps)))
  assert all(float(np.sum(np.abs(x))) > 0 for x in jax.device_get(jax.tree.leaves(g_gen)))


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
  """Stages 1 and 2 of the tiny toy through `stages.run` (8 devices), initial states kept."""
  cache = str(tmp_path_factory.mktemp("toy_cache"))
  workdir = str(tmp_path_factory.mktemp("confeti_pipeline"))
  config = tiny_config(cache, stages="1,2")
  config.train.checkpoint_every_steps, config.train.keep_checkpoints = 1, 3  # keep step 1
  inits, finals = {}, {}
  create_state, train_and_evaluate = train.create_state, train.train_and_evaluate

  def capturing(method, config, mesh):
    state, abstract, shardings = create_state(method, config, mesh)
    inits[int(config.method.stage)] = jax.device_get(state)
    return state, abstract, shardings

  def recording(config, workdir):
    state = train_and_evaluate(config, workdir)
    finals[int(config.method.stage)] = jax.device_get(state)
    return state

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "create_state", capturing)
    mp.setattr(train, "train_and_evaluate", recording)
    stages.run(config, workdir)
  return config, workdir, inits, finals


def test_two_stage_run_hands_the_generator_over(two_stages):
  config, workdir, inits, finals = two_stages
  assert sorted(finals) == [1, 2] and int(finals[2].step) == 2
  # Stage 2 runs stage 1's final generator, frozen; its segmentor starts afresh from
  # the same initialisation as stage 1's.
  jax.tree.map(np.testing.assert_array_equal, inits[2].gen.params, finals[1].gen.params)
  jax.tree.map(np.testing.assert_array_equal, finals[2].gen.params, finals[1].gen.params)
  assert finals[2].disc is None and finals[2].patch_mlp is None
  init_seg = {k: v for k, v in inits[1].seg.params.items() if k != confeti.PHI_KEY}
  jax.tree.map(np.testing.assert_array_equal, inits[2].seg.params, init_seg)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(inits[1].gen.params),
                                                  jax.tree.leaves(finals[1].gen.params))]
  assert any(moved)
  with open(os.path.join(workdir, "stage1", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all(r["loss_sc"] > 0 and np.isfinite(r["cut_loss_G"]) for r in rows)
  assert rows[0]["loss_tgt_pcl"] == 0  # gated: step 0 is not > pcl_after
  with open(os.path.join(workdir, "stage2", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all("loss_sc" not in r and "cut_loss_G" not in r for r in rows)
  with open(os.path.join(workdir, "eval", "latest.json")) as f:  # the last stage's result
    assert json.load(f)["step"] == 2
  # A rerun finds both stages finished and trains nothing.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("retrained a stage"))
    stages.run(config, workdir)


def test_joint_stage_single_device_replay_equals_sharded_run(two_stages):
  config, workdir, inits, finals = two_stages
  (_, stage1, _), _ = confeti.CONFETI.stage_plan(config, workdir)
  src_iter, tgt_iter = pipeline.make_train_iterators(stage1)
  mesh = sharding.make_mesh(1)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), inits[1])
  step = train.make_train_step(methods.build(stage1), stage1, mesh, shardings)
  state = jax.device_put(inits[1], shardings)
  replayed, states = [], []
  for _ in range(2):
    batch = {"source": next(src_iter), "target": next(tgt_iter)}
    state, metrics = step(state, sharding.to_global(batch, mesh))
    replayed.append(jax.device_get(metrics))
    states.append(jax.device_get(state))
  single = states[-1]
  # The first step starts from the same state: every loss agrees closely.
  with open(os.path.join(workdir, "stage1", "metrics.jsonl")) as f:
    logged = json.loads(f.readline())
  for key, value in replayed[0].items():
    if key.startswith(("loss", "cut_loss")):
      np.testing.assert_allclose(float(value), logged[key], rtol=1e-3, atol=1e-6, err_msg=key)
  # Parameters after two steps: compare the segmentor's update and the prototypes.
  # Model B's step (tests/test_confeti.py) matches to 1e-4 element by element; here
  # Adam's first steps turn last-bit differences (G's output, other conv blocking on 8
  # devices) into +-lr on parameters whose gradient is ~0: the measured segmentor update
  # differs by 5.4% in relative L2 with raster-order prototype ties and 10.8% with the
  # keyed random ties (another trajectory, as noise-sensitive; both orders are identical
  # on 1 and 8 devices); a wrong reduction or batch mix-up changes it by O(1).
  # CUT's parameters (G above all) differ more after two steps, for the same Adam
  # reason and because G's gradient carries the segmentor's loss through the stylised
  # source, whose second step hinges on discrete picks (top-32 CAM pixels per class,
  # argmax pseudo-labels) that last-bit differences can flip. Gradients themselves are
  # compared below, after one step.
  for name in ("seg", "protos"):
    pick = lambda s, n=name: s.protos.protos if n == "protos" else getattr(s, n).params
    flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(pick(s))])
    start, a, b = flat(inits[1]), flat(single), flat(finals[1])
    moved = np.linalg.norm(b - start)
    assert moved > 0, name
    assert np.linalg.norm(a - b) / moved < 0.2, (name, np.linalg.norm(a - b) / moved)
  # After one step every optimiser's first moment is (1 - b1) x its gradient: G (its
  # GAN + NCE + L_SC gradient and the segmentation losses' through the stylised source),
  # D, the patch MLPs and the segmentor get the same gradients on 1 and on 8 devices.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "stage1", "checkpoints"))
  try:
    run_one = jax.device_get(ckpt.restore(1, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
        inits[1])))
  finally:
    ckpt.close()
  differences = {}
  for name in ("gen", "disc", "patch_mlp", "seg"):
    a, b = _first_moments(getattr(states[0], name)), _first_moments(getattr(run_one, name))
    assert np.linalg.norm(b) > 0, name
    differences[name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
  # Measured: G 1.4e-3, segmentor 1.7e-3 (float32 sums over other conv blockings), D
  # 7e-7, F 1e-7 in relative L2 with raster-order prototype ties; G 5.6e-3, segmentor
  # 2.0e-3 with the keyed random ties (not traced further); a wrong reduction or batch
  # mix-up is O(1).
  assert max(differences.values()) < 1e-2, differences


def _first_moments(group):
  """Every Adam first moment of an OptGroup's optimiser state, flattened."""
  found = [t.mu for t in jax.tree.leaves(group.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
           if hasattr(t, "mu")]
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(found)])
