"""Method registry: `method.name` in a config -> the class that builds its state and step.

Entries are 'module:Class' strings imported on first use, so a method's module
(and what it imports) loads only when a config asks for it.
"""

import importlib

METHODS = {
    "source_only": "confeti_jax.methods.source_only:SourceOnly",
    "dacs": "confeti_jax.methods.dacs:DACS",
    "confeti": "confeti_jax.methods.confeti:CONFETI",
    "minent": "confeti_jax.methods.minent:MinEnt",
    "cfcontra": "confeti_jax.methods.cfcontra:CFContra",
    "cut": "confeti_jax.methods.cut:CUTTraining",
}


def method_class(name):
  if name not in METHODS:
    raise ValueError(f"Unknown method.name={name!r}; available: {sorted(METHODS)}.")
  module, _, cls = METHODS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def build(config):
  """The method named by `config.method.name`, built from the config."""
  return method_class(config.method.name)(config)
