"""loadtest.bench_coldstart's pure parts: the config it runs and the bound it reports."""
import pytest

from cmesh.config import parse_config
from loadtest.bench_coldstart import bench_config, ratio_bound


def test_every_model_starts_at_zero_and_warming_mode_is_the_only_difference(tmp_path) -> None:
    independent = bench_config(tmp_path, coordinated=False, autoscaler_port=8591)
    coordinated = bench_config(tmp_path, coordinated=True, autoscaler_port=8591)
    for data in (independent, coordinated):
        config = parse_config(data)
        assert all(m.deployment.mode == "serverless" and m.deployment.min_replicas == 0
                   for m in config.models.values())
        assert "support-agent" in config.pipelines
    assert independent["autoscaler"]["coordinated_prewarm"] is False
    assert {**independent["autoscaler"], "coordinated_prewarm": True} == coordinated["autoscaler"]


def test_bound_keeps_only_the_longest_start_of_the_serial_chain() -> None:
    starts = {"embedder": 0.5, "kb-index": 0.1, "dialogue-llm": 0.3, "intent-classifier": 0.2}
    bound = ratio_bound(1.0, starts)
    # intent runs beside embed -> retrieve; the answer waits for both: 0.5 + 0.1 + 0.3.
    assert bound["serial_starts_s"] == pytest.approx(0.9)
    assert bound["longest_start_s"] == pytest.approx(0.5)
    assert bound["best_ratio"] == pytest.approx(0.6)      # 0.1 s of routing and compute stays
