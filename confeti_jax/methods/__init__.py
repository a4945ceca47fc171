"""Method registry: `method.name` in a config -> the class that builds its state and step."""

from confeti_jax.methods import source_only

METHODS = {
    "source_only": source_only.SourceOnly,
}


def build(config):
  """The method named by `config.method.name`, built from the config."""
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f"Unknown method.name={name!r}; available: {sorted(METHODS)}.")
  return METHODS[name](config)
