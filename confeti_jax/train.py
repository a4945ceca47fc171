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

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from confeti_jax import checkpoint, evaluate, finite, methods, panels, run_config, sharding, writer
from confeti_jax.data import pipeline
from confeti_jax.models.conv import compiler_options

# Bookkeeping the loaders add to a batch (sources.SkipCorrupt, rcs): host-side only.
_HOST_KEYS = ("skipped", "rcs_class")


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# XLA:CPU options for a program that runs once: LLVM without optimisation compiles the
# toy CONFETI initialisation in 6.5 s instead of 39 s and runs it in 0.3 s instead of
# 0.2 s. The initial values may differ from an optimised build's in the last bit (6e-8
# measured: FMA contraction), never more.
RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def create_state(method, config, mesh):
  """Initialises the state directly replicated on the mesh (eval_shape -> jit init)."""
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  abstract = jax.eval_shape(method.init_state, init_key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  cpu = jax.default_backend() == "cpu"
  init = jax.jit(method.init_state, out_shardings=shardings,
                 compiler_options={**compiler_options(), **RUN_ONCE_CPU_OPTIONS} if cpu else None)
  state = init(init_key)
  return state, abstract_with_shardings(abstract, shardings), shardings


def make_train_step(method, config, mesh, state_shardings):
  """The method's pure step, jitted once with shardings and the state donated.

  Returns (state, metrics), plus the image panel (panels.py) as a third output when
  the method draws one (`train.image_every_steps > 0`).
  """
  base_key = jax.random.key(config.seed)
  with_panel = bool(getattr(method, "panel_images", False))

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state.step)
    new_state, metrics = method.train_step(state, batch, key)
    metrics, panel = panels.pop(metrics)
    if with_panel and panel is None:
      raise ValueError(f"{type(method).__name__}.train_step drew no panel although "
                       "train.image_every_steps > 0")
    metrics = {**metrics, **finite.step_flags(new_state, metrics)}
    return (new_state, metrics, panel) if with_panel else (new_state, metrics)

  replicated = sharding.replicated(mesh)

  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, replicated) + ((replicated,) if with_panel else ()),
      donate_argnums=0, compiler_options=compiler_options())


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


def restore(ckpt, config, abstract_state, iterators):
  """(state or None, loop counters) from the workdir's checkpoints.

  The newest readable step is used (unreadable newer ones are moved aside). With
  train.restore_step=N > 0 the run restarts from step N exactly and the newer steps are
  moved to checkpoints_set_aside/; checkpoints saved after that restart carry
  "restarted_from": N, so rerunning the same command later resumes them instead of
  going back to N again.
  """
  wanted = int(config.train.get("restore_step", 0))
  kept = ckpt.all_steps()
  if not kept:
    if wanted > 0:
      raise checkpoint.NoIntactCheckpointError(
          f"train.restore_step={wanted}, but {ckpt.directory} holds no checkpoint. Drop "
          "--config.train.restore_step to start this run.")
    return None, {}
  latest = max(kept)
  if wanted > 0 and _restarted_from(ckpt, latest) != wanted:
    if wanted not in kept:
      raise checkpoint.NoIntactCheckpointError(
          f"train.restore_step={wanted} is not among the checkpoints kept in "
          f"{ckpt.directory} (steps {sorted(kept)}). Pass one of them.")
    step, state, loop = ckpt.restore_first_intact(abstract_state, iterators, steps=[wanted],
                                                  move_unreadable=False)
    moved = ckpt.set_aside_after(step)
    logging.warning("Restarted from the checkpoint of step %d (train.restore_step); newer "
                    "steps %s were moved to %s.", step, moved, checkpoint.SET_ASIDE_DIR)
    return state, {**loop, "restarted_from": wanted}
  step, state, loop = ckpt.restore_first_intact(abstract_state, iterators)
  logging.info("Resuming from the checkpoint of step %d in %s", step, ckpt.directory)
  return state, loop


