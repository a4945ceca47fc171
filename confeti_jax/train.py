"""The one generic training loop. Sections: set-up -> mesh -> data -> state -> step ->
restore -> loop (log, evaluate, checkpoint, preemption) -> shutdown.

Everything method-specific sits behind `methods.build(config)`: its state and its
pure `train_step(state, batch, key)`. The step is jitted once, with explicit
shardings and the state donated; randomness is `fold_in(key(seed), step)`, so a
resumed run draws exactly what the uninterrupted run would have.

Multi-host: every process runs this same loop on its slice of each global batch
(`pipeline` shards by process, `sharding.to_global` assembles); all decisions to log,
evaluate, save or stop are taken at the same step on every process, because each of
them ends in a collective.
"""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from confeti_jax import checkpoint, evaluate, finite, methods, sharding, writer
from confeti_jax.data import pipeline

# Keys whose change makes an existing checkpoint unusable for this config; the model's
# compute settings are not among them (float32 parameters either way).
_STRUCTURAL_KEYS = ("method", "model", "num_classes")
_COMPUTE_ONLY_MODEL_KEYS = ("dtype", "remat")
# Where a stage reads its predecessor's weights: derived from the workdir, so moving a
# workdir must not make its own runs unresumable.
_LOCATION_METHOD_KEYS = ("cut_from",)
# Bookkeeping the loaders add to a batch (sources.SkipCorrupt, rcs): host-side only.
_HOST_KEYS = ("skipped", "rcs_class")


def _structural(config_json, key):
  value = config_json.get(key)
  ignored = {"model": _COMPUTE_ONLY_MODEL_KEYS, "method": _LOCATION_METHOD_KEYS}.get(key, ())
  if isinstance(value, dict):
    value = {k: v for k, v in value.items() if k not in ignored}
  return value


def _leaf_diffs(previous, current, prefix):
  """['key: saved A, now B', ...] over the dotted leaves where two config trees differ."""
  if not (isinstance(previous, dict) and isinstance(current, dict)):
    return [] if previous == current else [f"{prefix}: saved {previous!r}, now {current!r}"]
  return [d for k in sorted(set(previous) | set(current), key=str)
          for d in _leaf_diffs(previous.get(k), current.get(k), f"{prefix}.{k}")]


def _check_or_write_config(config, workdir):
  """Writes config.json; on resume refuses a config whose model/method differ."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    diffs = [d for k in _STRUCTURAL_KEYS
             for d in _leaf_diffs(_structural(previous, k), _structural(current, k), k)]
    if diffs:
      detail = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
      raise ValueError(
          f"The workdir {workdir} holds a run of another configuration ({detail}). "
          "Use a new --workdir for this config, or pass the settings of the saved run.")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_state(method, config, mesh):
  """Initialises the state directly replicated on the mesh (eval_shape -> jit init)."""
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  abstract = jax.eval_shape(method.init_state, init_key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(method.init_state, out_shardings=shardings)(init_key)
  return state, abstract_with_shardings(abstract, shardings), shardings


def make_train_step(method, config, mesh, state_shardings):
  """The method's pure step, jitted once with shardings and the state donated."""
  base_key = jax.random.key(config.seed)

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state.step)
    new_state, metrics = method.train_step(state, batch, key)
    return new_state, {**metrics, **finite.step_flags(new_state, metrics)}

  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)


