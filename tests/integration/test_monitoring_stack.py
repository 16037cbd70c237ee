"""The dashboard and the alert rules on a real Prometheus (Debian's `prometheus`) scraping the real gateway,
tritonserver and history writer (`piaa-admin history drain`): every panel's query returns data after real
traffic (the GPU panels none, on this CPU stack), every rule evaluates, the store alert singles out a
gateway whose Redis is down, and the history alerts stay quiet on a writer that keeps up."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_common.process import ManagedProcess, free_port, http_probe
from piaa_personalization.model.residual import FeatureLayout, Prior
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig
from piaa_triton.server import TritonServer
from tests.deploy_scripts import load
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo
from tests.fixtures.redis import RedisServer
from tests.integration.test_consistency_store import make_records

REPO = Path(__file__).resolve().parents[2]
GEN = load("monitoring/generate.py")
VALUES = {
    "job": GEN.GATEWAY_JOB,
    "triton_job": GEN.TRITON_JOB,
    "history_job": GEN.HISTORY_JOB,
    "__rate_interval": "5m",
}
"""The dashboard variables as Grafana would fill them here; the rate window covers all the test's traffic."""
GPU_ABSENT = "tritonserver runs with --allow-gpu-metrics=false on a machine without a GPU: no nv_gpu_* series"
STARS = pb.RATING_SCALE_STARS_1_5
HISTORY_PREFIX = f"mon{uuid.uuid4().hex[:6]}"
"""The key prefix of the ratings this module sends through the history outbox, and of its writer: the
writer drains these alone (the session's gateway runs without history)."""
TARGETS = 4
"""Two gateways, tritonserver, the history writer."""
WAIT_S = 90.0
"""Longest wait for Prometheus to scrape and evaluate after the traffic (scrape and evaluation every 1 s)."""


@dataclass
class Prometheus:
    process: ManagedProcess
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now; fails the test with Prometheus's error."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:
            pytest.fail(f"Prometheus refused {expr!r}: {err.read().decode()}")
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", (expr, body["data"]["resultType"])
        return list(body["data"]["result"])

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=30) as reply:
            return json.load(reply)["data"]


def host_port(metrics_url: str) -> str:
    return urllib.parse.urlsplit(metrics_url).netloc


