"""Run accounting: the exact device-kind table, chips per job, where the peak comes from (config,
table, CPU measured once and cached), no MFU for unknown chips, the energy and work ledger."""

import json
import math
import sys
import time
import types
import warnings

import jax
import numpy as np
import pytest

from research.config import ConfigError, EnergyConfig
from research.scaling import forecast
from research.train import accounting, ledger, power
from research.train.accounting import Peak, chips, job_peak, lookup, peak_flops


def read_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl as {step: merged values}."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def fake_devices(kind: str, platform: str, count: int = 1, processes: int = 1, cores: int = 1):
    """Stand-ins for jax.Device: what accounting reads (platform, kind, process, core)."""
    return [
        types.SimpleNamespace(
            platform=platform,
            device_kind=kind,
            process_index=i // (count // processes),
            core_on_chip=i % cores,
            id=i,
        )
        for i in range(count)
    ]


# Dense bf16 peaks per chip, written out from the data sheets (not read from the table), with
# the device_kind each card or chip reports. The substring matching before gave an H100 PCIe and
# an H100 NVL the SXM's 989e12, an L40 the L4's 121e12 and a v5p ("TPU v5") the v5e's 197e12.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12,
    "Tesla V100-PCIE-32GB": 112e12,
    "Tesla T4": 65e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


@pytest.mark.parametrize("kind", sorted(DATASHEET))
def test_each_device_kind_gets_its_own_datasheet_peak(kind):
    platform = "tpu" if kind.startswith("TPU") else "gpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known kind never warns
        assert peak_flops(0.0, fake_devices(kind, platform)) == (DATASHEET[kind], f"table:{kind}")


def test_every_table_kind_is_checked_against_the_datasheet_list():
    assert set(accounting.BY_DEVICE_KIND) == set(DATASHEET)


def test_unknown_accelerator_warns_and_reports_no_mfu():
    for kind in ("NVIDIA A10G", "NVIDIA GeForce RTX 4090", "TPU v4 lite", "NVIDIA L40X"):
        with pytest.warns(RuntimeWarning, match=r"--set log\.peak_flops="):
            peak = job_peak(0.0, fake_devices(kind, "gpu", count=4))
        assert peak.per_chip is None and peak.total is None
        assert peak.source == f"unknown:{kind}"
        assert math.isnan(peak.mfu(1e15, 1.0))
        assert "unknown" in peak.describe()


def test_configured_peak_wins_over_table_and_measurement(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a configured peak must not be measured")

    monkeypatch.setattr(accounting, "measure_matmul_peak", never)
    assert peak_flops(5e14, fake_devices("NVIDIA H100 80GB HBM3", "gpu")) == (5e14, "config")
    assert peak_flops(5e14, fake_devices("NVIDIA A10G", "gpu")) == (5e14, "config")
    assert peak_flops(3e11, jax.devices()) == (3e11, "config")
    peak = job_peak(1e12, fake_devices("TPU v4", "tpu", count=8))
    assert peak.total == 8e12 and peak.mfu(4e12, 1.0) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="log.peak_flops"):
        peak_flops(-1.0, jax.devices())


