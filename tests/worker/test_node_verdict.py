"""The worker's telemetry verdict and team-reward helpers, on real metrics and a real marl scheduler."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shoal.core.dispatch.policy import ServerState, TaskInfo
from shoal.core.dispatch.schedulers import MultiAgentScheduler
from shoal.daemons.telemetry.metrics import TelemetryMetrics
from shoal.daemons.worker.telemetry import feed_team_rewards, verdict_from_metrics


def telemetry_page(features: int | None, anomalous: int | None) -> str:
    """The /metrics page of the telemetry daemon's own metrics, in a given state."""
    registry = CollectorRegistry()
    m = TelemetryMetrics(registry)
    if features is not None:
        m.model_features.set(features)
    if anomalous is not None:
        m.node_anomalous.set(anomalous)
    return generate_latest(registry).decode()


def test_one_odd_window_does_not_take_a_healthy_node_out():
    """The worker reports the node's confirmed verdict, not its last window's (issue 12: a lone
    false alarm on a healthy host had the dispatcher stop using it)."""
    registry = CollectorRegistry()
    m = TelemetryMetrics(registry)
    m.model_features.set(40)
    m.anomalous.set(1)  # the last window alone was flagged
    m.node_anomalous.set(0)  # fewer than [detector] confirm in a row
    assert verdict_from_metrics(generate_latest(registry).decode()) == "normal"


def test_verdict_follows_the_detector_gauges():
    assert verdict_from_metrics(telemetry_page(40, 1)) == "anomalous"
    assert verdict_from_metrics(telemetry_page(40, 0)) == "normal"
    # no model installed: nothing is scored, whatever the gauge says
    assert verdict_from_metrics(telemetry_page(0, 1)) == "unknown"
    # another daemon's page
    assert verdict_from_metrics("# TYPE shoal_worker_slots gauge\nshoal_worker_slots 2.0\n") == "unknown"
    with pytest.raises(ValueError):
        verdict_from_metrics("this is not { the text format\n")


def info(key: str, submitted: float) -> TaskInfo:
    return TaskInfo(id=key, job="1", work=1.0, data_size=0.0, mem=0.0, cpus=1.0, deadline=None, submitted=submitted)


def test_team_rewards_reach_the_marl_agent():
    pol = MultiAgentScheduler(seed=3, batch=1, capacity=8, eps_start=0.0, eps_end=0.0)
    server = ServerState(id="me", cpus=1, cpu_speed=1.0, mem_total=1e9, mem_free=1e9, bandwidth=1e8, rtt=0.0,
                         queue_len=2, running=0, queued_work=2.0)
    pol.pick([info("1/a", 0.0), info("1/b", 0.0)], server, 1.0)  # a decision waiting for its reward
    rows = [["1/x", "other", 0.5], ["1/y", "other", 2.0], ["bad row"], ["1/z", "other", float("nan")]]
    assert feed_team_rewards(pol, rows, now=3.0) == 2  # malformed rows are skipped
    assert pol.team_count == 2
    assert pol.team_sum == pytest.approx(2.718281828 ** -0.5 + 2.718281828 ** -2.0, rel=1e-6)
    # the next decision closes the first one with the team's mean reward: stored in its replay memory
    agent = pol.agents["me"]
    assert agent.size == 0
    pol.pick([info("1/b", 0.0)], server, 4.0)
    assert agent.size == 1 and agent.r[0] == pytest.approx(pol.team_sum / 2)
    assert feed_team_rewards(pol, "not a list", now=5.0) == 0
