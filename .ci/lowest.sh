#!/usr/bin/env bash
# CI job at the lowest supported versions: a fresh virtual environment with every dependency
# pinned at its setup.cfg lower bound (.ci/lowest-constraints.txt), then a fast subset of the
# tests that touches each dependency: a whole tiny run with deprecations from our code as errors,
# config, data (grain, tokenizers), attention against its reference, a sharded run, checkpoint
# restore (orbax), TensorBoard events, the scaling fits and plots (scipy, matplotlib).
# LOWEST_VENV sets the environment's folder.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LOWEST_VENV:-${TMPDIR:-/tmp}/research-lowest-venv}"
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# The data extra too: an experiment file (shakespeare_files) writes Parquet when its config is
# built, and test_config builds every experiment's config.
"$venv/bin/python" -m pip install --quiet -c .ci/lowest-constraints.txt '.[data]' pytest packaging
"$venv/bin/python" -m pip check
"$venv/bin/python" -m pip list --format=freeze \
  | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|tensorboard|tokenizers|numpy)=='

# The checkout's tests import the checkout's code (the same code that was installed above).
set +e
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider --runslow \
  tests/test_versions.py tests/test_config.py tests/test_data.py \
  tests/test_model.py::test_attention_matches_naive_reference \
  tests/test_model.py::test_tiny_model_overfits_a_fixed_batch \
  tests/test_train.py::test_sharded_run_matches_single_device \
  tests/test_checkpoint.py \
  tests/test_train.py::test_tensorboard_events_and_ledger \
  tests/test_scaling.py::test_fit_and_forecast_commands
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests at the lowest versions" >&2
fi
exit "$status"