def test_cpu_peak_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("RESEARCH_CACHE", str(tmp_path))
    calls = []

    def measure(*args, **kwargs):
        calls.append(1)
        return 2.0e11 if len(calls) == 1 else 1.0e11  # a busier host the second time

    monkeypatch.setattr(accounting, "measure_matmul_peak", measure)
    monkeypatch.setattr(accounting.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle host
    cpu = fake_devices("cpu", "cpu")
    first = peak_flops(0.0, cpu)
    second = peak_flops(0.0, cpu)  # another run on the same machine: read, not re-measured
    assert calls == [1] and first == second
    assert first == (2.0e11, f"cpu-measured-cached:{tmp_path / 'cpu_peak_flops.json'}")
    saved = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    (key,) = saved
    assert accounting.cpu_model() in key and f"x{accounting.cpu_threads()} threads" in key
    assert saved[key]["peak_flops"] == 2.0e11
    # A process pinned to fewer threads is another machine as far as its peak goes.
    monkeypatch.setattr(accounting, "cpu_threads", lambda: 999)
    assert peak_flops(0.0, cpu)[0] == 1.0e11 and len(calls) == 2
    assert len(json.loads((tmp_path / "cpu_peak_flops.json").read_text())) == 2


def test_cpu_peak_measured_on_a_busy_host_warns_where_it_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("RESEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(accounting, "measure_matmul_peak", lambda: 4e10)
    monkeypatch.setattr(accounting.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    with pytest.warns(RuntimeWarning, match=r"busy \(load average 99.0.*cpu_peak_flops.json"):
        assert peak_flops(0.0, fake_devices("cpu", "cpu"))[0] == 4e10
    (entry,) = json.loads((tmp_path / "cpu_peak_flops.json").read_text()).values()
    assert entry["load_average"] == 99.0


def test_chips_one_answer_per_host_kind():
    assert len(jax.devices()) == 8 and chips() == 1  # one CPU host split into 8 XLA devices
    assert chips(fake_devices("cpu", "cpu", count=4, processes=2)) == 2  # 2 processes x 2
    assert chips(fake_devices("NVIDIA H100 80GB HBM3", "gpu", count=8)) == 8
    assert chips(fake_devices("TPU v3", "tpu", count=8, cores=2)) == 4  # two cores a chip
    assert chips(fake_devices("TPU v4", "tpu", count=4, processes=2)) == 4
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    assert chips(mesh) == chips(mesh.devices) == 1
    # The power meter counts the same chips as the ledger and the peak.
    assert power.PowerMeter(EnergyConfig(measure=False)).devices == chips()


def test_lookup_takes_human_names_aliases_and_exact_kinds():
    assert lookup("H100").peak_flops == 989e12
    assert lookup("h100 pcie").peak_flops == 756e12
    assert lookup("NVIDIA L40").name == "L40" and lookup("L4").name == "L4"
    assert lookup("TPU v5p") is lookup("TPU v5") is lookup("v5p")
    assert lookup("Trillium") is lookup("TPU v6 lite") is lookup("TPU v6e")
    assert lookup("cpu") is accounting.CPU
    with pytest.raises(ConfigError, match="unknown hardware 'A100X'.*Known: H100"):
        lookup("A100X")
    for entry in accounting.HARDWARE.values():  # every chip can be forecast and costed
        if entry is not accounting.CPU:
            assert entry.peak_flops > 0 and entry.tdp_w > 0 and entry.price_per_hour > 0
            assert entry.hbm_bytes > 0


def test_forecast_for_each_tpu_generation(capsys):
    from research.cli import main as cli_main

    plan = forecast.Plan(params=1e9, tokens=20e9, hardware="TPU v5p", devices=64, mfu=0.5)
    result = forecast.forecast(plan)
    assert result["peak_flops"] == 459e12
    assert result["device_hours"] == pytest.approx(6 * 1e9 * 20e9 / (459e12 * 0.5) / 3600)
    for name in ("TPU v3", "TPU v4", "TPU v5e", "TPU v6e"):
        assert forecast.forecast(forecast.Plan(params=1e9, tokens=2e10, hardware=name))["tdp_w"]
    args = ["forecast", "--params", "7e9", "--tokens", "2e12", "--hardware", "TPU v5p"]
    assert cli_main(args) == 0
    assert "TPU v5p (peak 459 TFLOP/s, TDP 320 W (estimate)" in capsys.readouterr().out
    assert forecast.forecast(forecast.Plan(1e9, 2e10, "TPU v4"))["tdp_source"] == "data sheet"


# ------------------------------------------------------------------------------- ledger


def test_ledger_records_work_chips_and_the_peak_used(tmp_path):
    mesh = types.SimpleNamespace(
        devices=np.array(fake_devices("cpu", "cpu", count=8)), axis_names=("data",)
    )
    peak = Peak(2e11, chips(mesh), "cpu-measured-cached:/x.json")
    ledger.record_work(tmp_path, 100, 1e12, 10.0, mesh, peak)
    entry = ledger.record_work(tmp_path, 50, 5e11, 5.0, mesh, peak)  # a resumed run adds
    assert entry["tokens"] == 150 and entry["flops"] == 1.5e12 and entry["wall_seconds"] == 15.0
    assert entry["device_count"] == 1 and entry["device_seconds"] == 15.0
    assert entry["peak_flops"] == 2e11 and entry["peak_flops_source"].startswith("cpu-measured")
    assert json.loads((tmp_path / "ledger.json").read_text()) == entry


def test_ledger_arithmetic_and_resume_accumulation(tmp_path):
    cfg = EnergyConfig(pue=1.2, grid_kg_co2_per_kwh=0.5, price_per_device_hour=2.0)
    (tmp_path / "ledger.json").write_text(json.dumps({"device_seconds": 7200.0, "tokens": 10}))
    reading = power.EnergyReading(3.6e6, 3600, "tdp-estimate", 1000.0, "H100", 2)
    first = ledger.record_energy(tmp_path, cfg, reading)
    assert first["device_hours"] == 2.0
    assert first["energy_kwh"] == pytest.approx(1.0 * 1.2)
    assert first["co2_kg"] == pytest.approx(1.2 * 0.5)
    assert first["cost_usd"] == pytest.approx(4.0)
    second = ledger.record_energy(tmp_path, cfg, reading)  # a resumed run adds its energy
    assert second["energy_kwh"] == pytest.approx(2.4)
    total = ledger.sum_ledgers([first, second])
    assert total["energy_kwh"] == pytest.approx(3.6) and total["runs"] == 2
    unknown = power.EnergyReading(None, 1.0, "unknown", None, "TPU v9", 1)
    assert ledger.record_energy(tmp_path, cfg, unknown)["energy_kwh"] is None
    assert ledger.sum_ledgers([first, {"energy_kwh": None}])["energy_kwh"] is None


def test_a_pending_interval_is_counted_once_if_its_checkpoint_is_durable_else_dropped(tmp_path):
    mesh = types.SimpleNamespace(
        devices=np.array(fake_devices("cpu", "cpu", count=1)), axis_names=("data",)
    )
    peak, cfg = Peak(None, 1, "unknown"), EnergyConfig()
    reading = power.EnergyReading(50.0, 10.0, "tdp-estimate", 5.0, "CPU", 1)
    ledger.record_pending(tmp_path, 20, 100, 1e9, reading)
    assert "tokens" not in json.loads((tmp_path / "ledger.json").read_text())  # not counted yet
    entry = ledger.commit_pending(tmp_path, 20, cfg, mesh, peak)
    assert entry["tokens"] == 100 and entry["energy_device_joules"] == 50.0
    assert entry["wall_seconds"] == 10.0 and entry["step"] == 20 and "pending" not in entry
    assert ledger.commit_pending(tmp_path, 20, cfg, mesh, peak) is None  # never twice
    ledger.record_pending(tmp_path, 40, 100, 1e9, reading)  # its save never completed:
    assert ledger.commit_pending(tmp_path, 20, cfg, mesh, peak)["tokens"] == 100  # resumed at 20
    assert json.loads((tmp_path / "ledger.json").read_text()) == entry


def test_a_resume_from_an_older_checkpoint_moves_the_later_steps_to_redone(tmp_path):
    """Checkpoint 40 was counted, then set aside as corrupt: the run resumes from 20."""
    mesh = types.SimpleNamespace(
        devices=np.array(fake_devices("cpu", "cpu", count=1)), axis_names=("data",)
    )
    peak, cfg = Peak(None, 1, "unknown"), EnergyConfig()
    reading = power.EnergyReading(50.0, 10.0, "tdp-estimate", 5.0, "CPU", 1)
    for step in (20, 40):  # 20 steps of 10 tokens and 1e3 FLOPs each, per interval
        ledger.record_pending(tmp_path, step, 200, 2e4, reading)
        ledger.commit_pending(tmp_path, step, cfg, mesh, peak)
    ledger.rewind(tmp_path, 20, 10, 1e3)
    entry = json.loads((tmp_path / "ledger.json").read_text())
    assert entry["tokens"] == 200 and entry["flops"] == 2e4 and entry["step"] == 20
    assert entry["redone_tokens"] == 200 and entry["redone_flops"] == 2e4
    assert entry["wall_seconds"] == 20.0 and entry["energy_device_joules"] == 100.0  # spent
    ledger.rewind(tmp_path, 20, 10, 1e3)  # the usual resume: nothing to move
    assert json.loads((tmp_path / "ledger.json").read_text()) == entry


def test_cpu_energy_is_an_estimate_per_thread_and_says_so():
    meter = power.PowerMeter(EnergyConfig(utilisation=0.5))
    reading = meter.stop()
    assert reading.method == "tdp-estimate" and reading.hardware == "CPU"
    assert reading.power_w == pytest.approx(5.0 * 0.5 * accounting.cpu_threads())
    configured = power.PowerMeter(EnergyConfig(device_power_w=42.0)).stop()
    assert configured.method == "configured-power" and configured.power_w == 42.0


def test_nvml_power_is_sampled_in_a_thread_and_integrated(monkeypatch):
    fake = types.SimpleNamespace(nvmlDeviceGetPowerUsage=lambda handle: 150_000)  # mW
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(power, "_nvml_handles", lambda devices: ["gpu0", "gpu1"])
    meter = power.PowerMeter(EnergyConfig(), interval=0.01)
    time.sleep(0.3)
    reading = meter.stop()
    assert reading.method == "nvml"
    assert reading.joules == pytest.approx(300.0 * reading.seconds, rel=0.15)


# ------------------------------------------------------------------------------- trainer


@pytest.mark.slow  # a whole run; the selection itself is tested above in milliseconds
def test_training_on_an_unknown_chip_reports_no_mfu(tiny_config, monkeypatch):
    """(The peak a known chip uses is checked in test_train's TensorBoard and ledger test.)"""
    from research.run import training

    unknown = Peak(None, 1, "unknown:Imaginary Accelerator")
    monkeypatch.setattr(training, "job_peak", lambda configured, devices: unknown)
    result = training.train(tiny_config("train.steps=3", "train.sample_tokens=0"))
    assert math.isnan(result.mfu)
    logged = read_metrics(result.run_dir)
    assert "perf/mfu" not in logged[3] and "perf/tokens_per_second" in logged[3]
    assert not any("perf/peak_flops" in row for row in logged.values())
    saved = json.loads((result.run_dir / "ledger.json").read_text())
    assert saved["peak_flops"] is None and saved["peak_flops_source"] == unknown.source
