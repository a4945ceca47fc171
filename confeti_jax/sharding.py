"""Mesh and shardings: data parallel over every device of every process.

The state is replicated and the batch is split along its leading axis over the
'data' mesh axis. Under jit this makes BatchNorm statistics global over the
mesh (sync-BN semantics) with no code in the models.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices=None):
  """A 1-D ('data',) mesh over all (or the first `num_devices`) devices, Auto axes.

  Axis types are set explicitly: jax >= 0.9 defaults to Explicit axes, whose
  sharding-in-types semantics this code base does not use.
  """
  devices = jax.devices()
  if num_devices is not None:
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch, mesh, what="train.batch_size"):
  """Fails early, naming the key, when the batch cannot be split over the devices."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
        f"set --config.{what} to a multiple of {n}.")
  if global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} is not divisible by {jax.process_count()} processes.")


def to_global(batch, mesh):
  """Process-local numpy batch (nested dict) -> global jax.Arrays sharded over 'data'.

  Each process passes its own slice (batch // process_count rows); the global array
  is their concatenation in process order, which is how `pipeline` shards the data.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def process_sum(value):
  """Sum of a host-side integer over all processes (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return int(value)
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
  return int(np.sum(gathered))