def prometheus_config(gateways: list[str], triton: str, writer: str) -> dict[str, Any]:
    """deploy/compose/prometheus.yml with these targets, PIAA's rule file from the repository, and a 1 s
    scrape and evaluation interval (the job names stay compose's: the dashboard and rules use them)."""
    config = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(GEN.RULES_FILE)]
    targets = {GEN.GATEWAY_JOB: gateways, GEN.TRITON_JOB: [triton], GEN.HISTORY_JOB: [writer]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@pytest.fixture(scope="module")
def dead_store_gateway(triton_server: TritonServer) -> Iterator[GatewayProcess]:
    """A gateway whose Redis URL names a loopback port nobody listens on."""
    process = start_gateway(f"redis://127.0.0.1:{free_port()}/0", triton_server.grpc_url)
    try:
        yield process
    finally:
        process.close()


@dataclass
class Writer:
    process: ManagedProcess
    metrics_url: str
    store_config: StoreConfig
    """A store with history on, its keys under HISTORY_PREFIX: its ratings go through the outbox."""


@pytest.fixture(scope="module")
def history_writer(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Writer]:
    """A real `piaa-admin history drain` on the session's Redis, its table in a temporary folder, its
    /metrics on a free port (what the writer's Deployment will run)."""
    table = tmp_path_factory.mktemp("history") / "table"
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    admin = Path(sys.executable).parent / "piaa-admin"
    argv = [
        str(admin), "--redis-url", redis_server.url, "--key-prefix", HISTORY_PREFIX,
        "history", "--history-url", str(table),
        "drain", "--metrics-port", str(port), "--interval-s", "0.2",
    ]  # fmt: skip
    process = ManagedProcess(argv, ready=http_probe(lambda: metrics_url), name="piaa-history")
    with process:
        config = StoreConfig(url=redis_server.url, key_prefix=HISTORY_PREFIX, history_url=str(table))
        yield Writer(process, metrics_url, config)


def add_ratings_through_the_outbox(config: StoreConfig, seed: int, n: int) -> None:
    """n ratings of one user, added as the gateway's AddRatings adds them with history on."""

    async def add() -> None:
        store = RedisProfileStore(config)
        try:
            layout = FeatureLayout()
            records = make_records(seed, n)
            await store.add_ratings("acme", f"u{seed}", records, layout=layout, prior=Prior.zero(layout.dim))
        finally:
            await store.close()

    asyncio.run(add())


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory,
    gateway: GatewayProcess,
    dead_store_gateway: GatewayProcess,
    triton_server: TritonServer,
    history_writer: Writer,
) -> Iterator[Prometheus]:
    """A real prometheus on a free loopback port, its config and data in a temporary folder, once it has
    scraped every target."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: apt-get install prometheus (scripts/test_deps.sh does, as root)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = prometheus_config(
        [host_port(gateway.metrics_url), host_port(dead_store_gateway.metrics_url)],
        host_port(triton_server.metrics_url),
        host_port(history_writer.metrics_url),
    )
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        [
            exe,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        ready=http_probe(lambda: f"{url}/-/ready"),
        name="prometheus",
        start_timeout_s=60,
    )
    with process:
        server = Prometheus(process, url)
        wait_until(lambda: len(server.query("up == 1")) == TARGETS, "every target scraped", server)
        yield server


def wait_until(condition: Any, what: str, server: Prometheus) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {WAIT_S} s\n{server.process.log_tail()}")
        time.sleep(0.5)


def gateway_counter(gateway: GatewayProcess | Writer, name: str, **labels: str) -> float:
    """A counter's value on the gateway's (or the writer's) own /metrics (0 when the series does not exist
    yet)."""
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
    return total


@dataclass
class Sent:
    """What the traffic's answers said: scores personalized, and fallbacks by reason."""

    personalized: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)

    def count(self, scores: Any) -> None:
        for s in scores:
            if s.personalized:
                self.personalized += 1
            else:
                reason = pb.FallbackReason.Name(s.fallback_reason).removeprefix("FALLBACK_REASON_").lower()
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


