"""scripts/benchmark.py: sweep parsing, the timed figures, compile-only and the JSON file."""

import json
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import benchmark  # noqa: E402

from confeti_jax import methods  # noqa: E402
from configs import toy  # noqa: E402


def tiny_config():
  config = toy.get_config("method=source_only,tiny=1")
  config.train.batch_size = 8  # one image per simulated device
  return config


def test_sweep_is_the_product_of_its_axes_with_typed_values():
  config = tiny_config()
  points = benchmark.parse_sweep("batch_size=8,16;dtype=float32,bfloat16;remat=none,layer3+layer4",
                                 config)
  assert len(points) == 8
  assert points[0] == {"train.batch_size": 8, "model.dtype": "float32", "model.remat": ""}
  assert points[-1] == {"train.batch_size": 16, "model.dtype": "bfloat16",
                        "model.remat": "layer3,layer4"}
  assert benchmark.parse_sweep("", config) == [{}]
  default = benchmark.parse_sweep("default", config)
  assert {p["train.batch_size"] for p in default} == {8, 16} and len(default) == 8
  # Overrides land on a copy; the locked original is untouched.
  point = benchmark.with_overrides(config, points[-1])
  assert point.model.remat == "layer3,layer4" and config.model.remat == ""
  assert benchmark.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert benchmark.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
  assert benchmark.peak_bf16_tflops("cpu") is None


def test_timed_and_compile_only_points_agree_on_the_compiled_figures(tmp_path):
  config = tiny_config()
  timed, = benchmark.run(config, steps=2, repeats=2, warmup=1)
  assert timed["devices"] == 8 and timed["backend"] == "cpu"
  assert len(timed["s_per_step_blocks"]) == 2 and timed["s_per_step"] > 0
  assert timed["images_per_s"] == pytest.approx(8 / timed["s_per_step"])
  assert timed["flops_per_step"] > 0 and timed["xla_temp_bytes"] > 0
  assert timed["tflops_per_s"] == pytest.approx(
      timed["flops_per_step"] / timed["s_per_step"] / 1e12)
  assert timed["fraction_of_bf16_peak"] is None  # no published peak for a CPU
  assert timed["peak_memory_kind"] == "host_max_rss" and timed["peak_memory_bytes"] > 0

  # From shapes alone: the same program, so the same FLOPs and temporaries, and no timing.
  shapes, = benchmark.run(config, compile_only=True)
  assert "s_per_step" not in shapes and "images_per_s" not in shapes
  assert shapes["flops_per_step"] == timed["flops_per_step"]
  assert shapes["xla_temp_bytes"] == timed["xla_temp_bytes"]
  assert "GFLOP/step" in benchmark._row({"overrides": {}, **shapes})

  # A sweep in one process (isolation is the default for several points): one row each.
  rows = benchmark.run(config, "dtype=float32,bfloat16", isolate=False, compile_only=True)
  assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
  assert [r["overrides"] for r in rows] == [{"model.dtype": "float32"},
                                            {"model.dtype": "bfloat16"}]
  # bf16 changes the arithmetic's type, not its amount (within XLA's convert ops).
  assert rows[1]["flops_per_step"] == pytest.approx(rows[0]["flops_per_step"], rel=0.05)


def test_main_writes_the_json_report(tmp_path, monkeypatch):
  path = tmp_path / "out" / "bench.json"
  monkeypatch.setattr(benchmark, "_CONFIG", type("Holder", (), {"value": tiny_config()}))
  monkeypatch.setattr(sys, "argv", ["benchmark.py", "--config=configs/toy.py:tiny=1"])
  for name, value in (("json", str(path)), ("compile_only", True), ("sweep", "")):
    monkeypatch.setattr(benchmark.flags.FLAGS, name, value)
  benchmark.main([])
  report = json.loads(path.read_text())
  assert report["config_args"] == ["--config=configs/toy.py:tiny=1"]
  assert len(report["results"]) == 1 and report["results"][0]["flops_per_step"] > 0


def test_second_stage_runs_a_random_frozen_generator_in_the_benchmark_only():
  config = toy.get_config("method=confeti,tiny=1")
  config.train.batch_size, config.method.stage = 8, 2
  # Training refuses a frozen generator without weights, naming the keys to set ...
  with pytest.raises(ValueError, match="method.cut_from"):
    jax.eval_shape(methods.build(config).init_state, jax.random.key(0))
  # ... while the benchmark measures the same step with the random initialisation.
  shapes, = benchmark.run(config, compile_only=True)
  assert shapes["stage"] == 2 and shapes["flops_per_step"] > 0
