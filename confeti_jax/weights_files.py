"""Weights files -> flat {torch key: numpy array} state dicts; weights.py maps the names.

Kept apart so reading stays numpy-only and small: `.npz` (from `scripts/convert_weights.py`)
and `.safetensors` (timm) need numpy alone; a `.pth` needs torch, else the error names the
one-off conversion command.
"""

import functools
import json
import os

import numpy as np

CONVERT_COMMAND = "python scripts/convert_weights.py IN.pth OUT.npz"


class WeightsError(ValueError):
  """A weights file cannot be read or does not fit the model."""


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
  """{name: array} of a .safetensors file (8-byte header size, JSON header, raw data)."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise WeightsError(f"{path!r} is too short to be a .safetensors file.")
  size = int.from_bytes(data[:8], "little")
  try:
    header = json.loads(data[8:8 + size])
  except ValueError as e:
    raise WeightsError(f"{path!r} has no valid safetensors header ({e}).") from e
  body, out = memoryview(data)[8 + size:], {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    raw = body[begin:end]
    if info["dtype"] == "BF16":  # numpy has no bfloat16: widen the bits to float32
      bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
      array = bits.view(np.float32)
    elif info["dtype"] in _SAFETENSORS_DTYPES:
      array = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]])
    else:
      raise WeightsError(f"{path!r}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    out[name] = array.reshape(info["shape"]).copy()
  return out


def unwrap_checkpoint(obj):
  """The state dict inside a saved object: mmcv's {"state_dict": ...}, {"model": ...}, ..."""
  for key in ("state_dict", "model", "params"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


def torch_to_numpy(state_dict):
  """{key: tensor} -> {key: numpy}; bfloat16/half become float32, non-tensors are dropped."""
  import torch

  out = {}
  for key, value in state_dict.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
      out[key] = value.numpy()
  return out


def load_state_dict(path):
  """{torch key: numpy array} from .npz, .safetensors, or (with torch installed) .pth.

  Cached per (path, size, mtime): state init reads the same file more than once
  (eval_shape, then the jitted init). Treat the result as read-only.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f"Weights file {path!r} does not exist. Give a local path (nothing is "
                       "downloaded); convert a .pth once with `" + CONVERT_COMMAND + "`.")
  stat = os.stat(path)
  return _load_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_cached(path, size, mtime_ns):
  del size, mtime_ns  # cache key only
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  try:
    import torch
  except ImportError as e:
    raise WeightsError(
        f"Reading {path!r} needs torch, which is not installed (it is not a runtime "
        f"dependency). On any machine with torch run `{CONVERT_COMMAND}` and pass the .npz."
    ) from e
  return torch_to_numpy(unwrap_checkpoint(torch.load(path, map_location="cpu",
                                                     weights_only=True)))