def _restarted_from(ckpt, step):
  try:
    return ckpt.restore_loop(step).get("restarted_from")
  except Exception:  # noqa: BLE001 - an unreadable step: restore_first_intact reports it
    return None


def _divergence_help(ckpt, workdir):
  """The kept checkpoints with the loss logged at each, and how to restart from one."""
  rows = writer.read_rows(os.path.join(workdir, writer.METRICS_FILE))
  try:
    kept = sorted(ckpt.all_steps())
  except Exception:  # noqa: BLE001 - listing a broken disk
    kept = []
  if not kept:
    return "No checkpoint is kept; the run starts afresh when rerun."
  listed = ", ".join(f"step {s} (loss {_loss_text(writer.loss_at(rows, s))})" for s in kept)
  return (f"Kept checkpoints: {listed}. If the loss had already grown at the newest, restart "
          f"from an earlier one with --config.train.restore_step=STEP (newer steps are moved "
          f"to {checkpoint.SET_ASIDE_DIR}/).")


def _loss_text(value):
  return "not logged" if value is None else f"{value:.4g}"


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  The log lines also go to workdir/train.log, with the full config at the head of
  each start (the console gets main.py's one-line summary).
  Returns the final state (useful to tests and scripts).
  """
  workdir = os.path.abspath(workdir)
  with writer.run_log(workdir, dump=f"Config:\n{config}"):
    return _train(config, workdir)


def _train(config, workdir):
  # -- set-up ------------------------------------------------------------------
  config_changes = run_config.check(config, workdir)  # refuses another model or method
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
  restored, loop_counters = restore(ckpt, config, abstract_state,
                                    {f"{k}_iter": v for k, v in iterators.items()})
  if restored is not None:
    del state  # the fresh buffers (the restored ones were read onto their shardings)
    state = restored
  first_step = int(jax.device_get(state.step))
  total_steps = int(config.train.steps)

  evaluator = evaluate.Evaluator(config, method, mesh, workdir)  # checks the val split
  # Every start-up check passed: only now does the workdir take this config.
  run_config.record(config, workdir, config_changes, first_step)
  metric_writer = writer.MetricWriter(workdir, total_steps=total_steps, resume_step=first_step)
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
    loop = {"data_skipped_total": data_skipped_total()}
    if "restarted_from" in loop_counters:
      loop["restarted_from"] = loop_counters["restarted_from"]
    ckpt.save(step, state, {f"{k}_iter": v for k, v in iterators.items()}, loop=loop)
    chrono.resume()

  def evaluate_now(step):
    """Evaluates; a failure (unreadable split, full disk for the report) costs only this
    evaluation, as the step's checkpoint is already saved or being saved."""
    chrono.pause()
    try:
      result = evaluator.run(method.inference_variables(state), step)
      metric_writer.write_eval(step, result, prefix=evaluator.prefix)
    except Exception:  # noqa: BLE001 - any failure of evaluation or its reports
      logging.exception("Evaluation at step %d failed; training goes on (the checkpoint of "
                        "this step is saved). The error:", step)
    chrono.resume()

  # -- loop --------------------------------------------------------------------
  log_every = max(1, int(config.train.log_every_steps))
  ckpt_every = max(1, int(config.train.checkpoint_every_steps))
  eval_every = int(config.eval.every_steps)
  image_every = int(config.train.get("image_every_steps", 0))
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
          state, metrics, *panel = train_step(state, batch)
        if step == first_step:
          chrono.start(step)  # the first call compiled: leave that out of steps/s and ETA
        step += 1
        if panel and image_every > 0 and step % image_every == 0:
          with chrono.paused():
            panels.write(metric_writer, step, panel[0], workdir, evaluator.class_names)
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
                f"{finite.describe(flags, step, window)} {error} "
                f"{_divergence_help(ckpt, workdir)}") from None
        if checkpoint_now:
          save(step)  # before evaluating: a failed evaluation must not cost the step
        if eval_every > 0 and (step % eval_every == 0 or last):
          evaluate_now(step)
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
