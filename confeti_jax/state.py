"""The one training pytree, per-network optimiser groups, and the reference schedule.

Everything that changes during training lives in `TrainState`, so one jitted step
maps state -> state, one orbax item checkpoints it, and one sharding rule places
it. Networks a method does not use stay `None` (an empty pytree).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class OptGroup:
  """Parameters of one network with the state of its own optax optimiser."""

  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx):
    return cls(params=params, opt_state=tx.init(params), tx=tx)

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state)


@struct.dataclass
class TrainState:
  """All mutable training state (DESIGN.md "One pytree").

  Attributes:
    step: iteration counter (int32 scalar), the reference's `local_iter`.
    seg: the student segmentor (backbone, DeepLabV2 head, auxiliary heads).
    batch_stats: the student's BatchNorm running statistics.
    teacher: EMA teacher variables {'params', 'batch_stats'} (self-training methods).
    imnet: frozen ImageNet backbone variables for the feature distance.
    gen, disc, patch_mlp: CUT generator, discriminator and patch MLPs.
    protos: class prototypes and their update counts.
    banks: class-centre memory banks (CFContra).
  """

  step: jax.Array
  seg: OptGroup
  batch_stats: Any
  teacher: Any = None
  imnet: Any = None
  gen: OptGroup | None = None
  disc: OptGroup | None = None
  patch_mlp: OptGroup | None = None
  protos: Any = None
  banks: Any = None


def poly_warmup_schedule(base_lr, *, total_steps, power=1.0, min_lr=0.0, warmup_steps=0,
                         warmup_ratio=1e-6):
  """mmcv 1.3.7 `poly` LR with linear warm-up, by iteration (confeti_spec.md §6).

  lr_poly(t) = (base - min) * (1 - t/T)^power + min; for t < W the warm-up scales
  it by 1 - (1 - t/W)(1 - ratio), as mmcv's `get_warmup_lr` applies it to the
  regular (already decayed) rate.
  """

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    # Written as (T - t) / T and ratio + (t / W)(1 - ratio): the same numbers as
    # mmcv's expressions without float32 cancellation near t = T and t = 0.
    coeff = jnp.maximum((float(total_steps) - t) / float(total_steps), 0.0) ** power
    lr = (base_lr - min_lr) * coeff + min_lr
    if warmup_steps > 0:
      warm = warmup_ratio + (t / float(warmup_steps)) * (1.0 - warmup_ratio)
      lr = jnp.where(t < warmup_steps, lr * warm, lr)
    return lr

  return schedule


def head_or_backbone(params):
  """Labels each leaf 'backbone' or 'head' by its top-level module name.

  mmcv's `custom_keys={'head': lr_mult 10}` matches every module outside the
  backbone in the reference (DLV2 head, CAM, projection, phi), so the rule is
  simply "not under backbone".
  """
  return {name: jax.tree.map(lambda _, n=name: "backbone" if n == "backbone" else "head", sub)
          for name, sub in params.items()}


def segmentor_schedules(optim_cfg, total_steps):
  """The per-group learning-rate schedules: {'backbone': fn, 'head': fn}."""
  def make(mult):
    return poly_warmup_schedule(
        optim_cfg.lr * mult, total_steps=total_steps, power=optim_cfg.poly_power,
        min_lr=optim_cfg.min_lr * mult, warmup_steps=optim_cfg.warmup_steps,
        warmup_ratio=optim_cfg.warmup_ratio)
  return {"backbone": make(1.0), "head": make(optim_cfg.head_lr_mult)}


def segmentor_optimizer(optim_cfg, total_steps):
  """AdamW over the segmentor with heads at x`head_lr_mult`, weight decay on all params."""
  if optim_cfg.name != "adamw":
    raise ValueError(f"optim.name={optim_cfg.name!r} is not supported here; use 'adamw'.")
  schedules = segmentor_schedules(optim_cfg, total_steps)
  groups = {
      label: optax.adamw(fn, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                         weight_decay=optim_cfg.weight_decay)
      for label, fn in schedules.items()
  }
  return optax.multi_transform(groups, head_or_backbone)


def copy_tree(tree):
  """A fresh-buffer copy (a donated state must not alias the same buffer twice)."""
  return jax.tree.map(jnp.copy, tree)
