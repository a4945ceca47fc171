"""--mode=visualize on the tiny toy: the qualitative grid, CONFETI's CAM maps, the t-SNE.

What is drawn is tested, not training, so the runs' checkpoints are written directly
(as tests/test_stylize.py does): an abstract state filled with small positive numbers,
saved by `checkpoint.Checkpointer` with its config.json, as training leaves them.
"""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from confeti_jax import checkpoint, insight, methods, models, sharding, visualize
from confeti_jax.data import labels, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402

NUM_IMAGES = 3


def _fake_run(config, workdir, seed):
  """A 'finished' run of `config` in `workdir`: config.json and one checkpoint."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  method = methods.build(config)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: rng.uniform(0.0, 0.05, a.shape).astype(a.dtype),
                       jax.eval_shape(method.init_state, jax.random.key(0)))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    ckpt.save(int(config.train.steps), state.replace(step=np.int32(config.train.steps)))
  finally:
    ckpt.close()
  return config, workdir


def _config(method, cache):
  config = toy.get_config(f"method={method},tiny=1")
  config.data.toy.cache_dir = cache
  return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("toy_cache"))


@pytest.fixture(scope="module")
def dacs_run(tmp_path_factory, cache):
  return _fake_run(_config("dacs", cache), str(tmp_path_factory.mktemp("dacs")), seed=0)


@pytest.fixture(scope="module")
def visualized(dacs_run):
  """main_mode on the DACS run, compared with itself (its own config.json read back)."""
  config, workdir = dacs_run
  return visualize.main_mode(config, workdir, compare=[workdir], num_images=NUM_IMAGES)


def _val_images(config, count):
  batches, _ = pipeline.make_eval_batches(config, dataset="target", batch_size=1)
  return [(b["image"][0], b["label"][0]) for _, b in zip(range(count), batches)]


def _classes_of(tile, names):
  """trainIds of a colour-coded tile (255 where a colour is no class colour)."""
  table = labels.colour_table(names)[:len(names)]
  match = np.all(tile[..., None, :] == table[None, None], axis=-1)
  return np.where(match.any(-1), match.argmax(-1), 255)


def test_error_map_marks_wrong_right_and_ignored():
  label = np.array([[0, 1], [255, 2]], np.uint8)
  out = visualize.error_map(np.array([[0, 2], [5, 2]], np.uint8), label)
  assert [tuple(out[i, j]) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
      visualize.WHITE, visualize.RED, visualize.GREY, visualize.WHITE]
  assert np.all(visualize.error_map(label, label)[label != 255] == visualize.WHITE)


def test_grid_layout_tiles_and_error_maps(dacs_run, visualized):
  config, workdir = dacs_run
  assert visualized["grid"] == os.path.join(workdir, "visualize", "grid.png")
  grid = np.asarray(Image.open(visualized["grid"]).convert("RGB"))
  shown = _val_images(config, NUM_IMAGES)
  size = shown[0][1].shape
  assert size == (160, 320)  # toy target val labels: shown unscaled
  cols = 2 + 2 * 2  # image, gt, then prediction and errors of the run and its comparison
  width = cols * size[1] + (cols - 1) * visualize.GAP
  names = labels.class_set(config.class_set)[0]
  legend = visualize.legend(names, width)
  body = visualize.TEXT_HEIGHT + NUM_IMAGES * size[0] + (NUM_IMAGES - 1) * visualize.GAP
  assert grid.shape == (body + visualize.GAP + legend.height, width, 3)
  assert np.any(grid[:visualize.TEXT_HEIGHT] != 255)  # the column headers were drawn
  np.testing.assert_array_equal(grid[body + visualize.GAP:], np.asarray(legend))

  def tile(r, c):
    left, upper, right, lower = visualize.tile_box(r, c, size)
    return grid[upper:lower, left:right]

  for r, (image, label) in enumerate(shown):
    np.testing.assert_array_equal(tile(r, 0), image)
    gt = tile(r, 1)
    np.testing.assert_array_equal(gt, labels.colorize(label))
    present = np.unique(label[label != 255])
    allowed = {tuple(labels.PALETTE[c]) for c in present} | {(0, 0, 0)}
    assert {tuple(p) for p in gt.reshape(-1, 3)} <= allowed
    # The comparison restored the same run from its config.json: the same columns.
    np.testing.assert_array_equal(tile(r, 2), tile(r, 4))
    np.testing.assert_array_equal(tile(r, 3), tile(r, 5))
    pred = _classes_of(tile(r, 2), names)
    assert np.all(pred != 255)  # every prediction pixel has a class colour
    np.testing.assert_array_equal(tile(r, 3), visualize.error_map(pred, label))


def test_embedding_holds_both_domains(dacs_run, visualized):
  config, _ = dacs_run
  run = visualize.load_run(config, dacs_run[1], sharding.make_mesh())
  features, classes, domains = insight.embedding_sample(config, run)
  assert features.shape == (len(classes), models.layer4_channels(config.model))
  assert set(domains.tolist()) == {0, 1}
  for d in (0, 1):  # each domain's cells are bounded per class and span several classes
    counts = np.bincount(classes[domains == d])
    assert counts.max() <= insight.PER_CLASS and np.count_nonzero(counts) >= 3
  image = Image.open(visualized["embedding"])
  assert image.size[0] > 600 and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 20
  assert visualized["cam"] is None  # DACS has no CAM: skipped with a note


def test_cam_maps_of_a_confeti_run(tmp_path, cache):
  config = _config("confeti", cache)
  config.method.pixel_alignment = False  # one stage, no generator: the student's heads only
  config, workdir = _fake_run(config, str(tmp_path / "confeti"), seed=1)
  run = visualize.load_run(config, workdir, sharding.make_mesh(),
                           use_fallback=True)
  assert insight.has_cam(run)
  panels = insight.cam_panels(config, run)
  picked = insight.pick_images(config)
  assert len(panels) == 2 * insight.CAM_IMAGES  # per image: a CAM row and a similarity row
  widths = []
  for i, (_, label) in enumerate(picked):
    k = min(insight.CAM_CLASSES, len(np.unique(label[label != 255])))
    (cam_headers, cam_tiles), (sim_headers, sim_tiles) = panels[2 * i], panels[2 * i + 1]
    assert len(cam_headers) == len(cam_tiles) == len(sim_headers) == len(sim_tiles) == 1 + k
    assert all(t.shape == label.shape + (3,) for t in cam_tiles + sim_tiles)
    assert cam_headers[0] == "image" and sim_headers[0] == "ground truth"
    assert cam_headers[1].startswith("CAM ") and sim_headers[1].startswith("cos ")
    widths.append(1 + k)
  path = insight.write_cam(config, workdir, run)
  assert path == os.path.join(workdir, "visualize", "cam.png")
  h, w = picked[0][1].shape
  out = Image.open(path)
  rows = len(panels) * (visualize.TEXT_HEIGHT + h + visualize.GAP)
  assert out.size == (max(widths) * (w + visualize.GAP) - visualize.GAP,
                      rows + visualize.TEXT_HEIGHT)