def send_traffic(address: str, photos: list[Photo], sent: Sent) -> None:
    """Every RPC the dashboard breaks down, a personalized user, one without a profile, generic_only calls,
    cached images, and two callers' mistakes (INVALID_ARGUMENT, NOT_FOUND) so non-OK series exist; what the
    answers said is added to `sent`."""
    rater = f"mon-{uuid.uuid4().hex[:8]}"
    images = [pb.Image(data=p.path.read_bytes(), id=p.path.name) for p in photos]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        ratings = [
            pb.Rating(image=image, value=float(1 + i % 5), scale=STARS) for i, image in enumerate(images[:6])
        ]
        stub.AddRatings(pb.AddRatingsRequest(user_id=rater, ratings=ratings), timeout=120)
        for user, chunk in ((rater, images[4:8]), (rater, images[4:8]), (f"new-{rater}", images[8:10])):
            sent.count(stub.Score(pb.ScoreRequest(user_id=user, images=chunk), timeout=120).scores)
        sent.count(stub.Score(pb.ScoreRequest(images=images[:2], generic_only=True), timeout=120).scores)
        stream = [pb.ScoreRequest(user_id=rater, images=[image]) for image in images[:4]]
        for answer in stub.ScoreStream(iter(stream), timeout=120):
            sent.count(answer.response.scores)
        ranked = stub.RankAlbum(pb.RankAlbumRequest(user_id=rater, images=images[:6]), timeout=120)
        assert len(ranked.ranked) == 6
        sent.count(ranked.ranked)
        for bad, code in (("zz", grpc.StatusCode.INVALID_ARGUMENT), ("ab" * 32, grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as failed:
                stub.Score(pb.ScoreRequest(user_id=rater, images=[pb.Image(digest=bad)]), timeout=30)
            assert failed.value.code() == code


def send_to_dead_store(address: str, photos: list[Photo]) -> None:
    """A Score call on the gateway without Redis: answered, generic (store_unavailable)."""
    images = [pb.Image(data=p.path.read_bytes(), id=p.path.name) for p in photos]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        scores = stub.Score(pb.ScoreRequest(user_id="anyone", images=images), timeout=120).scores
    reasons = {pb.FallbackReason.Name(s.fallback_reason) for s in scores}
    assert reasons == {"FALLBACK_REASON_STORE_UNAVAILABLE"}, reasons


@dataclass
class Traffic:
    sent: Sent
    personalized_before: float
    personalized_after: float
    history_ratings: int
    """Ratings added through the history outbox (the writer appended each to its table)."""


@pytest.fixture(scope="module")
def traffic(
    prometheus: Prometheus,
    gateway: GatewayProcess,
    dead_store_gateway: GatewayProcess,
    history_writer: Writer,
    photos: list[Photo],
) -> Traffic:
    """The traffic, sent once Prometheus scrapes, in two rounds with a scrape between them: a labelled
    series appears at its first increment, and Prometheus takes a series' first sample as its start, so
    only the second round shows as a rate (as steady traffic would). Waited on until Prometheus has
    scraped the gateways and Triton after it and evaluated every rule group since."""
    before = gateway_counter(gateway, "piaa_personalized_scores_total")
    sent = Sent()
    ratings = 0
    for seed, photo_range in enumerate((slice(600, 610), slice(620, 630))):
        send_traffic(gateway.address, photos[photo_range], sent)
        send_to_dead_store(dead_store_gateway.address, photos[photo_range][:2])
        add_ratings_through_the_outbox(history_writer.store_config, seed, 3)
        ratings += 3
        wait_until(
            lambda: gateway_counter(history_writer, "piaa_history_rows_total") == ratings,  # noqa: B023
            "the writer appended the ratings",
            prometheus,
        )
        wait_scraped_and_evaluated(prometheus, time.time())
    after = gateway_counter(gateway, "piaa_personalized_scores_total")
    return Traffic(sent, before, after, ratings)


def wait_scraped_and_evaluated(prometheus: Prometheus, since: float) -> None:
    """Until every target was scraped, and every rule group evaluated, after `since`."""

    def done() -> bool:
        scrapes = prometheus.query("timestamp(up)")
        groups = prometheus.api("rules")["groups"]
        evaluated = [g.get("lastEvaluation", "") for g in groups]
        return (
            len(scrapes) == TARGETS
            and all(float(s["value"][1]) > since + 1 for s in scrapes)
            and len(groups) == len(GEN.rule_groups())
            and all(_rfc3339(t) > since + 2 for t in evaluated)
        )

    wait_until(done, "scraped and evaluated after the traffic", prometheus)


def _rfc3339(stamp: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 timestamps (nanoseconds cut to microseconds)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        return 0.0
    fraction = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + fraction + zone).timestamp()


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_query_returns_data_from_the_real_stack(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    """Each query of each panel, its variables filled as Grafana would: at least one finite sample (the GPU
    panels: none, with the reason)."""
    failures = []
    checked = 0
    for row in GEN.rows():
        for panel in row.panels:
            for query in panel.queries:
                result = prometheus.query(GEN.concrete(query.expr, VALUES))
                checked += 1
                if panel.empty_without_gpu:
                    if result:
                        failures.append(f"{panel.title}: data on a CPU stack?! {result[:2]}")
                elif not finite(result):
                    failures.append(
                        f"{row.title} / {panel.title} [{query.legend}]: {result[:3]}\n  {query.expr}"
                    )
    assert not failures, f"{len(failures)} of {checked} queries without data:\n" + "\n".join(failures)
    assert checked >= 30


def test_the_gpu_panels_are_the_only_ones_expected_empty_here() -> None:
    """Which panels a CPU stack leaves empty, and why (GPU_ABSENT): the Triton exporter's nv_gpu_* only."""
    empty = [p for row in GEN.rows() for p in row.panels if p.empty_without_gpu]
    assert [p.title for p in empty] == ["GPU utilisation", "GPU memory used", "GPU power"], GPU_ABSENT
    assert all("nv_gpu_" in q.expr for p in empty for q in p.queries)


def test_every_rule_evaluates_on_real_data(prometheus: Prometheus, traffic: Traffic) -> None:
    """Prometheus loaded every group of the rule file and evaluates them without error; each expression
    parses and runs against the real series; the SLO ratios exist and are 0 (no server error, none slow)
    or a share."""
    groups = prometheus.api("rules")["groups"]
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in GEN.rule_groups())
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    for group in GEN.rule_groups():
        for rule in group["rules"]:
            prometheus.query(rule["expr"])  # fails the test if Prometheus refuses it
    for window in GEN.RATIO_WINDOWS:
        for slo in ("errors", "slow"):
            (ratio,) = prometheus.query(f"piaa:score_{slo}:ratio_rate{window}")
            assert 0.0 <= float(ratio["value"][1]) <= 1.0, ratio


def test_the_store_alert_singles_out_the_gateway_whose_redis_is_down(
    prometheus: Prometheus, traffic: Traffic, gateway: GatewayProcess, dead_store_gateway: GatewayProcess
) -> None:
    (store_alert,) = [r for r in GEN.other_alerts() if r["alert"] == "PiaaStoreUnavailable"]
    firing = prometheus.query(store_alert["expr"])
    assert {r["metric"]["instance"] for r in firing} == {host_port(dead_store_gateway.metrics_url)}
    errors = prometheus.query('piaa_redis_errors_total{kind="unavailable"}')
    by_instance = {r["metric"]["instance"]: float(r["value"][1]) for r in errors}
    assert by_instance[host_port(dead_store_gateway.metrics_url)] > 0
    assert by_instance[host_port(gateway.metrics_url)] == 0


def test_personalized_and_fallback_counters_match_the_answers(
    traffic: Traffic, gateway: GatewayProcess, prometheus: Prometheus
) -> None:
    """piaa_personalized_scores_total moved by the scores the answers marked personalized (the session's
    gateway serves this module alone meanwhile), and every fallback reason answered has its series."""
    sent = traffic.sent
    assert sent.personalized > 0 and sent.fallbacks
    assert traffic.personalized_after - traffic.personalized_before == sent.personalized
    reasons = {
        r["metric"]["reason"] for r in prometheus.query(f'piaa_fallbacks_total{{job="{GEN.GATEWAY_JOB}"}}')
    }
    assert set(sent.fallbacks) <= reasons, (sent.fallbacks, reasons)


def test_the_history_panels_and_alerts_see_the_real_writer(
    prometheus: Prometheus, traffic: Traffic, history_writer: Writer
) -> None:
    """The writer's series as Prometheus scraped them under its job: every rating appended once, the backlog
    back to 0, no failed round; so neither history alert's expression returns anything, while each still
    evaluates on the writer's series (with its threshold lowered below the real values, it fires)."""
    instance = host_port(history_writer.metrics_url)
    job = f'job="{GEN.HISTORY_JOB}", instance="{instance}"'
    (rows,) = prometheus.query(f"piaa_history_rows_total{{{job}}}")
    assert float(rows["value"][1]) == traffic.history_ratings
    (backlog,) = prometheus.query(f"piaa_history_backlog{{{job}}}")
    assert float(backlog["value"][1]) == 0
    (failures,) = prometheus.query(f"piaa_history_failures_total{{{job}}}")
    assert float(failures["value"][1]) == 0
    alerts = {r["alert"]: r for r in GEN.other_alerts() if r["alert"].startswith("PiaaHistory")}
    assert set(alerts) == {"PiaaHistoryBacklogGrowing", "PiaaHistoryWriterFailing"}
    for rule in alerts.values():
        assert prometheus.query(rule["expr"]) == [], rule["alert"]
    # The same expressions reach the writer's real series: the rows counter in place of the failures one
    # (it rose), and a backlog threshold and slope that any value meets (the slope over the window is
    # negative when a scrape caught the ratings in the outbox before they drained).
    failing = alerts["PiaaHistoryWriterFailing"]["expr"].replace(
        "piaa_history_failures_total", "piaa_history_rows_total"
    )
    assert {r["metric"]["instance"] for r in prometheus.query(failing)} == {instance}
    original = alerts["PiaaHistoryBacklogGrowing"]["expr"]
    growing = original.replace(f"> {GEN.HISTORY_BACKLOG}", ">= 0").replace(") > 0", ") > -Inf")
    assert ">= 0" in growing and "> -Inf" in growing, original
    assert {r["metric"]["instance"] for r in prometheus.query(growing)} == {instance}
