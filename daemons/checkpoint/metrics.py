"""The checkpoint daemon's Prometheus metrics (``shoal_checkpoint_*``).

Label values come from fixed sets: group names are chosen by applications, so
they never become labels; per-group figures are in ``shoal ckpt status``. The
Vaidya model gauges are computed at scrape time from the daemon-wide running
means of O, L and R (seed equations 1-3) and the configured MTBF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Why a request was refused (``shoal_checkpoint_refused_total{reason}``).
REFUSALS = (
    "bad_params",  # a field missing, of the wrong type or out of bounds
    "unknown_group",  # a group that was never created here
    "bad_identity",  # a session key that is not the rank's: another rank's id claimed
    "rank_taken",  # a join for a rank that is alive
    "group_mismatch",  # a join whose n, mode or block size differs from the group's
    "too_many",  # max_groups / max_state_bytes exceeded
    "stale_epoch",  # a call from before a rollback
    "not_granted",  # deltas or a commit without a grant
    "wrong_role",  # a coordinator method sent to a backup, or the reverse
    "survivor_unreachable",  # a recovery read could not reach a survivor (retried by the rank)
    "group_over",  # a join for a group that finished or failed here
)
GRANT_RESULTS = ("granted", "held")
FAILURE_CAUSES = ("disconnect", "heartbeat")
RECOVERY_RESULTS = ("ok", "failed")
MIRROR_RESULTS = ("ok", "error", "resync")
#: Why a group failed (``shoal_checkpoint_groups_failed_total{reason}``).
GROUP_FAILURES = ("too_many_lost", "rank_lost", "state_lost")

# A checkpoint costs from a millisecond (small deltas) to seconds (GiB states).
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CheckpointMetrics:
    def __init__(self, registry: CollectorRegistry, gauges: Callable[[], dict[str, float]]):
        self.overhead = Histogram(
            "shoal_checkpoint_overhead_seconds",
            "O: time a checkpoint added to a rank's run (seed IV.D).", buckets=TIME_BUCKETS, registry=registry,
        )
        self.latency = Histogram(
            "shoal_checkpoint_latency_seconds",
            "L: time from the start of a checkpoint to its commit at the coordinator.",
            buckets=TIME_BUCKETS, registry=registry,
        )
        self.recovery = Histogram(
            "shoal_checkpoint_recovery_seconds",
            "R: time from a failure's detection until every rank runs again.",
            buckets=TIME_BUCKETS, registry=registry,
        )
        self.checkpoints = Counter(
            "shoal_checkpoint_checkpoints_total", "Rank checkpoints committed into the parity.", registry=registry,
        )
        self.delta_bytes = Counter(
            "shoal_checkpoint_delta_bytes_total", "Bytes of XOR deltas applied to the parity.", registry=registry,
        )
        self.grants = Counter(
            "shoal_checkpoint_grants_total", "Checkpoint requests under the Timeout rule, by result.",
            ["result"], registry=registry,
        )
        self.failures = Counter(
            "shoal_checkpoint_rank_failures_total", "Rank failures detected, by cause.", ["cause"], registry=registry,
        )
        self.recoveries = Counter(
            "shoal_checkpoint_recoveries_total", "Group recoveries, by result.", ["result"], registry=registry,
        )
        self.refused = Counter(
            "shoal_checkpoint_refused_total", "Requests refused, by reason.", ["reason"], registry=registry,
        )
        self.groups_failed = Counter(
            "shoal_checkpoint_groups_failed_total",
            "Groups that failed (their ranks raise GroupFailed), by reason: too_many_lost (more ranks "
            "at once than the parity survives), rank_lost (a rank lost while the parity was being "
            "rebuilt), state_lost (a rank came back without its state after a coordinator restart, or "
            "not every rank came back within rebuild_timeout).", ["reason"], registry=registry,
        )
        self.groups_freed = Counter(
            "shoal_checkpoint_groups_freed_total", "Finished or failed groups freed after the grace period.",
            registry=registry,
        )
        self.mirror = Counter(
            "shoal_checkpoint_mirror_total", "Parity mirror operations to the backup, by result.",
            ["result"], registry=registry,
        )
        for r in GRANT_RESULTS:
            self.grants.labels(r)
        for c in FAILURE_CAUSES:
            self.failures.labels(c)
        for r in RECOVERY_RESULTS:
            self.recoveries.labels(r)
        for r in REFUSALS:
            self.refused.labels(r)
        for r in MIRROR_RESULTS:
            self.mirror.labels(r)
        for r in GROUP_FAILURES:
            self.groups_failed.labels(r)
        registry.register(_Gauges(gauges))

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason).inc()


#: name -> help of the gauges read at scrape time from the daemon's state.
GAUGES = {
    "shoal_checkpoint_groups": "Checkpoint groups held.",
    "shoal_checkpoint_ranks_alive": "Ranks currently connected, all groups.",
    "shoal_checkpoint_parity_bytes": "Bytes of parity held in memory (coordinator or backup).",
    "shoal_checkpoint_msglog_bytes": "Message data in the ranks' sent tables, as last reported.",
    "shoal_checkpoint_msglog_entries": "Entries in the ranks' sent and receipt tables, as last reported.",
    "shoal_checkpoint_held_requests": "Checkpoint requests held by the Timeout rule now.",
    "shoal_checkpoint_backup_in_sync": "1 if the backup mirrors the parity, 0 if not (or none configured).",
    "shoal_checkpoint_backup_configured": "1 on a coordinator with a backup configured, else 0.",
    "shoal_checkpoint_optimal_interval_seconds": "T_opt, seed equation 1, from the mean O and the MTBF.",
    "shoal_checkpoint_gamma_seconds": "Gamma, seed equation 2, from the mean O, L, R and the MTBF.",
    "shoal_checkpoint_overhead_ratio": "r = Gamma / T_opt - 1, seed equation 3.",
}


class _Gauges(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]):
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._read()
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=float(values.get(name, 0.0)))
