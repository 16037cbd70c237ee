"""deploy/compose: the compose file against the Compose specification's JSON schema, both profiles, and
agreement with the gateway's config, the Triton launcher and the Dockerfiles (no Docker engine needed)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from piaa_personalization.config import DEFAULT_PORT, ENV_PREFIX, GatewayConfig
from piaa_triton.repository import ENSEMBLE
from tests.deploy_scripts import load_launch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
ENV = {"REDIS_PASSWORD": "0123abcd"}
"""What a filled .env would hold (the file itself is never committed)."""


LAUNCH = load_launch()


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}; $$ is a literal $.

    Raises KeyError for a required variable that is missing (as `docker compose` refuses to start)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def compose(env: Mapping[str, str] = ENV) -> dict[str, Any]:
    raw = yaml.safe_load((COMPOSE / "compose.yaml").read_text())  # YAML merge keys (<<) resolved here
    return dict(interpolate(raw, env))


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema as check-jsonschema ships it (Apache-2.0, compose-spec)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads(vendor.joinpath("compose-spec.json").read_text()))


def validate(doc: dict[str, Any]) -> None:
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


def gateway_config() -> GatewayConfig:
    env = compose()["services"]["gateway"]["environment"]
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {
        ENV_PREFIX + f.upper() for f in GatewayConfig.__dataclass_fields__
    }
    assert not unknown, f"env vars the gateway does not read: {unknown}"
    return GatewayConfig.load([], {k: str(v) for k, v in env.items()})


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    validate(compose())


def test_the_schema_rejects_a_broken_compose_file() -> None:
    """Control: the validation above can fail (a misspelt service key, a bad condition)."""
    doc = compose()
    doc["services"]["gateway"]["restart_policy"] = "always"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)
    doc = compose()
    doc["services"]["triton-gpu"]["depends_on"]["engines"]["condition"] = "service_done"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_the_redis_password_is_required_and_never_committed() -> None:
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        compose({})
    assert ".env" in (COMPOSE / ".gitignore").read_text().split()
    assert re.search(r"^REDIS_PASSWORD=$", (COMPOSE / ".env.example").read_text(), re.M)


def test_profiles_gpu_and_cpu_share_everything_but_triton() -> None:
    services = compose()["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {
        "engines": ("gpu",), "triton-gpu": ("gpu",), "triton-cpu": ("cpu",),
        "redis": (), "gateway": (), "prometheus": (), "grafana": (),
    }  # fmt: skip
    for name in ("engines", "triton-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["triton-cpu"]
    gateway_deps = services["gateway"]["depends_on"]
    for name in ("triton-gpu", "triton-cpu"):  # whichever the profile starts
        assert gateway_deps[name] == {"condition": "service_healthy", "required": False}
    assert gateway_deps["redis"]["condition"] == "service_healthy"


def test_triton_waits_for_the_engine_build_in_the_same_image() -> None:
    services = compose()["services"]
    engines, triton = services["engines"], services["triton-gpu"]
    assert triton["depends_on"]["engines"]["condition"] == "service_completed_successfully"
    assert engines["image"] == triton["image"] and engines["build"] == triton["build"]
    assert engines["restart"] == "no"
    built = LAUNCH.build_parser().parse_args(engines["command"])
    served = LAUNCH.build_parser().parse_args(triton["command"])
    assert (built.command, built.profile, built.engines) == ("prepare", "gpu", True)
    assert (served.command, served.profile) == ("serve", "gpu")
    assert [v.split(":")[1] for v in engines["volumes"]] == [str(built.out)]
    assert [v.split(":")[1] for v in triton["volumes"]] == [str(served.repository)]
    assert "triton" not in json.dumps(engines["networks"]), "only the server answers to the name triton"
    cpu = LAUNCH.build_parser().parse_args(services["triton-cpu"]["command"])
    assert (cpu.command, cpu.profile) == ("serve", "cpu")


def test_triton_has_a_memory_backed_shm_and_a_readiness_health_check() -> None:
    services = compose()["services"]
    for name in ("triton-gpu", "triton-cpu"):
        service = services[name]
        size = re.fullmatch(r"(\d+)(gb|mb)", service["shm_size"])
        assert size and int(size.group(1)) * (1024 if size.group(2) == "gb" else 1) >= 512
        assert service["healthcheck"]["test"] == ["CMD", "python3", "/opt/piaa/launch.py", "ready"]
        assert "triton" in service["networks"]["backend"]["aliases"]
        assert "ports" not in service, "Triton is reached only through the gateway"


def test_gateway_settings_agree_with_its_config_and_the_launcher() -> None:
    services = compose()["services"]
    config = gateway_config()
    gateway = services["gateway"]
    assert config.port == DEFAULT_PORT and config.triton_model == ENSEMBLE
    assert config.host == "0.0.0.0"
    assert gateway["ports"] == [f"{DEFAULT_PORT}:{config.port}"]
    assert config.triton_url == f"triton:{LAUNCH.GRPC_PORT}"
    redis_url = re.fullmatch(r"redis://:(\w+)@(\w+):6379/0", config.redis_url)
    assert redis_url and redis_url.group(1) == ENV["REDIS_PASSWORD"] and redis_url.group(2) in services
    assert gateway["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/piaa-healthcheck"]
    assert "frontend" in gateway["networks"] and "backend" in gateway["networks"]


def test_redis_keeps_an_append_only_file_behind_a_password() -> None:
    conf = dict(
        line.split(None, 1)
        for line in (COMPOSE / "redis.conf").read_text().splitlines()
        if line[:1].isalpha()
    )
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    redis = compose()["services"]["redis"]
    script = redis["command"][-1]
    assert conf["include"] in script and "requirepass" in script and "$REDIS_PASSWORD" in script
    assert redis["environment"]["REDIS_PASSWORD"] == ENV["REDIS_PASSWORD"]
    assert "ports" not in redis
    assert compose()["networks"]["backend"]["internal"] is True


def test_prometheus_scrapes_tritons_and_the_gateways_metrics_ports() -> None:
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert targets["piaa-triton"] == [f"triton:{LAUNCH.METRICS_PORT}"]
    assert targets["piaa-gateway"] == [f"gateway:{gateway_config().metrics_port}"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfiles_expose_the_configured_ports_and_run_as_non_root() -> None:
    gateway = dockerfile_instructions(DEPLOY / "gateway.Dockerfile")
    env = dict(re.findall(r"(PIAA_\w+)=(\S+)", " ".join(a for i, a in gateway if i == "ENV")))
    config = GatewayConfig.load([], env)
    exposed = {int(p) for i, a in gateway if i == "EXPOSE" for p in a.split()}
    assert exposed == {config.port, config.metrics_port} and config.port == DEFAULT_PORT
    assert [a for i, a in gateway if i == "USER"][-1].split(":")[0] not in ("0", "root")
    assert next(a for i, a in gateway if i == "FROM").startswith("${PYTHON_IMAGE}")
    assert re.search(
        r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", (DEPLOY / "gateway.Dockerfile").read_text()
    )
    triton = dockerfile_instructions(DEPLOY / "triton.Dockerfile")
    exposed = {int(p) for i, a in triton if i == "EXPOSE" for p in a.split()}
    assert exposed == {LAUNCH.HTTP_PORT, LAUNCH.GRPC_PORT, LAUNCH.METRICS_PORT}
    assert [a for i, a in triton if i == "USER"][-1].split(":")[0] not in ("0", "root")
    assert re.search(r"ARG NGC_TAG=\d{2}\.\d{2}\n", (DEPLOY / "triton.Dockerfile").read_text())
    assert next(a for i, a in triton if i == "FROM") == "nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3"
