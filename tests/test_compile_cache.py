"""The persistent compilation cache user runs get by default."""

import os

import jax
import pytest

from confeti_jax import compile_cache


@pytest.fixture
def fresh_jax_cache_settings():
  """No cache folder chosen (as in a user's shell); the suite's own settings come back."""
  saved = {k: jax.config.values[k] for k in (
      "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
      "jax_enable_compilation_cache")}
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  for key, value in saved.items():
    jax.config.update(key, value)


def test_on_by_default_under_the_user_cache_folder(tmp_path, monkeypatch,
                                                   fresh_jax_cache_settings):
  monkeypatch.setenv("CONFETI_CACHE", str(tmp_path))
  folder = compile_cache.enable()
  assert folder == str(tmp_path / "xla") and os.path.isdir(folder)
  assert jax.config.jax_compilation_cache_dir == folder
  assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES


def test_jax_settings_win(tmp_path, monkeypatch, fresh_jax_cache_settings):
  monkeypatch.setenv("CONFETI_CACHE", str(tmp_path))
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "mine")
  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_enable_compilation_cache", False)
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None


def test_unwritable_folder_turns_it_off_with_a_warning(tmp_path, monkeypatch, caplog,
                                                       fresh_jax_cache_settings):
  (tmp_path / "xla").write_text("a file where the folder should be")
  monkeypatch.setenv("CONFETI_CACHE", str(tmp_path))
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None
  assert "Compilation cache off" in caplog.text and "JAX_COMPILATION_CACHE_DIR" in caplog.text
