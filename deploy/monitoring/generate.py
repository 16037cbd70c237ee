"""PIAA's Grafana dashboard and Prometheus rules from one source: every panel's PromQL and every rule is here.

Run from the repository root:
  .venv/bin/python deploy/monitoring/generate.py           # writes the files below
  .venv/bin/python deploy/monitoring/generate.py --check   # exit 1 when a committed file is not current
Writes grafana/dashboards/piaa.json (Grafana, provisioned by compose, a ConfigMap on Kubernetes),
prometheus/piaa-rules.yml (plain rule file, loaded by deploy/compose/prometheus.yml) and
k8s/prometheus-rule.yaml (the same groups as a Prometheus Operator PrometheusRule). tests/unit/
test_monitoring_rules.py runs promtool on the rules; tests/integration/test_monitoring_stack.py runs every
panel's query and every rule's expression on a real Prometheus scraping a real gateway and tritonserver.
docs/operations.md, "Dashboards and alerts", explains each row and alert.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "grafana" / "dashboards" / "piaa.json"
RULES_FILE = HERE / "prometheus" / "piaa-rules.yml"
PROMETHEUS_RULE_FILE = HERE / "k8s" / "prometheus-rule.yaml"
RUNBOOK = "docs/operations.md#{anchor}"
"""Each alert's runbook entry: a heading of docs/operations.md, "Dashboards and alerts" (a test checks it
exists). Point it at your own copy of the docs with a full URL if your alert routing needs one."""

GATEWAY_JOB = "piaa-gateway"
"""The gateway's scrape job: compose's job_name, and the Service name a ServiceMonitor takes as job."""
TRITON_JOB = "piaa-triton"
"""Triton's scrape job, named the same way."""
HISTORY_JOB = "piaa-history"
"""The history writer's scrape job (`piaa-admin history drain --metrics-port 9109`, docs/history.md). No
deployment runs a writer yet: its scrape job and ServiceMonitor find nothing until one does."""

# ---- the SLOs -------------------------------------------------------------------------------------------

SCORE_METHODS = "Score|ScoreStream"
"""The scoring RPCs the SLOs cover (a ScoreStream counts each of its requests with its own code and time)."""
SERVER_ERRORS = "UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|DATA_LOSS"
"""Codes that spend the error budget: the service failed. Callers' mistakes (INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, ...), their cancellations and rate limiting (RESOURCE_EXHAUSTED) do not."""
ERROR_SLO = 0.999
"""Share of Score/ScoreStream requests that must not fail with a SERVER_ERRORS code (30 days)."""
LATENCY_SLO = 0.99
"""Share of Score/ScoreStream requests that must finish within LATENCY_THRESHOLD_S."""
LATENCY_THRESHOLD_S = 0.25
"""The latency SLO's threshold: a bucket boundary of piaa_request_seconds (the test checks it is one)."""
BURN_WINDOWS = (("1h", "5m", 14.4, "Fast"), ("6h", "30m", 6, "Slow"))
"""(long window, short window, burn rate, name): the SRE workbook's two paging pairs. 14.4 over 1 h spends
2 % of a 30-day budget, 6 over 6 h spends 5 %; the short window ends the alert soon after the burn stops."""
RATIO_WINDOWS = ("5m", "30m", "1h", "6h")

# ---- what an alert fires on -----------------------------------------------------------------------------

STORE_ERROR_RATIO = 0.05
"""PiaaStoreUnavailable: share of the gateway's Redis requests that fail as unavailable."""
STORE_FALLBACK_RATIO = 0.05
"""PiaaStoreFallbacks: share of scores served generic because of the store (unreachable, stale profile)."""
TRITON_QUEUE_S = 0.1
"""PiaaTritonQueueing: mean seconds a request waits in a Triton model's queue."""
RESTARTS_IN_30M = 2
"""PiaaGatewayRestarting: restarts of one gateway (process_start_time_seconds changes) in 30 minutes."""
HISTORY_BACKLOG = 1000
"""PiaaHistoryBacklogGrowing: outbox entries not yet in the table (the writer's piaa_history_backlog, all
slots together). AddRatings fails UNAVAILABLE once one slot's outbox holds StoreConfig.history_max_backlog
(default 2000): half of that leaves, at the rate that filled the first half, as long again to act before
ratings are refused on one Redis (one slot); on a cluster the total is spread over slots, so it fires
earlier still."""
HISTORY_GROWING = "15m"
"""PiaaHistoryBacklogGrowing: the window the backlog's slope is taken over, and how long it must hold."""


