"""Test set-up: 8 simulated CPU devices, absl flags parsed (grain reads them)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_platforms", "cpu")
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