class _Preemption:
  """SIGTERM sets a flag; the loop finishes the step, saves and exits cleanly.

  Only without jax.distributed: there the coordination service catches SIGTERM itself
  and `Checkpointer.reached_preemption` turns it into one agreed step on every process.
  A Python handler would replace that C++ one (checked on jax 0.10.2: the sync point
  then never fires) and let each process stop at a step of its own, hanging the rest.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.distributed.is_initialized():
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing this step, saving and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def next_global_batch(iterators, mesh):
  """(global batch of every domain, files this process's loaders skipped as corrupt).

  The loaders' bookkeeping keys stay on the host: they are no model input, and the
  step's signature then does not depend on whether rare-class sampling is on.
  """
  local, skipped = {}, 0
  for name, it in iterators.items():
    batch = dict(next(it))
    skipped += int(np.sum(batch.get("skipped", 0)))
    local[name] = {k: v for k, v in batch.items() if k not in _HOST_KEYS}
  return sharding.to_global(local, mesh), skipped


def _close(ckpt, failing):
  """Closes the checkpointer; while another error propagates, only logs a save failure."""
  if not failing:
    ckpt.close()
    return
  try:
    ckpt.close()
  except checkpoint.CheckpointError as error:
    logging.error("%s", error)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  Returns the final state (useful to tests and scripts).
  """
  # -- set-up ------------------------------------------------------------------
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_or_write_config(config, workdir)
  logging.info("Process %d/%d with %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())

  # -- mesh --------------------------------------------------------------------
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)

  # -- data --------------------------------------------------------------------
  src_iter, tgt_iter = pipeline.make_train_iterators(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  iterators = {"source": src_iter, "target": tgt_iter}

  # -- state -------------------------------------------------------------------
  method = methods.build(config)
  state, abstract_state, state_shardings = create_state(method, config, mesh)
  train_step = make_train_step(method, config, mesh, state_shardings)

  # -- restore -----------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints, cleanup=True)
  latest = ckpt.latest_step()
  loop_counters = {}
  if latest is not None:
    logging.info("Resuming from the checkpoint of step %d in %s", latest, ckpt.directory)
    del state  # free the fresh buffers before reading the saved ones
    state = ckpt.restore(latest, abstract_state,
                         {f"{k}_iter": v for k, v in iterators.items()})
    loop_counters = ckpt.restore_loop(latest)
  first_step = int(jax.device_get(state.step))
  total_steps = int(config.train.steps)

  evaluator = evaluate.Evaluator(config, method, mesh, workdir)
  metric_writer = writer.MetricWriter(workdir, total_steps=total_steps)
  chrono = metric_writer.chrono
  chrono.start(first_step)

  # Corrupt files the loaders passed over since the run began: all processes' total as of
  # the last report, and this process's skips since then.
  skipped_total = int(loop_counters.get("data_skipped_total", 0))
  skipped_here = 0

  def data_skipped_total():
    """Folds in every process's new skips: a collective, called at the same steps by all."""
    nonlocal skipped_total, skipped_here
    skipped_total += sharding.process_sum(skipped_here)
    skipped_here = 0
    return skipped_total

  def save(step):
    chrono.pause()
    ckpt.save(step, state, {f"{k}_iter": v for k, v in iterators.items()},
              loop={"data_skipped_total": data_skipped_total()})
    chrono.resume()

  # -- loop --------------------------------------------------------------------
  log_every = max(1, int(config.train.log_every_steps))
  ckpt_every = max(1, int(config.train.checkpoint_every_steps))
  eval_every = int(config.eval.every_steps)
  stop_at = int(config.train.stop_at_step)
  summed, count = None, 0
  step = first_step
  failing = True
  try:
    with _Preemption() as preemption, metric_writer:
      while step < total_steps:
        batch, skipped = next_global_batch(iterators, mesh)
        skipped_here += skipped
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = train_step(state, batch)
        step += 1
        summed = metrics if summed is None else jax.tree.map(jnp.add, summed, metrics)
        count += 1

        last = step == total_steps
        stopping = not last and (preemption.requested or 0 < stop_at <= step)
        checkpoint_now = last or step % ckpt_every == 0 or stopping
        if step % log_every == 0 or checkpoint_now:
          # Host sync only here: averaged metrics since the last report.
          scalars = {k: float(v) / count for k, v in jax.device_get(summed).items()}
          scalars["data_skipped_total"] = data_skipped_total()
          scalars, flags = finite.split(scalars)
          window, summed, count = count, None, 0
          try:
            finite.check(flags, step)
            metric_writer.report(step, scalars)  # raises on NaN/inf before anything is saved
          except writer.NonFiniteLossError as error:
            raise writer.NonFiniteLossError(
                f"{finite.describe(flags, step, window)} {error}") from None
        if eval_every > 0 and (step % eval_every == 0 or last):
          chrono.pause()
          evaluator.run(method.inference_variables(state), step)
          chrono.resume()
        if checkpoint_now:
          save(step)
        if stopping or ckpt.reached_preemption(step):
          if not checkpoint_now:
            save(step)
          logging.warning("Stopped at step %d (preemption or train.stop_at_step); rerun the "
                          "same command to resume.", step)
          break
    failing = False
  finally:
    _close(ckpt, failing)  # waits for the save in flight, also on errors
  logging.info("Finished at step %d (%s)", step, workdir)
  return state