def _ratio(bad: str, total: str, window: str, by: str = "namespace") -> str:
    """sum(rate(bad))/sum(rate(total)) by `by`: 0, not absent, while there is traffic but nothing bad (a
    counter with labels appears at its first increment)."""
    b = f"sum by ({by}) (rate({bad}[{window}]))"
    t = f"sum by ({by}) (rate({total}[{window}]))"
    return f"({b} or 0 * {t})\n/\n{t}"


def _score(*matchers: str) -> str:
    return ", ".join([f'method=~"{SCORE_METHODS}"', *matchers])


_SERVER_ERROR_CODES = 'code=~"' + SERVER_ERRORS + '"'
_FAST_ENOUGH = 'le="' + str(LATENCY_THRESHOLD_S) + '"'
SCORE_ERRORS = (
    "piaa_requests_total{" + _score(_SERVER_ERROR_CODES) + "}",
    "piaa_requests_total{" + _score() + "}",
)
"""(bad, total) of the error SLO."""
SCORE_SLOW = (
    "piaa_request_seconds_count{" + _score() + "}",
    "piaa_request_seconds_bucket{" + _score(_FAST_ENOUGH) + "}",
)
"""(all, fast enough) of the latency SLO."""


def recording_rules() -> list[dict[str, Any]]:
    """piaa:score_errors:ratio_rate<w> and piaa:score_slow:ratio_rate<w> for each window."""
    out: list[dict[str, Any]] = []
    for w in RATIO_WINDOWS:
        out.append({"record": f"piaa:score_errors:ratio_rate{w}", "expr": _ratio(*SCORE_ERRORS, w)})
    for w in RATIO_WINDOWS:
        count, fast = SCORE_SLOW
        expr = (
            f"(sum by (namespace) (rate({count}[{w}])) - sum by (namespace) (rate({fast}[{w}])))\n"
            f"/\nsum by (namespace) (rate({count}[{w}]))"
        )
        out.append({"record": f"piaa:score_slow:ratio_rate{w}", "expr": expr})
    return out


def _alert(
    name: str,
    expr: str,
    *,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    anchor: str,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alerting rule; `for_` "" fires at once, the anchor names its heading in docs/operations.md,
    `labels` are added to the alert's."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": RUNBOOK.format(anchor=anchor),
    }
    return rule


def burn_alerts() -> list[dict[str, Any]]:
    """Multi-window multi-burn-rate alerts on the error and the latency SLO of Score/ScoreStream."""
    out = []
    for slo, target, what in (("errors", ERROR_SLO, "Errors"), ("slow", LATENCY_SLO, "Latency")):
        budget = round(1 - target, 6)
        for long, short, burn, speed in BURN_WINDOWS:
            threshold = f"({burn} * {budget})"
            expr = (
                f"piaa:score_{slo}:ratio_rate{long} > {threshold}\n"
                f"and\npiaa:score_{slo}:ratio_rate{short} > {threshold}"
            )
            kind = (
                f"fail with {SERVER_ERRORS.replace('|', ', ')}"
                if slo == "errors"
                else f"take longer than {LATENCY_THRESHOLD_S} s"
            )
            out.append(
                _alert(
                    f"PiaaScore{what}Budget{speed}Burn",
                    expr,
                    for_="",
                    severity="page",
                    summary=f"Score {what.lower()} budget burning {burn}x over {long} and {short}",
                    description=(
                        f"{{{{ $value | humanizePercentage }}}} of Score/ScoreStream requests {kind} over "
                        f"the last {long}, and over {burn} times the budget ({budget:.2%}) in the last "
                        f"{short} too: at this rate a 30-day budget lasts {30 / burn:.1f} days."
                    ),
                    anchor="score-slo-burn",
                )
            )
    return out


