"""Test set-up: 8 fake CPU devices (before JAX starts), a persistent compilation cache, and the
compiled programs of a test file released after it."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# The commands the tests start as processes of their own use the same cache (not the user's).
CACHE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test file. A test worker runs hundreds of files;
    each XLA:CPU executable holds memory mappings of its own, and a worker that kept them all
    reached the kernel's per-process limit (vm.max_map_count, 65530), where the next compile
    aborts. The persistent cache above makes a program compiled again cheap."""
    yield
    jax.clear_caches()
    gc.collect()
