"""The alerts and the dashboard against what the processes really expose; deploy/'s
YAML under the repository's .yamllint.

``promtool test rules`` runs deploy/monitoring/tests/*.yml (one firing and one
quiet case per alert) with Debian's ``prometheus`` package, installed here when
promtool is missing (as root, as the browser test installs Chromium; skipped
with the reason only where it cannot be); a running collector and loader are
scraped and every metric name an alert or a dashboard query reads must be
among what they serve.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ingest.collector.server import serving
from ingest.core.db import Database
from ingest.core.processes import free_port
from ingest.core.settings import Settings
from ingest.core.shops import ShopCredentials
from tests.conftest import wait_for
from tests.helpers import batch

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
METRIC_NAME = re.compile(r"\beventpipe_[a-z_]+")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _install(package: str, binary: str) -> str | None:
    """Install Debian's ``package`` if ``binary`` is missing; why it can't be, or None."""
    if shutil.which(binary):
        return None
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return f"not root, cannot apt-get install {package}"
    for command, timeout in (
        (["apt-get", "update", "-q"], 120),
        (["apt-get", "install", "-y", "-q", "--no-install-recommends", package], 300),
    ):
        try:
            subprocess.run(
                command, env=APT_ENV, check=True, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.CalledProcessError as exc:
            return f"{' '.join(command)} failed: {(exc.stderr or exc.stdout).strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)} failed: {exc}"
    return None if shutil.which(binary) else f"{binary} still missing after apt-get install"


def _tool(package: str, binary: str) -> str:
    reason = _install(package, binary)
    if reason is not None:
        pytest.skip(f"{binary} (Debian's {package} package) could not be installed: {reason}")
    path = shutil.which(binary)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("prometheus", "promtool")


@pytest.fixture(scope="module")
def yamllint() -> str:
    return _tool("yamllint", "yamllint")


def test_deploy_is_yamllint_clean(yamllint: str) -> None:
    """Under the repository's .yamllint, warnings included."""
    done = subprocess.run(
        [yamllint, "--strict", "-c", str(ROOT / ".yamllint"), str(ROOT / "deploy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _alert_names() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def _used_metrics() -> set[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    exprs = [rule["expr"] for group in doc["groups"] for rule in group["rules"]]
    return {name for expr in [*exprs, *_dashboard_exprs()] for name in METRIC_NAME.findall(expr)}


def test_promtool_checks_and_unit_tests_pass(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert UNIT_TESTS, "no promtool unit tests in deploy/monitoring/tests"
    tested = subprocess.run(
        [promtool, "test", "rules", *map(str, UNIT_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=MONITORING / "tests",
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alert_names())
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a quiet case"


async def _scrape(url: str) -> set[str]:
    """Every sample name ``url`` serves (suffixes included)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **settings.to_env(),
        "EVENTPIPE_COLLECTOR_HOST": "127.0.0.1",
        "EVENTPIPE_LOG_LEVEL": "warning",
        "EVENTPIPE_LOADER_LAG_REFRESH_S": "0.5",
        **extra,
    }


@contextlib.asynccontextmanager
async def pipeline(settings: Settings, shop: ShopCredentials) -> AsyncIterator[tuple[str, str]]:
    """A collector and a loader process, after a short load (one good batch, one with
    a rejected event); yields the collector's and the loader's base URLs."""
    collector_port, loader_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", "collector"],
            env=_env(settings, EVENTPIPE_COLLECTOR_PORT=str(collector_port)),
        ),
        subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", "loader", "--stream", "behavior"],
            env=_env(settings, EVENTPIPE_LOADER_METRICS_PORT=str(loader_port)),
        ),
    ]
    collector_url = f"http://127.0.0.1:{collector_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def load() -> bool:
                try:
                    url = f"{collector_url}/v1/behavior?k={shop.write_key}"
                    async with (
                        http.post(url, data=orjson.dumps(batch(3))) as good,
                        http.post(url, data=b'[{"event_type": 1}]') as bad,
                    ):
                        return good.status == 200 and bad.status in (200, 400)
                except aiohttp.ClientError:
                    return False

            await wait_for(load, timeout=60)
        yield collector_url, f"http://127.0.0.1:{loader_port}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


async def test_running_collector_and_loader_expose_every_metric_alerts_and_panels_use(
    settings: Settings, shop: ShopCredentials
) -> None:
    """Before: the loader had no lag series until a batch, no dead-letter series
    before the first, no partition gauges, and the collector no spool cap."""
    used = _used_metrics()
    seen: dict[str, set[str]] = {"collector": set(), "loader": set()}
    async with pipeline(settings, shop) as (collector_url, loader_url):

        async def all_exposed() -> bool:
            try:
                seen["collector"] = await _scrape(f"{collector_url}/metrics")
                seen["loader"] = await _scrape(f"{loader_url}/metrics")
            except aiohttp.ClientError:
                return False
            return used <= seen["collector"] | seen["loader"]

        try:
            await wait_for(all_exposed, timeout=60, interval=0.5)
        except AssertionError:
            missing = used - seen["collector"] - seen["loader"]
            raise AssertionError(f"never exposed: {sorted(missing)}") from None
    spool = {n for n in seen["loader"] if n.startswith("eventpipe_spool_")}
    assert spool == set(), "a loader exports spool gauges"


async def test_prometheus_scraping_them_answers_every_dashboard_query(
    settings: Settings, shop: ShopCredentials, tmp_path: Path, promtool: str
) -> None:
    """A real Prometheus (Debian's, the package promtool comes with) scrapes a
    collector and a loader; every dashboard query returns data after a short load."""
    server = shutil.which("prometheus")
    if server is None:
        pytest.skip("Debian's prometheus package installed promtool but no prometheus")
    async with pipeline(settings, shop) as (collector_url, loader_url):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [url.split("//")[1]]}]}
                for job, url in (("collector", collector_url), ("loader", loader_url))
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom = subprocess.Popen(
            [
                server,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        empty: list[str] = _dashboard_exprs()
        try:
            async with aiohttp.ClientSession() as http:

                async def answered() -> bool:
                    for expr in list(empty):
                        try:
                            async with http.get(
                                f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}
                            ) as response:
                                body = await response.json()
                        except aiohttp.ClientError:
                            return False
                        if body.get("status") == "success" and body["data"]["result"]:
                            empty.remove(expr)
                    return not empty

                try:
                    await wait_for(answered, timeout=90, interval=1.0)
                except AssertionError:
                    raise AssertionError(f"dashboard queries without data: {empty}") from None
        finally:
            prom.terminate()
            prom.wait(timeout=30)


async def test_readyz_503_is_not_a_refused_batch(
    settings: Settings, db: Database, shop: ShopCredentials
) -> None:
    """Before: EventpipeCollectorBrokerUnavailable read every 503, /readyz's included."""
    from prometheus_client import REGISTRY

    def refused() -> float:
        return (
            REGISTRY.get_sample_value(
                "eventpipe_batches_refused_total", {"reason": "broker_unavailable"}
            )
            or 0.0
        )

    # No broker listens there, and no spool takes the batch instead.
    own = settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{free_port()}",
            "spool_enabled": False,
            "produce_timeout_s": 0.5,
        }
    )
    async with serving(own, db, key_cache_s=5) as (server, _), aiohttp.ClientSession() as http:
        before = refused()
        async with http.get(f"{server.url}/readyz") as ready:
            assert ready.status == 503
        assert refused() == before
        url = f"{server.url}/v1/behavior?k={shop.write_key}"
        async with http.post(url, data=orjson.dumps(batch(2))) as posted:
            assert posted.status == 503
        assert refused() == before + 1
