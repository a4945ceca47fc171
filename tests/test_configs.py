"""Every config file loads, is locked, resolves its method, and has the contract keys."""

import glob
import os
import subprocess
import sys

import pytest

from confeti_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not os.path.basename(p).startswith(("_", "common", "paper_rows")))
REQUIRED = ("seed", "train.steps", "train.batch_size", "data.source.root", "data.target.root",
            "data.crop_size", "eval.every_steps", "method.name", "model.backbone", "model.width",
            "model.dtype")


def _exec(spec):
  path, _, arg = spec.partition(":")
  sys.path.insert(0, ROOT)
  namespace = {}
  with open(path) as f:
    code = compile(f.read(), path, "exec")
  exec(code, namespace)  # noqa: S102 - loading our own config files
  return namespace["get_config"](arg or None)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_has_contract_keys(path):
  config = _exec(path)
  for key in REQUIRED:
    node = config
    for part in key.split("."):
      node = node[part]
  assert config.method.name in methods.METHODS
  method = methods.build(config)
  assert method.num_classes == config.num_classes


def test_locked_config_typo_names_the_key():
  """A typo on the command line fails and names the key (the user-facing path)."""
  code = (
      "import sys; from absl import flags; from ml_collections import config_flags;"
      "c = config_flags.DEFINE_config_file('config', lock_config=True);"
      "sys.argv = ['x', '--config=configs/toy.py', '--config.train.stpes=5'];"
      "flags.FLAGS(sys.argv)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0
  assert "stpes" in proc.stderr


def test_overrides_reach_nested_keys():
  code = (
      "import sys; from absl import flags; from ml_collections import config_flags;"
      "c = config_flags.DEFINE_config_file('config', lock_config=True);"
      "sys.argv = ['x', '--config=configs/toy.py:tiny=1', '--config.data.crop_size=(32,48)',"
      "'--config.model.backbone=resnet50']; flags.FLAGS(sys.argv);"
      "print(tuple(c.value.data.crop_size), c.value.model.backbone, c.value.train.steps)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["(32,", "48)", "resnet50", "3"]


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="metod"):
    _exec(os.path.join(ROOT, "configs", "toy.py") + ":metod=dacs")


@pytest.mark.parametrize("name", ["minent_gta2cs.py", "cfcontra_gta2cs.py", "adain_gta2cs.py"])
def test_argument_free_configs_refuse_an_appended_method(name):
  """These configs take no ':key=value'; an appended ':method=...' used to be dropped."""
  with pytest.raises(ValueError, match="'method'; this config takes none"):
    _exec(os.path.join(ROOT, "configs", name) + ":method=dacs")


@pytest.mark.parametrize("name", ["minent_gta2cs.py", "cfcontra_gta2cs.py"])
def test_advent_family_squashes_gta5_to_the_crop(name):
  """MinEnt / CFContra resize GTA5's 1914x1052 to exactly 1280x640 (aspect not kept),
  and the crop is the whole resized image, as the CFContra / ADVENT code does."""
  import numpy as np

  from confeti_jax.data import pipeline
  config = _exec(os.path.join(ROOT, "configs", name))
  assert config.data.source.keep_ratio is False
  transform = pipeline.TrainTransform(config.data.source.scale, config.data.crop_size,
                                      1.0, 0.0, config.data.source.keep_ratio)
  image = np.zeros((1052, 1914, 3), np.uint8)
  label = np.zeros((1052, 1914), np.uint8)
  resized, _ = pipeline.resize_train(image, label, transform.scale, transform.keep_ratio)
  assert resized.shape[:2] == (640, 1280) == tuple(config.data.crop_size)