def other_alerts() -> list[dict[str, Any]]:
    """Store unavailable, store fallbacks, Triton queueing, history backlog and writer failures, gateway
    restarts, targets down or missing. PiaaTargetDown covers the history writer while it has a target;
    PiaaNoTargetUp does not name its job: a deployment without a writer has none, and would page forever."""
    errors = 'sum by (namespace, instance) (rate(piaa_redis_errors_total{kind="unavailable"}[5m]))'
    trips = "sum by (namespace, instance) (rate(piaa_redis_round_trips_total[5m]))"
    fallbacks = 'piaa_fallbacks_total{reason=~"store_unavailable|stale_profile"}'
    scored = (
        "(sum by (namespace) (rate(piaa_personalized_scores_total[15m]))"
        " + sum by (namespace) (rate(piaa_fallbacks_total[15m])))"
    )
    queue = (
        "sum by (namespace, instance, model) (rate(nv_inference_queue_duration_us[5m]))\n/\n"
        "clamp_min(sum by (namespace, instance, model) (rate(nv_inference_request_success[5m])), 1e-9)\n"
        "/ 1e6"
    )
    hjob = f'job="{HISTORY_JOB}"'
    backlog = f"piaa_history_backlog{{{hjob}}}"
    return [
        _alert(
            "PiaaStoreUnavailable",
            f"{errors}\n/\n{trips}\n> {STORE_ERROR_RATIO}",
            for_="2m",
            severity="page",
            summary="Redis unreachable from gateway {{ $labels.instance }}",
            description=(
                "{{ $value | humanizePercentage }} of this gateway's Redis requests fail as unavailable "
                "(after the client's retries). Scores are served generic (store_unavailable) and ratings "
                "fail UNAVAILABLE until Redis answers."
            ),
            anchor="store-unavailable",
        ),
        _alert(
            "PiaaStoreFallbacks",
            f"sum by (namespace) (rate({fallbacks}[15m]))\n/\n{scored}\n> {STORE_FALLBACK_RATIO}",
            for_="15m",
            severity="ticket",
            summary="Scores served generic because of the store",
            description=(
                "{{ $value | humanizePercentage }} of scores fell back to generic with reason "
                "store_unavailable or stale_profile over 15 minutes."
            ),
            anchor="store-fallbacks",
        ),
        _alert(
            "PiaaTritonQueueing",
            f"{queue}\n> {TRITON_QUEUE_S}",
            for_="10m",
            severity="ticket",
            summary="Triton model {{ $labels.model }} queues requests for {{ $value | humanizeDuration }}",
            description=(
                f"Requests wait more than {TRITON_QUEUE_S} s on average in the queue of model "
                "{{ $labels.model }} on {{ $labels.instance }}: its instances are saturated."
            ),
            anchor="triton-queueing",
        ),
        _alert(
            "PiaaGatewayRestarting",
            f'changes(process_start_time_seconds{{job="{GATEWAY_JOB}"}}[30m]) >= {RESTARTS_IN_30M}',
            for_="",
            severity="page",
            summary="Gateway {{ $labels.instance }} restarted {{ $value }} times in 30 minutes",
            description=(
                "The gateway process keeps starting again: a worker that dies takes its siblings down, and "
                "the container or compose restarts them."
            ),
            anchor="gateway-restarting",
        ),
        _alert(
            "PiaaHistoryBacklogGrowing",
            f"{backlog} > {HISTORY_BACKLOG}\nand\nderiv({backlog}[{HISTORY_GROWING}]) > 0",
            for_=HISTORY_GROWING,
            severity="ticket",
            summary="History outbox holds {{ $value }} ratings not yet in the table, and growing",
            description=(
                f"The history writer {{{{ $labels.instance }}}} has more than {HISTORY_BACKLOG} outbox "
                f"entries to drain and the number has grown over {HISTORY_GROWING}: the writer is slower "
                "than the ratings or its rounds fail (the table store unavailable). At history_max_backlog "
                "(default 2000) in one slot, AddRatings fails UNAVAILABLE."
            ),
            anchor="history-backlog-growing",
        ),
        _alert(
            "PiaaHistoryWriterFailing",
            f"sum by (namespace, instance) (rate(piaa_history_failures_total{{{hjob}}}[5m])) > 0",
            for_="10m",
            severity="ticket",
            summary="History writer {{ $labels.instance }} fails its drain rounds",
            description=(
                "Drain rounds of the history writer fail (Redis or the table store) for 10 minutes: the "
                "outbox is not drained while this lasts."
            ),
            anchor="history-writer-failing",
        ),
        _alert(
            "PiaaTargetDown",
            f'up{{job=~"{GATEWAY_JOB}|{TRITON_JOB}|{HISTORY_JOB}"}} == 0',
            for_="2m",
            severity="page",
            summary="{{ $labels.job }} {{ $labels.instance }} does not answer scrapes",
            description=(
                "Prometheus cannot scrape this target: the process is down or unreachable, and its alerts "
                "above see no data."
            ),
            anchor="target-down",
        ),
        *(
            _alert(
                "PiaaNoTargetUp",
                f'absent(up{{job="{job}"}} == 1)',
                for_="5m",
                severity="page",
                summary=f"No {job} target answers scrapes",
                description=(
                    f"Prometheus scrapes no {job} target successfully, or has none to scrape: on Kubernetes "
                    "a pod that is not ready leaves its Service's endpoints, so a crash-looping deployment "
                    "disappears from the targets instead of showing as down."
                ),
                anchor="target-down",
                labels={"job": job},
            )
            for job in (GATEWAY_JOB, TRITON_JOB)
        ),
    ]


