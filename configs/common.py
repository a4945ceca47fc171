"""Shared config pieces: the argument parser and the base config every run starts from.

The base holds the reference code's numbers (confeti_spec.md §1, §6, §7); a
config file changes only what differs for its setting.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'k1=v1,k2=v2' (the part after ':' in --config=file.py:ARG) over typed defaults.

  Unknown keys are an error naming the key and the allowed ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; allowed: {sorted(defaults)}")
    kind = type(defaults[key])
    values[key] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
  return ml_collections.ConfigDict(values)


def base_config():
  """Every key a training config has, with the reference values."""
  c = ml_collections.ConfigDict()
  c.seed = 114  # confeti_spec.md §6
  c.num_classes = 19
  c.class_set = "cityscapes19"

  c.method = method_config("source_only")

  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet101", width=1.0, dtype="float32", aspp_dilations=(6, 12, 18, 24),
  ))

  c.data = ml_collections.ConfigDict()
  c.data.source = ml_collections.ConfigDict(dict(kind="gta5", root="", scale=(1280, 720)))
  c.data.target = ml_collections.ConfigDict(dict(kind="cityscapes", root="", scale=(1280, 640)))
  c.data.crop_size = (512, 512)
  c.data.cat_max_ratio = 0.75  # source only; targets are never label-checked
  c.data.flip_prob = 0.5
  c.data.num_workers = 2
  c.data.toy = ml_collections.ConfigDict(dict(
      enabled=False, cache_dir="", seed=0, shift=0.5,
      num_source=300, num_source_val=60, num_target=300, num_val=60,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=80_000, batch_size=2, log_every_steps=50,
      checkpoint_every_steps=4000, keep_checkpoints=2,
      stop_at_step=0,  # >0: save and stop cleanly after this step (time-limited jobs)
  ))

  # AdamW 6e-5, heads x10, wd 0.01 on all params, poly(1.0) with linear warm-up 1500.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-5, head_lr_mult=10.0, weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8, poly_power=1.0, min_lr=0.0,
      warmup_steps=1500, warmup_ratio=1e-6,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=4000, dataset="target", mode="whole", resize=False, scale=(2048, 1024),
      crop_size=(512, 512), stride=(341, 341), batch_size=1,
  ))
  return c


def method_config(name):
  """The `method` sub-config for `name`: its switches with the reference defaults.

  Each method adds its own builder to `_METHOD_DEFAULTS`; a config selects one with
  `config.method = common.method_config(args.method)`.
  """
  if name not in _METHOD_DEFAULTS:
    raise ValueError(f"Unknown method {name!r}; available: {sorted(_METHOD_DEFAULTS)}")
  return ml_collections.ConfigDict(dict(name=name, **_METHOD_DEFAULTS[name]()))


def _source_only():
  return {}


_METHOD_DEFAULTS = {
    "source_only": _source_only,
}
