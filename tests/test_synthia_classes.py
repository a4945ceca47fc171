"""synthia2cs.py: the feature distance's thing classes are the same classes in either head.

The list is written in 19-class trainIds (configs/common.py); the 16-class SYNTHIA head
numbers its classes differently (person is 10), so the config translates it.
"""

import os
import sys

import pytest

from confeti_jax import stages
from confeti_jax.data import labels

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import synthia2cs  # noqa: E402

THINGS_19 = [labels.CLASSES[c] for c in labels.FD_THING_CLASSES]


@pytest.mark.parametrize("classes", [16, 19])
def test_thing_classes_name_the_same_classes_in_every_stage(classes, tmp_path):
  config = synthia2cs.get_config(f"classes={classes}")
  names = labels.class_set(config.class_set)[0]
  expected = [n for n in THINGS_19 if n in names]
  assert "person" in expected and len(expected) == (8 if classes == 16 else 10)
  stage_configs = [c for _, c, _ in stages.plan_for(config, str(tmp_path))]
  for c in [config, *stage_configs]:
    assert [names[i] for i in c.method.fd_classes] == expected
    assert max(c.method.fd_classes) < c.num_classes


def test_methods_without_a_feature_distance_are_left_alone():
  config = synthia2cs.get_config("classes=16,method=source_only")
  assert "fd_classes" not in config.method
