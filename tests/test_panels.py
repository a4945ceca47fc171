"""Training image panels: the picture, every method's tiles, and the trainer writing them.

The method checks trace each step with `jax.eval_shape` (no compilation); one short
run through the trainer checks the TensorBoard image, workdir/panels/latest.png and
the evaluation scalars.
"""

import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from PIL import Image

from confeti_jax import methods, panels, sharding, train
from confeti_jax.data import labels as labels_lib
from confeti_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402


def test_compose_keeps_the_method_order_and_draws_each_kind():
  image = np.zeros((8, 8, 3), np.uint8)
  image[..., 2] = 200
  label = np.full((8, 8), 255, np.int32)
  label[:4] = 13  # car
  heat = np.ones((8, 8), np.float32)
  metrics = panels.attach({"loss": 1.0}, True, lambda: {"b image": image, "a label": label,
                                                         "c heat": heat})
  metrics, panel = panels.pop(metrics)
  assert metrics == {"loss": 1.0}
  picture = panels.compose(jax.device_get(jax.tree.map(jnp.asarray, panel)), columns=3,
                           min_size=32)
  cell = 32 + 2  # tiles of 8 px enlarged x4, and a 2 px gap
  assert picture.shape == (32 + panels.TITLE_HEIGHT, 3 * cell, 3)
  top = panels.TITLE_HEIGHT
  # In the order built (pytrees sort keys; the prefix restores the order), not sorted.
  np.testing.assert_array_equal(picture[top + 5, 5], [0, 0, 200])
  np.testing.assert_array_equal(picture[top + 5, cell + 5], labels_lib.PALETTE[13])
  np.testing.assert_array_equal(picture[top + 30, cell + 5], [0, 0, 0])  # ignored: black
  np.testing.assert_array_equal(picture[top + 5, 2 * cell + 5], [255, 255, 255])  # heat 1
  assert panels.attach({"loss": 1.0}, False, lambda: 1 / 0) == {"loss": 1.0}


def test_heat_ramp_runs_from_black_to_white():
  colours = panels.to_rgb(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32))
  np.testing.assert_array_equal(colours[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(colours[0, 2], [255, 255, 255])
  np.testing.assert_array_equal(colours[0, 3], [255, 255, 255])  # clipped
  assert colours[0, 1, 0] == 255 and colours[0, 1, 2] == 0
  with pytest.raises(ValueError, match="none of"):
    panels.to_rgb(np.zeros((2, 2, 2), np.float32))


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("toy_panels"))


def _config(arg, cache):
  config = toy.get_config(arg)
  config.data.toy.cache_dir = cache
  config.train.image_every_steps = 1
  return config


EXPECTED = {
    "source_only": {"source", "source GT", "source prediction"},
    "dacs": {"source", "target", "pseudo-label", "mixed", "mixed label", "prediction on mixed"},
    "minent": {"target", "target prediction", "target entropy / log K"},
    "cfcontra": {"target prediction", "pseudo-label (nearest source centre)"},
    "confeti": {"stylised source", "pseudo-label", "mixed", "prediction on mixed"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_method_draws_its_tiles_from_the_step(name, toy_cache):
  arg = f"method={name},tiny=1" + (",model=D" if name == "confeti" else "")
  config = _config(arg, toy_cache)
  if name == "confeti":
    config.method.stage, config.method.cut_from = 1, ""  # the joint stage, fresh CUT
  method = methods.build(config)
  src, tgt = pipeline.make_train_iterators(config)
  batch, _ = train.next_global_batch({"source": src, "target": tgt}, sharding.make_mesh())
  key = jax.random.key(0)
  state = jax.eval_shape(method.init_state, key)
  _, metrics = jax.eval_shape(method.train_step, state, batch, key)
  tiles = {k.split("|", 1)[1]: v for k, v in metrics[panels.KEY].items()}
  assert EXPECTED[name] <= set(tiles), sorted(tiles)
  crop = tuple(config.data.crop_size)
  for tile_name, tile in tiles.items():
    assert tile.shape[:2] == crop, (tile_name, tile.shape)
    assert (tile.dtype, tile.ndim) in ((jnp.uint8, 3), (jnp.int32, 2), (jnp.float32, 2))
  off = _config(arg, toy_cache)
  off.train.image_every_steps = 0
  if name == "confeti":
    off.method.stage, off.method.cut_from = 1, ""
  _, metrics = jax.eval_shape(methods.build(off).train_step, state, batch, key)
  assert panels.KEY not in metrics


def test_cut_stage_draws_source_translation_and_target(toy_cache):
  config = _config("method=cut,tiny=1", toy_cache)
  method = methods.build(config)
  src, tgt = pipeline.make_train_iterators(config)
  batch, _ = train.next_global_batch({"source": src, "target": tgt}, sharding.make_mesh())
  key = jax.random.key(0)
  _, metrics = jax.eval_shape(method.train_step, jax.eval_shape(method.init_state, key),
                              batch, key)
  assert [k.split("|")[1] for k in sorted(metrics[panels.KEY])] == [
      "source", "G(source)", "target"]


def test_trainer_writes_the_panel_and_eval_scalars(tmp_path, toy_cache):
  config = _config("method=dacs,tiny=1", toy_cache)
  config.train.image_every_steps = 2
  workdir = str(tmp_path / "run")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)  # as main.py runs; pytest leaves absl at WARNING
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    logging.set_verbosity(verbosity)
  picture = np.asarray(Image.open(os.path.join(workdir, "panels", "latest.png")))
  assert picture.shape[1] == 4 * (panels.MIN_TILE + 2) and picture.dtype == np.uint8
  events = b"".join(open(f, "rb").read()
                    for f in glob.glob(os.path.join(workdir, "tensorboard", "events.*")))
  for tag in (b"train/panel", b"eval/miou", b"eval/IoU/traffic_light", b"loss_mix_seg"):
    assert tag in events, tag
  log = open(os.path.join(workdir, "train.log")).read()
  assert log.startswith("Config:\n") and "Finished at step 3" in log
