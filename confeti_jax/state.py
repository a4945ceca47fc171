"""The one training pytree, per-network optimiser groups, and the reference schedule.

Everything that changes during training lives in `TrainState`, so one jitted step
maps state -> state, one orbax item checkpoints it, and one sharding rule places
it. Networks a method does not use stay `None` (an empty pytree).
"""

import functools
import re
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
  """All mutable training state (docs/design.md "One pytree").

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
  """mmcv 1.3.7 `poly` LR with linear warm-up, by iteration (docs/reference_code.md §6).

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
  """The per-group learning-rate schedules: {'backbone': fn, 'head': fn}.

  The poly decay runs over `optim.schedule_steps` when a config sets it (> 0): ADVENT
  decays over MAX_ITERS=250k but stops at 120k, so its rate never reaches 0.
  """
  schedule_steps = int(optim_cfg.get("schedule_steps", 0) or 0) or total_steps

  def make(mult):
    return poly_warmup_schedule(
        optim_cfg.lr * mult, total_steps=schedule_steps, power=optim_cfg.poly_power,
        min_lr=optim_cfg.min_lr * mult, warmup_steps=optim_cfg.warmup_steps,
        warmup_ratio=optim_cfg.warmup_ratio)
  return {"backbone": make(1.0), "head": make(optim_cfg.head_lr_mult)}


def _is_backbone_batch_norm(path):
  """A leaf of a BatchNorm under 'backbone' (module names stem_bnK, bnK, downsample_bn)."""
  names = [str(getattr(k, "key", k)) for k in path]
  return names[0] == "backbone" and any(re.fullmatch(r"(.*_)?bn\d*", n) for n in names[1:-1])


def decay_mask(params):
  """True for every leaf but those of LayerNorms (a module named 'norm' or 'normN')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(re.fullmatch(r"norm\d*", str(getattr(k, "key", k)))
                              for k in path[:-1]), params)


def segmentor_labels(params, *, freeze_bn=False, frozen=()):
  """`head_or_backbone` with 'frozen' for frozen BN affine params and frozen modules."""
  def relabel(path, label):
    if str(getattr(path[0], "key", path[0])) in frozen:
      return "frozen"
    return "frozen" if freeze_bn and _is_backbone_batch_norm(path) else label
  return jax.tree_util.tree_map_with_path(relabel, head_or_backbone(params))


def segmentor_optimizer(optim_cfg, total_steps, *, frozen=()):
  """The segmentor's optimiser, heads at x`head_lr_mult`: AdamW (reference) or SGD (ADVENT).

  'adamw': weight decay on all params, or with `optim.norm_decay=False` on all but
  LayerNorm parameters (modules named norm / normN; DAFormer's paramwise `norm`
  decay_mult 0, which matches MiT's LayerNorms and not the head's BatchNorms).
  'sgd': torch.optim.SGD as ADVENT uses it, the weight decay added to the gradient before
  the momentum (coupled), momentum without dampening or Nesterov. `optim.freeze_bn`
  leaves the backbone's BatchNorm scale/bias untouched (ADVENT sets requires_grad=False
  on them: no update and no decay); `frozen` names top-level modules that are never
  trained (CFContra's projection head).
  """
  if optim_cfg.name == "adamw":
    mask = None if optim_cfg.get("norm_decay", True) else decay_mask
    make = lambda fn: optax.adamw(fn, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                  weight_decay=optim_cfg.weight_decay, mask=mask)
  elif optim_cfg.name == "sgd":
    make = lambda fn: optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay),
        optax.sgd(fn, momentum=float(optim_cfg.get("momentum", 0.9))))
  else:
    raise ValueError(f"optim.name={optim_cfg.name!r} is not supported; use 'adamw' or 'sgd'.")
  groups = {label: make(fn) for label, fn in segmentor_schedules(optim_cfg, total_steps).items()}
  freeze_bn = bool(optim_cfg.get("freeze_bn", False))
  if not (freeze_bn or frozen):
    return optax.multi_transform(groups, head_or_backbone)
  groups["frozen"] = optax.set_to_zero()
  return optax.multi_transform(
      groups, functools.partial(segmentor_labels, freeze_bn=freeze_bn, frozen=tuple(frozen)))


def copy_tree(tree):
  """A fresh-buffer copy (a donated state must not alias the same buffer twice)."""
  return jax.tree.map(jnp.copy, tree)


def ema_alpha(step, alpha=0.999):
  """Mean-teacher rate alpha_t = min(1 - 1/(t+1), alpha) (DAFormer `_update_ema`,
  docs/reference_code.md §2.1)."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), alpha)


def ema_update(teacher_params, student_params, step, alpha=0.999):
  """teacher <- alpha_t * teacher + (1 - alpha_t) * student, leaf by leaf.

  At t = 0 alpha_t = 0, so the teacher becomes an exact copy of the student: the
  reference's iteration-0 initialisation needs no separate branch. The early ramp makes
  the teacher a running average of all student iterates until t = 1/(1 - alpha).
  """
  a = ema_alpha(step, alpha)
  return jax.tree.map(
      lambda t, s: (a * t.astype(jnp.float32) + (1.0 - a) * s.astype(jnp.float32)).astype(t.dtype),
      teacher_params, student_params)
