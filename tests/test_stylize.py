"""--mode=stylize and the demo grid on the tiny toy.

Training is not what is tested here, so the run's checkpoints are written directly:
stage 0 holds a freshly initialised CUT (random G: not the identity) and stage 1 the
initial CONFETI state, both saved by `checkpoint.Checkpointer` as training saves them.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from confeti_jax import checkpoint, methods, stages, style, stylize
from confeti_jax import state as state_lib
from confeti_jax.data import labels, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402


def _save(stage_config, stage_workdir, state):
  """A finished checkpoint and config.json, as train.train_and_evaluate leaves them."""
  os.makedirs(stage_workdir, exist_ok=True)
  with open(os.path.join(stage_workdir, "config.json"), "w") as f:
    f.write(stage_config.to_json_best_effort())
  ckpt = checkpoint.Checkpointer(os.path.join(stage_workdir, "checkpoints"))
  try:
    ckpt.save(int(stage_config.train.steps), state)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """(config, workdir) of a tiny CONFETI run whose stages 0 and 1 are 'finished'."""
  config = toy.get_config("method=confeti,tiny=1")
  config.data.toy.cache_dir = str(tmp_path_factory.mktemp("toy_cache"))
  config.method.stages = "0,1"
  workdir = str(tmp_path_factory.mktemp("confeti_run"))
  (_, c0, w0), (_, c1, w1) = stages.plan_for(config, workdir)
  model = style.build_cut(c0.method.cut)
  gen, disc, mlp = style.init_cut(jax.random.key(1), model)
  _save(c0, w0, state_lib.TrainState(step=np.int32(c0.train.steps), seg=None, batch_stats=None,
                                     gen=gen, disc=disc, patch_mlp=mlp))
  # Stage 1's state with arbitrary positive numbers: its structure is what restoring
  # needs, and filling an abstract state skips compiling the initialisation (~20 s).
  method = methods.build(c1)  # reads stage 0's generator (method.cut_from)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.uniform(0.0, 0.05, a.shape).astype(a.dtype),
                       jax.eval_shape(method.init_state, jax.random.key(0)))
  _save(c1, w1, state.replace(step=np.int32(c1.train.steps)))
  return config, workdir


def test_stylize_writes_a_gta5_folder_and_resumes(run_dir):
  config, workdir = run_dir
  generator = stylize.load_generator(config, workdir)
  assert generator.source == os.path.join(workdir, "stage1")  # newest stage with a G
  out = stylize.run(config, workdir, num_images=3, generator=generator)
  root = os.path.join(workdir, "stylized")
  assert (out["root"], out["written"], out["skipped"]) == (root, 3, 0)
  src = stylize.source_set(config)
  names = sorted(os.listdir(os.path.join(root, "images")))
  assert names == [os.path.basename(p) for p in src.image_paths[:3]]
  result = sources.GTA5Source(root)  # a valid GTA5-layout folder with its labels
  assert len(result) == 3
  for i, name in enumerate(names):
    link = os.path.join(root, "labels", name)
    assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(
        src.label_paths[i])
    with Image.open(os.path.join(root, "images", name)) as im:
      assert im.size == (320, 176) and im.mode == "RGB"  # scale (320, 176): the toy's size
    original, stylised = src[i], result[i]
    np.testing.assert_array_equal(stylised["label"], original["label"])
    diff = np.abs(stylised["image"].astype(int) - original["image"].astype(int)).mean()
    assert diff > 10, diff  # G is not the identity
  mtimes = [os.path.getmtime(os.path.join(root, "images", n)) for n in names]

  again = stylize.run(config, workdir, num_images=3, generator=generator)
  assert (again["written"], again["skipped"]) == (0, 3)
  assert mtimes == [os.path.getmtime(os.path.join(root, "images", n)) for n in names]
  assert not [f for f in os.listdir(os.path.join(root, "images")) if f.endswith(".part")]
  with open(os.path.join(root, stylize.MANIFEST)) as f:
    assert json.load(f)["generator"] == generator.source


def test_stylize_at_another_scale_writes_resized_train_id_labels(run_dir, tmp_path):
  config, workdir = run_dir
  config = stages.derive(config, **{"data.source.scale": (150, 90)})
  out = stylize.run(config, workdir, num_images=2, out_root=str(tmp_path / "small"))
  result = sources.GTA5Source(out["root"])
  assert len(result) == 2
  # keep-ratio 176x320 -> 83x150, rounded down to multiples of 4 for G.
  assert result[0]["image"].shape == (80, 148, 3)
  assert sorted(os.listdir(tmp_path / "small" / "labels"))[0].endswith("_labelTrainIds.png")
  assert set(np.unique(result[0]["label"])) <= set(range(19)) | {255}
  # The same folder with other settings refuses to mix them.
  other = stages.derive(config, **{"data.source.scale": (160, 88)})
  with pytest.raises(ValueError, match="Delete the folder"):
    stylize.run(other, workdir, num_images=2, out_root=out["root"])


def test_missing_generator_names_the_folders_and_the_command(run_dir, tmp_path):
  config, _ = run_dir
  with pytest.raises(FileNotFoundError) as error:
    stylize.load_generator(config, str(tmp_path))
  message = str(error.value)
  assert all(os.path.join(str(tmp_path), s) in message for s in ("stage2", "stage1", "stage0"))
  assert "python -m confeti_jax.main" in message


def test_main_mode_stylises_everything_and_writes_the_grid(run_dir):
  config, workdir = run_dir
  out = stylize.main_mode(config, workdir)  # num_images=0: all of them
  assert out["written"] + out["skipped"] == 8 == len(os.listdir(os.path.join(out["root"],
                                                                              "images")))
  path = os.path.join(workdir, "eval", "grid.png")
  with Image.open(path) as im:
    # 4 rows of tiles padded to 176x320 (source 176x320, target 160x320), 2-pixel gaps.
    assert im.size == (5 * 320 + 4 * 2, 4 * 176 + 3 * 2)
    grid = np.asarray(im.convert("RGB"))
  gt = grid[:160, 4 * 322:]  # the first row's ground truth: palette colours or black
  allowed = {tuple(c) for c in labels.PALETTE} | {(0, 0, 0)}
  assert {tuple(c) for c in gt.reshape(-1, 3)} <= allowed


def test_demo_grid_takes_given_variables(run_dir, tmp_path):
  config, workdir = run_dir
  path = stylize.demo_grid(config, workdir, method_variables=(None, None), num=1,
                           path=str(tmp_path / "grid.png"))
  with Image.open(path) as im:
    assert im.size == (5 * 320 + 4 * 2, 176)
    pred = np.asarray(im.convert("RGB"))[:160, 3 * 322:3 * 322 + 320]
  assert (pred == 128).all()  # no student given: a grey prediction tile
