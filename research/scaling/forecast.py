"""Forecast a planned training run: time, device-hours, energy, CO2 and cost.

    FLOPs         = 6 N D (or given)
    time          = FLOPs / (devices x peak FLOP/s x MFU)
    device-hours  = devices x time (or given, as published reports state them)
    energy (kWh)  = device-hours x TDP x power fraction x PUE / 1000
    CO2 (kg)      = energy x grid intensity;   cost = device-hours x price

``PUBLISHED`` holds two documented cases with the inputs their papers give; tests check the
forecasts land on the published energy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from research.config import ConfigError, EnergyConfig
from research.train.accounting import lookup


@dataclass(frozen=True)
class Plan:
    params: float
    tokens: float
    hardware: str
    devices: int = 1
    mfu: float = 0.4  # model FLOPs utilisation: 6ND FLOPs / (time x peak)
    power_fraction: float = 1.0  # mean draw per device / TDP
    pue: float = 1.1
    grid_kg_co2_per_kwh: float = 0.4
    price_per_device_hour: float = 0.0  # 0: the hardware table's indicative price
    flops: float = 0.0  # 0: 6 N D
    device_hours: float = 0.0  # 0: from FLOPs, peak and MFU
    peak_flops: float = 0.0  # 0: the hardware table's
    tdp_w: float = 0.0  # 0: the hardware table's


PUBLISHED: dict[str, tuple[Plan, dict]] = {
    # Patterson et al. 2021, "Carbon Emissions and Large Neural Network Training", Table 4:
    # 10,000 V100s for 14.8 days at 24.6 TFLOP/s each (19.7% of the 125 TFLOP/s peak),
    # 330 W mean per processor incl. its share of the host (1.1 x the 300 W TDP), PUE 1.1,
    # 0.429 kg CO2eq/kWh; published 1,287 MWh and 552 t CO2eq.
    "gpt3": (
        Plan(
            params=175e9,
            tokens=300e9,
            hardware="V100",
            devices=10_000,
            mfu=24.6 / 125,
            power_fraction=330 / 300,
            pue=1.1,
            grid_kg_co2_per_kwh=0.429,
        ),
        {"energy_mwh": 1287, "co2_t": 552, "days": 14.8},
    ),
    # Luccioni et al. 2022, "Estimating the Carbon Footprint of BLOOM": 1,082,990 A100-hours
    # (384 GPUs, ~118 days) at the 400 W TDP; 433,196 kWh is GPU energy before the data
    # centre's overhead (Jean Zay's PUE 1.2 would make it 520 MWh), so PUE 1.0 here;
    # 0.057 kg CO2eq/kWh (French grid) gives 24.7 t dynamic CO2eq (~50 t with embodied and idle).
    "bloom": (
        Plan(
            params=176e9,
            tokens=366e9,
            hardware="A100",
            devices=384,
            device_hours=1_082_990,
            power_fraction=1.0,
            pue=1.0,
            grid_kg_co2_per_kwh=0.057,
        ),
        {"energy_mwh": 433.196, "co2_t": 24.69, "days": 118},
    ),
}


def forecast(plan: Plan) -> dict:
    """The figures of a planned run; every input is echoed back beside them."""
    for name in ("params", "tokens", "devices", "power_fraction", "pue"):
        if getattr(plan, name) <= 0:
            raise ConfigError(f"forecast: {name} must be positive, got {getattr(plan, name)}")
    if not 0 < plan.mfu <= 1:
        raise ConfigError(f"forecast: mfu={plan.mfu} must be in (0, 1], e.g. 0.4")
    entry = None
    if not (plan.peak_flops and plan.tdp_w):
        entry = lookup(plan.hardware)
    peak = plan.peak_flops or entry.peak_flops
    tdp = plan.tdp_w or entry.tdp_w
    tdp_source = "given" if plan.tdp_w else "data sheet" if entry.power_published else "estimate"
    if not peak and not plan.device_hours:
        raise ConfigError(f"no peak FLOP/s for '{plan.hardware}': pass --peak-tflops")
    flops = plan.flops or 6.0 * plan.params * plan.tokens
    if plan.device_hours:
        device_hours = plan.device_hours
        mfu = flops / (device_hours * 3600 * peak) if peak else None
    else:
        device_hours = flops / (peak * plan.mfu) / 3600
        mfu = plan.mfu
    price = plan.price_per_device_hour or (entry.price_per_hour if entry else 0.0)
    energy_kwh = device_hours * tdp * plan.power_fraction * plan.pue / 1000
    return {
        **dataclasses.asdict(plan),
        "peak_flops": peak,
        "tdp_w": tdp,
        "tdp_source": tdp_source,  # "estimate": the vendor publishes no figure (TPU v5e/v5p/v6e)
        "flops": flops,
        "mfu": mfu,
        "device_hours": device_hours,
        "days": device_hours / plan.devices / 24,
        "energy_mwh": energy_kwh / 1000,
        "co2_t": energy_kwh * plan.grid_kg_co2_per_kwh / 1000,
        "price_per_device_hour": price,
        "cost_usd": device_hours * price,
    }


def device_estimate(seconds: float, cfg: EnergyConfig) -> dict:
    """Energy, CO2 and cost of ``seconds`` on this machine's devices, as the ledger estimates."""
    from research.train.ledger import price_per_device_hour
    from research.train.power import PowerMeter

    meter = PowerMeter(dataclasses.replace(cfg, measure=False))
    power, method = meter.estimated_power_w()
    energy_kwh = (power or 0.0) * seconds / 3.6e6 * cfg.pue
    price = price_per_device_hour(cfg, meter.hardware_name) or 0.0
    return {
        "hardware": meter.hardware_name,
        "method": method,
        "energy_kwh": energy_kwh,
        "co2_kg": energy_kwh * cfg.grid_kg_co2_per_kwh,
        "cost_usd": seconds / 3600 * meter.devices * price,
    }