def rule_groups() -> list[dict[str, Any]]:
    """The rule groups, the same for compose's rule file and the PrometheusRule. The burn alerts share a
    group with the ratios they read: a group runs its rules in order, so each alert sees this evaluation's
    ratios (groups run independently, and an alert in another group could see the previous ones)."""
    return [
        {"name": "piaa-slo", "rules": recording_rules() + burn_alerts()},
        {"name": "piaa-alerts", "rules": other_alerts()},
    ]


def prometheus_rule() -> dict[str, Any]:
    """rule_groups() as a Prometheus Operator PrometheusRule (monitoring.coreos.com/v1)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "piaa",
            "namespace": "piaa",
            # kube-prometheus-stack's default ruleSelector, as on the ServiceMonitors: set yours.
            "labels": {"app.kubernetes.io/part-of": "piaa", "release": "prometheus"},
        },
        "spec": {"groups": rule_groups()},
    }


# ---- the dashboard --------------------------------------------------------------------------------------

G = 'job=~"$job"'
"""Matcher of the gateway's series: the dashboard variable $job (label_values of piaa_requests_total)."""
T = 'job=~"$triton_job"'
"""Matcher of Triton's series: $triton_job (label_values of nv_inference_request_success)."""
H = 'job=~"$history_job"'
"""Matcher of the history writer's series: $history_job (label_values of piaa_history_backlog)."""
RATE = "$__rate_interval"
NOT_OK = 'code!="OK"'
BATCH_READ = 'op="batch_read"'
VARIABLES = ("job", "triton_job", "history_job", "__rate_interval")
"""The variables a panel's PromQL may use; concrete() substitutes them."""


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    empty_without_gpu: bool = False
    """Triton exports nv_gpu_* only with a GPU: on a CPU stack the panel is empty (the test knows)."""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{{{', '.join(matchers)}}}[{RATE}])"


def quantile(phi: float, metric: str, by: str, *matchers: str) -> str:
    return f"histogram_quantile({phi}, sum by ({by}, le) ({rate(metric + '_bucket', *matchers)}))"


def mean(metric: str, by: str, *matchers: str) -> str:
    s, c = rate(metric + "_sum", *matchers), rate(metric + "_count", *matchers)
    return f"sum by ({by}) ({s}) / clamp_min(sum by ({by}) ({c}), 1e-9)"


def share(part: str, whole: str, by: str = "") -> str:
    """sum(part)/sum(whole), 0 while `part` has no series yet (a counter with labels appears at its first
    increment)."""
    agg = f"sum by ({by})" if by else "sum"
    return f"({agg} ({part}) or 0 * {agg} ({whole})) / {agg} ({whole})"


