"""The calibration comparison on a small case: the experiment's runs rebuilt and compared."""
from sim.calibrate import compare, experiment_config
from sim.mesh import SimOptions, simulate
from sim.profiles import parse_profiles
from sim.workload import from_scenario
from tests.test_sim_core import FAST


def test_calibration_compares_each_strategy_within_bounds() -> None:
    profiles = parse_profiles({**FAST, "host": {"cores": 2, "overhead_cores": 0.5, "network_ms": 0.5}})
    config = experiment_config(10.0)
    assert config.autoscaler.stable_window_s == 3.0           # the experiment's windows, compressed
    wl = from_scenario("loadtest/scenarios/spike10x.yaml", compress=10, rate_scale=0.1)
    # A "real" run made by the simulator itself must calibrate against itself (within 0 %) ...
    per = simulate(config, profiles, wl, SimOptions())
    real = {"replica_s": per.totals["replica_s"], "p95_ms": per.totals["p95_ms"], "drops": per.totals["drops"],
            "max_ready": {m: d["peak_replicas"] for m, d in per.by_model.items()}}
    experiment = {"meta": {"compress": 10.0, "rate_scale": 0.1}, "outcomes": {"spike10x": {"permodel": real}}}
    out = compare(experiment, profiles)
    assert out["pass"] and out["rows"][0]["replica_s_error"] == 0.0
    # ... and a real run twice as expensive is outside the ±15 % band.
    experiment["outcomes"]["spike10x"]["permodel"] = {**real, "replica_s": 2 * real["replica_s"]}
    out = compare(experiment, profiles)
    assert not out["pass"] and out["rows"][0]["replica_s_error"] == -0.5


def test_the_overhead_fitted_to_the_machines_busy_cores_recovers_the_one_that_made_them() -> None:
    from sim.calibrate import _host_of, fit_overhead

    # A host busy part of the time (saturated throughout, any overhead would show
    # the same busy cores, and none could be fitted).
    profiles = parse_profiles({"host": {"cores": 2, "overhead_cores": 0.0, "network_ms": 0.5},
                               "default": {"latency_ms": {1: 40, 16: 120}, "max_batch_size": 16,
                                           "cold_start_s": 0.5}})
    config = experiment_config(10.0)
    wl = from_scenario("loadtest/scenarios/spike10x.yaml", compress=10, rate_scale=0.1)
    # A "real" run: the simulator itself with 0.6 cores taken by other processes.
    truth = simulate(config, _host_of(profiles, 0.6, None), wl, SimOptions())
    busy = truth.cpu_cores + 0.6
    used, r, how = fit_overhead(config, profiles, wl, SimOptions(), busy, start=0.1)
    assert abs(used.host.overhead_cores - 0.6) < 0.05 and "busy" in how
    assert profiles.host.overhead_cores == 0.0                 # a copy: the profiles are not mutated
