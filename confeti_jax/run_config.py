"""A workdir's configuration: refused when it cannot resume, and a history of changes.

`config.json` is the configuration of the run in the workdir. A start with another
model, method or class count is refused (its checkpoints would not fit). Any other
change (learning rate, batch size, steps, ...) is allowed, printed as a warning, and
appended to `config_history.jsonl` with the step it took effect at, so the run's
history survives the overwrite. `record` is called only once the start-up checks
(data, checkpoint restore) have passed: a start that failed them leaves the workdir as
it was, and a corrected config is then not refused for a run that never trained.
"""

import datetime
import json
import os

import jax
from absl import logging

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Keys whose change makes an existing checkpoint unusable for this config; the model's
# compute settings are not among them (float32 parameters either way).
_STRUCTURAL_KEYS = ("method", "model", "num_classes")
_COMPUTE_ONLY_MODEL_KEYS = ("dtype", "remat")
# Where a stage reads its predecessor's weights: derived from the workdir, so moving a
# workdir must not make its own runs unresumable.
_LOCATION_METHOD_KEYS = ("cut_from",)


def _structural(config_json, key):
  value = config_json.get(key)
  ignored = {"model": _COMPUTE_ONLY_MODEL_KEYS, "method": _LOCATION_METHOD_KEYS}.get(key, ())
  if isinstance(value, dict):
    value = {k: v for k, v in value.items() if k not in ignored}
  return value


def leaf_diffs(previous, current, prefix=""):
  """['key: saved A, now B', ...] over the dotted leaves where two config trees differ."""
  if not (isinstance(previous, dict) and isinstance(current, dict)):
    return [] if previous == current else [f"{prefix}: saved {previous!r}, now {current!r}"]
  dotted = lambda k: f"{prefix}.{k}" if prefix else str(k)
  return [d for k in sorted(set(previous) | set(current), key=str)
          for d in leaf_diffs(previous.get(k), current.get(k), dotted(k))]


def _summary(diffs, limit=8):
  return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more"
                                     if len(diffs) > limit else "")


def check(config, workdir):
  """The changes against the workdir's saved config ([] for a new workdir).

  Raises ValueError naming the keys when the model, method or class count differ.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    previous = json.load(f)
  current = json.loads(config.to_json_best_effort())
  structural = [d for k in _STRUCTURAL_KEYS
                for d in leaf_diffs(_structural(previous, k), _structural(current, k), k)]
  if structural:
    raise ValueError(
        f"The workdir {workdir} holds a run of another configuration "
        f"({_summary(structural)}). Use a new --workdir for this config, or pass the "
        "settings of the saved run.")
  changes = leaf_diffs(previous, current)
  if changes:
    logging.warning("Resuming %s with a changed configuration: %s", workdir, _summary(changes, 20))
  return changes


def record(config, workdir, changes, step):
  """Writes config.json and appends this start (its step and changes) to the history."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "step": int(step), "changes": list(changes)}
  if not os.path.exists(path):
    entry["event"] = "created"
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(entry) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def summary(config, workdir):
  """One console line naming the run; the full config is in workdir's config.json and
  train.log (the console used to get a 90-line dump at every start)."""
  model = config.model
  width = float(model.get("width", 1.0) or 1.0)
  backbone = str(model.backbone) + (f"x{width:g}" if width != 1.0 else "")
  stage = f" stage {config.method.stage}" if "stage" in config.method else ""
  data = config.data
  source = "toy source" if data.toy.enabled else data.source.kind
  target = "toy target" if data.toy.enabled else data.target.kind
  crop = "x".join(str(int(s)) for s in data.crop_size)
  return (f"Run: {config.method.name}{stage}, {backbone}, {source} -> {target}, crop {crop}, "
          f"{int(config.train.steps)} steps of batch {int(config.train.batch_size)}, seed "
          f"{int(config.seed)} (full config: {os.path.join(workdir, CONFIG_FILE)} and "
          f"train.log)")
