"""benchmarks/device_check.py, the one command a lent GPU runs, works before any GPU sees it:
its dry run (CPU, tiny sizes, kernels in interpret mode) runs the cases, judges them against
the float32 reference, writes the JSON and markdown, and never imports grain or research.data
(the GPU machine has no grain)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, *args):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/device_check.py"), "--dry-run", "--out", str(out),
         *args],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    payload = json.loads((out / "device_check.json").read_text())
    return done, payload, (out / "device_check.md").read_text()


def test_dry_run_kernel_case_is_correct_and_never_imports_grain(tmp_path):
    done, payload, table = _dry_run(tmp_path, "--max-cases", "1", "--sections", "kernels")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert payload["dry_run"] and not payload["grain_imported"]
    assert not payload["research_data_imported"]
    kernel = next(r for r in payload["rows"] if r["section"] == "kernels")
    assert kernel["status"] == "ok", kernel
    assert max(kernel[f"err_{n}"] for n in ("out", "dq", "dk", "dv")) < kernel["tolerance"]
    assert kernel["empty_rows_max"] == 0.0  # rows that see no key are exactly 0
    assert kernel["err_vs_wrong_causality"] > 20 * kernel["tolerance"]
    assert {r["section"] for r in payload["rows"]} == {"kernels"}
    assert "## kernels" in table and "| bfloat16 d64 causal |" in table


def test_packed_documents_judge_only_rows_that_see_a_key(tmp_path):
    # A causal row at the start of a packed document, with keys shifted later, sees no key:
    # ours gives it exactly 0, the reference a uniform average. The check must compare only
    # the rows that see keys (it once called this kernel case WRONG on a correct kernel).
    only = ("--only", "bfloat16 d64 segments")
    done, payload, _ = _dry_run(tmp_path, "--sections", "kernels", *only)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = payload["rows"]
    assert row["case"] == "bfloat16 d64 segments" and row["status"] == "ok", row
    assert row["empty_rows"] > 8  # the first 8 rows and the start of each later document
    assert row["empty_rows_max"] == 0.0


def test_hopper_kernel_case_runs_both_passes_on_mosaic_gpu(tmp_path):
    from research.kernels.flash_attention import hopper_bwd

    only = ("--only", "hopper bfloat16 d64 causal")
    done, payload, _ = _dry_run(tmp_path, "--sections", "kernels", *only)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = payload["rows"]
    if not hopper_bwd.INTERPRETER_WORKS:  # jax 0.10: said, not run
        assert row["status"].startswith("skipped: jax"), row
        return
    assert row["status"] == "ok" and row["route"] == "hopper/hopper", row
    assert row["err_vs_wrong_causality"] > 20 * row["tolerance"]


def test_a_spent_budget_skips_cases_instead_of_running_them(tmp_path):
    done, payload, _ = _dry_run(tmp_path, "--budget-s", "0", "--sections", "moe")
    assert done.returncode == 0
    assert [r["status"].split(":")[0] for r in payload["rows"]] == ["skipped"] * 3


@pytest.mark.slow
def test_whole_dry_run(tmp_path):
    done, payload, _ = _dry_run(tmp_path, "--budget-s", "3000")
    assert done.returncode == 0, [r for r in payload["rows"] if r["status"] != "ok"]
    assert not payload["grain_imported"] and not payload["research_data_imported"]