def rows() -> tuple[Row, ...]:
    """The dashboard's rows, top to bottom."""
    score = f'method=~"{SCORE_METHODS}"'
    return (
        Row(
            "Requests per RPC",
            (
                Panel(
                    "Requests by RPC",
                    "RPCs finished per second (a ScoreStream counts each of its requests).",
                    (q(f"sum by (method) ({rate('piaa_requests_total', G)})", "{{method}}"),),
                    "reqps",
                ),
                Panel(
                    "Non-OK answers by RPC and code",
                    "Every code but OK: callers' mistakes (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED) "
                    "as well as the service's failures.",
                    (
                        q(
                            f"sum by (method, code) ({rate('piaa_requests_total', G, NOT_OK)})",
                            "{{method}} {{code}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Server error ratio by RPC",
                    f"Share of requests that failed with {SERVER_ERRORS.replace('|', ', ')}: what the "
                    f"error SLO counts ({ERROR_SLO:.1%} of Score/ScoreStream must not).",
                    (
                        q(
                            share(
                                rate("piaa_requests_total", G, _SERVER_ERROR_CODES),
                                rate("piaa_requests_total", G),
                                "method",
                            ),
                            "{{method}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Score SLO burn rate (1 h)",
                    "How fast each Score SLO's 30-day budget burns: 1 spends it in 30 days; the fast-burn "
                    "alerts fire above 14.4 (1 h and 5 m), the slow-burn ones above 6 (6 h and 30 m).",
                    (
                        q(f"piaa:score_errors:ratio_rate1h / {round(1 - ERROR_SLO, 6)}", "errors"),
                        q(
                            f"piaa:score_slow:ratio_rate1h / {round(1 - LATENCY_SLO, 6)}",
                            f"slower than {LATENCY_THRESHOLD_S} s",
                        ),
                    ),
                ),
            ),
        ),
        Row(
            "Latency",
            (
                Panel(
                    "p99 latency by RPC",
                    "Whole-RPC latency in the gateway (piaa_request_seconds), 99th percentile.",
                    (q(quantile(0.99, "piaa_request_seconds", "method", G), "{{method}}"),),
                    "s",
                ),
                Panel(
                    "p50 latency by RPC",
                    "Median of the same.",
                    (q(quantile(0.5, "piaa_request_seconds", "method", G), "{{method}}"),),
                    "s",
                ),
                Panel(
                    "Score p50 / p95 / p99",
                    f"Score and ScoreStream requests; the latency SLO: {LATENCY_SLO:.0%} within "
                    f"{LATENCY_THRESHOLD_S} s.",
                    tuple(
                        q(
                            quantile(phi, "piaa_request_seconds", "namespace", G, score),
                            f"p{round(phi * 100)}",
                        )
                        for phi in (0.5, 0.95, 0.99)
                    ),
                    "s",
                ),
                Panel(
                    "p99 per stage of a micro-batch",
                    "queue: waiting in the micro-batcher (with back-pressure from Triton); triton: the "
                    "Triton call of the misses; redis: the batch's one read; personalize: the numpy step.",
                    (q(quantile(0.99, "piaa_stage_seconds", "stage", G), "{{stage}}"),),
                    "s",
                ),
            ),
        ),
        Row(
            "Personalization",
            (
                Panel(
                    "Personalized share",
                    "Scores served personalized / all scores (personalized + fallbacks of every reason).",
                    (
                        q(
                            f"sum ({rate('piaa_personalized_scores_total', G)})\n/\n"
                            f"(sum ({rate('piaa_personalized_scores_total', G)})"
                            f" + (sum ({rate('piaa_fallbacks_total', G)}) or vector(0)))",
                            "personalized",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Fallbacks by reason",
                    "Scores served generic: no_profile (user never rated), stale_profile (refit pending), "
                    "store_unavailable (Redis unreachable), disabled (generic_only asked).",
                    (q(f"sum by (reason) ({rate('piaa_fallbacks_total', G)})", "{{reason}}"),),
                    "ops",
                ),
                Panel(
                    "Cache hit ratios",
                    "Feature cache (head outputs by digest: worker memory, then Redis), profile LRU, and "
                    "images answered wholly from the worker's memory (no Redis, no batcher).",
                    (
                        q(
                            share(
                                rate("piaa_feature_cache_lookups_total", G, 'result="hit"'),
                                rate("piaa_feature_cache_lookups_total", G),
                            ),
                            "feature cache",
                        ),
                        q(
                            share(
                                rate("piaa_profile_cache_lookups_total", G, 'result="hit"'),
                                rate("piaa_profile_cache_lookups_total", G),
                            ),
                            "profile LRU",
                        ),
                        q(
                            f"sum ({rate('piaa_memory_images_total', G)})\n/\n"
                            f"clamp_min(sum ({rate('piaa_memory_images_total', G)})"
                            f" + sum ({rate('piaa_batch_images_sum', G)}), 1e-9)",
                            "answered from memory",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Feature-cache writes and refits",
                    "Head outputs written behind the answers, by result (failed and dropped are lost "
                    "writes: the next call computes them again); refits of stale profiles: done, failed, "
                    "dropped (the refit queue was full) and skipped (another gateway's layout is the "
                    "deployment's).",
                    (
                        q(
                            f"sum by (result) ({rate('piaa_feature_cache_writes_total', G)})",
                            "write {{result}}",
                        ),
                        *(
                            q(f"sum ({rate(f'piaa_{name}_total', G)})", name.replace("_", " "))
                            for name in ("refits", "refits_failed", "refits_dropped", "refits_skipped")
                        ),
                    ),
                    "ops",
                ),
            ),
        ),
        Row(
            "Micro-batching",
            (
                Panel(
                    "Images per micro-batch",
                    "Images the micro-batcher hands to the pipeline at once: mean and 95th percentile.",
                    (
                        q(mean("piaa_batch_images", "namespace", G), "mean"),
                        q(quantile(0.95, "piaa_batch_images", "namespace", G), "p95"),
                    ),
                ),
                Panel(
                    "Images per Triton call",
                    "The cache misses of one micro-batch, sent as one Triton request.",
                    (
                        q(mean("piaa_triton_batch_images", "namespace", G), "mean"),
                        q(quantile(0.95, "piaa_triton_batch_images", "namespace", G), "p95"),
                    ),
                ),
                Panel(
                    "Images per second by path",
                    "Through the micro-batcher, through Triton (cache misses), from the worker's memory.",
                    (
                        q(f"sum ({rate('piaa_batch_images_sum', G)})", "micro-batcher"),
                        q(f"sum ({rate('piaa_triton_images_total', G)})", "Triton"),
                        q(f"sum ({rate('piaa_memory_images_total', G)})", "memory"),
                    ),
                    "ops",
                ),
            ),
        ),
        Row(
            "Redis",
            (
                Panel(
                    "Round trips by operation",
                    "Requests the store sends to Redis (one per node a pipelined read touches).",
                    (q(f"sum by (op) ({rate('piaa_redis_round_trips_total', G)})", "{{op}}"),),
                    "ops",
                ),
                Panel(
                    "Round trips per micro-batch",
                    "batch_read round trips per micro-batch: 1 on one Redis, up to one per primary on a "
                    "cluster; 0 while the worker's memory answers.",
                    (
                        q(
                            f"sum ({rate('piaa_redis_round_trips_total', G, BATCH_READ)})\n/\n"
                            f"clamp_min(sum ({rate('piaa_batch_images_count', G)}), 1e-9)",
                            "batch_read per batch",
                        ),
                    ),
                ),
                Panel(
                    "Redis read latency (p50, p99)",
                    "A micro-batch's one read (stage redis).",
                    tuple(
                        q(quantile(phi, "piaa_stage_seconds", "namespace", G, 'stage="redis"'), f"p{p}")
                        for phi, p in ((0.5, 50), (0.99, 99))
                    ),
                    "s",
                ),
                Panel(
                    "Redis errors by kind",
                    "Store operations that failed after the client's retries: unavailable (unreachable, "
                    "timeout, no primary) or error.",
                    (q(f"sum by (kind) ({rate('piaa_redis_errors_total', G)})", "{{kind}}"),),
                    "ops",
                ),
            ),
        ),
        Row(
            "Triton",
            (
                Panel(
                    "Requests by model",
                    "Successful and failed inference requests per model (the ensemble and its steps).",
                    (
                        q(f"sum by (model) ({rate('nv_inference_request_success', T)})", "{{model}}"),
                        q(
                            f"sum by (model) ({rate('nv_inference_request_failure', T)})",
                            "{{model}} failed",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Queue time per request by model",
                    "Mean time a request waits in the model's scheduler queue.",
                    (
                        q(
                            f"sum by (model) ({rate('nv_inference_queue_duration_us', T)})\n/\n"
                            f"clamp_min(sum by (model) ({rate('nv_inference_request_success', T)}), 1e-9)"
                            "\n/ 1e6",
                            "{{model}}",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Compute time per request by model",
                    "Mean input + infer + output compute time per request (a batch's time counts for each "
                    "request in it).",
                    (
                        q(
                            f"sum by (model) ({rate('nv_inference_compute_input_duration_us', T)}"
                            f" + {rate('nv_inference_compute_infer_duration_us', T)}"
                            f" + {rate('nv_inference_compute_output_duration_us', T)})\n/\n"
                            f"clamp_min(sum by (model) ({rate('nv_inference_request_success', T)}), 1e-9)"
                            "\n/ 1e6",
                            "{{model}}",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Inferences per execution by model",
                    "Triton's own batch size: inferences (images) per model execution.",
                    (
                        q(
                            f"sum by (model) ({rate('nv_inference_count', T)})\n/\n"
                            f"clamp_min(sum by (model) ({rate('nv_inference_exec_count', T)}), 1e-9)",
                            "{{model}}",
                        ),
                    ),
                ),
                Panel(
                    "Pending requests by model",
                    "Requests received and not yet executing.",
                    (q(f"sum by (model) (nv_inference_pending_request_count{{{T}}})", "{{model}}"),),
                ),
            ),
        ),
        Row(
            "GPU",
            (
                Panel(
                    "GPU utilisation",
                    "Triton's nv_gpu_utilization per GPU (0-1). Empty on a CPU-only Triton.",
                    (
                        q(
                            f"avg by (instance, gpu_uuid) (nv_gpu_utilization{{{T}}})",
                            "{{instance}} {{gpu_uuid}}",
                        ),
                    ),
                    "percentunit",
                    empty_without_gpu=True,
                ),
                Panel(
                    "GPU memory used",
                    "Used / total GPU memory per GPU. Empty on a CPU-only Triton.",
                    (
                        q(
                            f"sum by (instance, gpu_uuid) (nv_gpu_memory_used_bytes{{{T}}})\n/\n"
                            f"sum by (instance, gpu_uuid) (nv_gpu_memory_total_bytes{{{T}}})",
                            "{{instance}} {{gpu_uuid}}",
                        ),
                    ),
                    "percentunit",
                    empty_without_gpu=True,
                ),
                Panel(
                    "GPU power",
                    "Power draw per GPU. Empty on a CPU-only Triton.",
                    (
                        q(
                            f"sum by (instance, gpu_uuid) (nv_gpu_power_usage{{{T}}})",
                            "{{instance}} {{gpu_uuid}}",
                        ),
                    ),
                    "watt",
                    empty_without_gpu=True,
                ),
            ),
        ),
        Row(
            "History",
            (
                Panel(
                    "History backlog",
                    "Ratings in the Redis outbox not yet in the history table, per writer (all slots). "
                    f"PiaaHistoryBacklogGrowing fires above {HISTORY_BACKLOG} and growing.",
                    (q(f"sum by (instance) (piaa_history_backlog{{{H}}})", "{{instance}}"),),
                ),
                Panel(
                    "History rows appended",
                    "Rows appended to the table per second, and outbox entries found already in it "
                    "(replayed after a writer crashed before its ack).",
                    (
                        q(f"sum by (instance) ({rate('piaa_history_rows_total', H)})", "{{instance}} rows"),
                        q(
                            f"sum by (instance) ({rate('piaa_history_replayed_total', H)})",
                            "{{instance}} replayed",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "History failed rounds",
                    "Drain rounds per second that failed (Redis or the table store).",
                    (q(f"sum by (instance) ({rate('piaa_history_failures_total', H)})", "{{instance}}"),),
                ),
            ),
        ),
        Row(
            "Processes",
            (
                Panel(
                    "Gateway CPU",
                    "CPU-seconds per second of each gateway process (worker 0's /metrics).",
                    (q(f"sum by (instance) ({rate('process_cpu_seconds_total', G)})", "{{instance}}"),),
                ),
                Panel(
                    "Gateway resident memory",
                    "Resident set size of each gateway process.",
                    (q(f"sum by (instance) (process_resident_memory_bytes{{{G}}})", "{{instance}}"),),
                    "bytes",
                ),
                Panel(
                    "Gateway restarts (1 h)",
                    "Process starts per gateway in the last hour (changes of process_start_time_seconds).",
                    (q(f"changes(process_start_time_seconds{{{G}}}[1h])", "{{instance}}"),),
                ),
                Panel(
                    "Triton CPU and memory",
                    "Triton's host CPU utilisation (0-1) and used host memory share.",
                    (
                        q(f"avg by (instance) (nv_cpu_utilization{{{T}}})", "{{instance}} CPU"),
                        q(
                            f"sum by (instance) (nv_cpu_memory_used_bytes{{{T}}})\n/\n"
                            f"sum by (instance) (nv_cpu_memory_total_bytes{{{T}}})",
                            "{{instance}} memory",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Targets up",
                    "1 while Prometheus scrapes the target.",
                    (q('up{job=~"$job|$triton_job|$history_job"}', "{{job}} {{instance}}"),),
                ),
            ),
        ),
    )


def concrete(expr: str, values: dict[str, str]) -> str:
    """`expr` with every dashboard variable ($job, $triton_job, $__rate_interval) replaced by `values`;
    raises KeyError naming a variable that has no value."""
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": query.expr,
                "legendFormat": query.legend,
            }
            for i, query in enumerate(panel.queries)
        ],
    }


def _variable(name: str, label: str, metric: str, default: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": f"label_values({metric}, job)",
        "definition": f"label_values({metric}, job)",
        "current": {"text": default, "value": default},
        "refresh": 2,
        "includeAll": False,
        "multi": False,
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (schema 39): a row per rows() entry, its panels side by side."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in rows():
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        # The row's 24 columns shared out, the first panels one wider when they do not divide evenly.
        width, wider = divmod(24, len(row.panels))
        x = 0
        for i, panel in enumerate(row.panels):
            w = width + (1 if i < wider else 0)
            panels.append(_panel_json(panel, next_id, x, y, w))
            next_id += 1
            x += w
        y += 8
    return {
        "uid": "piaa-overview",
        "title": "PIAA serving",
        "description": (
            "Gateway, Redis and Triton of one PIAA deployment (generated by deploy/monitoring/generate.py; "
            "docs/operations.md, 'Dashboards and alerts')."
        ),
        "tags": ["piaa"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable("job", "Gateway job", "piaa_requests_total", GATEWAY_JOB),
                _variable("triton_job", "Triton job", "nv_inference_request_success", TRITON_JOB),
                _variable("history_job", "History writer job", "piaa_history_backlog", HISTORY_JOB),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


# ---- the files ------------------------------------------------------------------------------------------

HEADER = (
    "# Generated by deploy/monitoring/generate.py from its rule_groups(): edit that, then run it.\n# {what}\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the files read as the expressions do."""


_Dumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)


def files() -> dict[Path, str]:
    """Every generated file and its content."""
    rules_text = HEADER.format(
        what="Prometheus rule file for compose (deploy/compose/prometheus.yml loads it)."
    )
    rules_text += _yaml({"groups": rule_groups()})
    crd_text = HEADER.format(
        what="The same groups as a Prometheus Operator PrometheusRule (deploy/monitoring/kustomization.yaml)."
    )
    crd_text += _yaml(prometheus_rule())
    return {
        DASHBOARD_FILE: json.dumps(dashboard(), indent=2) + "\n",
        RULES_FILE: rules_text,
        PROMETHEUS_RULE_FILE: crd_text,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from its source")
    args = parser.parse_args(argv)
    stale = []
    for path, text in files().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent.parent)}")
    for path in stale:
        print(f"{path.relative_to(HERE.parent.parent)} is not current: run deploy/monitoring/generate.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
