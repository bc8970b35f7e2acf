"""Shared fixtures. Eight fake CPU devices for sharding tests; set before JAX starts."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# One compilation cache for the session (and the CLI subprocesses it starts): the many tiny
# runs compile the same programs, and a cache hit skips XLA's compile, most of a tiny run's time.
os.environ.setdefault("RESEARCH_COMPILE_CACHE", tempfile.mkdtemp(prefix="research-test-xla-"))

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from research import runtime  # noqa: E402
from research.config import load_experiment  # noqa: E402

runtime.skip_absent_tpu()  # libtpu (test extra: compile-only TPU devices) on a CPU machine
runtime.enable_compilation_cache()


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One prepared-data cache for the whole session (preparing takes seconds, reading is free)."""
    cache = tmp_path_factory.mktemp("research-cache")
    os.environ["RESEARCH_CACHE"] = str(cache)
    yield cache


@pytest.fixture
def tiny_config(tmp_path):
    """The tiny experiment, writing into a fresh run directory, quiet."""

    def make(*overrides: str):
        return load_experiment(
            "tiny",
            [f"train.run_dir={tmp_path / 'run'}", "log.progress=false", *overrides],
        )

    return make


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged values}; later lines (a resumed run) win."""
    by_step: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", help="also run tests marked slow (minutes each on CPU)"
    )


def pytest_collection_modifyitems(config, items):
    """Slow tests run with --runslow; GPU tests run only where JAX sees a GPU."""
    import jax

    on_gpu = jax.default_backend() == "gpu"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") and not on_gpu:
            item.add_marker(skip_gpu)
