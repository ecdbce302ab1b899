"""The container files, checked with what runs here (no Docker engine): docker-compose.yml parses
and names only commands, variables, paths and services that exist; the Dockerfile's steps run as a
shell script in a scratch directory and venv, and the image's entrypoint, health check and volumes
work there."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, http, wait_until
from ingest.cli import COMMANDS
from ingest.config import _ENV_OVERRIDES, load_config

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
READ_VARIABLES = set(_ENV_OVERRIDES) | {"HIPCALL_CONFIG"}


def test_compose_services_run_our_commands_with_our_variables_and_existing_files():
    services = COMPOSE["services"]
    assert {"rabbitmq", "ingress", "worker", "reconcile"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: named volume {source} not declared"
        if name.startswith("rabbitmq"):
            assert service["image"].startswith("rabbitmq:4") and "healthcheck" in service
            continue
        assert service["command"][0] in COMMANDS, f"{name}: {service['command']}"
        env = service["environment"]
        assert set(env) <= READ_VARIABLES, f"{name}: a variable nobody reads: {set(env) - READ_VARIABLES}"
        config_path = env["HIPCALL_CONFIG"].replace("/app/config", str(ROOT / "config"))
        config = load_config(config_path, {"HIPCALL_AMQP_URL": env["HIPCALL_AMQP_URL"]})
        hosts = {url.split("@")[1].split(":")[0] for url in config.broker.urls}
        assert hosts == {"rabbitmq", "rabbitmq-2", "rabbitmq-3"}  # every node, in every process
        for dependency in service["depends_on"]:
            assert dependency in services
    assert services["ingress"]["ports"] == ["8080:8080"]
    assert "ports" not in services["worker"] and "container_name" not in services["worker"]  # --scale worker=N
    assert services["reconcile"]["profiles"] == ["reconcile"] and "HIPCALL_API_KEY" in services["reconcile"]["environment"]
    console = services["console"]
    assert console["profiles"] == ["console"] and console["ports"] == ["127.0.0.1:8081:8081"]
    assert load_config(config_path, {"HIPCALL_CONSOLE_HOST": console["environment"]["HIPCALL_CONSOLE_HOST"]}).console.host == "0.0.0.0"
    assert "8081/login" in " ".join(console["healthcheck"]["test"])
    spool, ledger = load_config(None, {}).spool.dir, load_config(None, {}).reconcile.ledger
    assert any(v.endswith(f"/var/lib/hipcall-ingest/{spool}") for v in services["ingress"]["volumes"])
    assert any(v.endswith("/var/lib/hipcall-ingest/" + str(Path(ledger).parent)) for v in services["reconcile"]["volumes"])


def test_the_cluster_profile_has_three_nodes_that_find_each_other():
    services = COMPOSE["services"]
    nodes = [n for n, s in services.items() if n.startswith("rabbitmq")]
    assert nodes == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    cookies = {services[n]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] for n in nodes}
    assert len(cookies) == 1  # one Erlang cookie, or they cannot cluster
    conf = (ROOT / "deploy/rabbitmq/cluster.conf").read_text()
    assert "peer_discovery_backend = classic_config" in conf
    for n in nodes:
        assert f"rabbit@{n}" in conf and services[n]["hostname"] == n
    for n in nodes[1:]:
        assert services[n]["profiles"] == ["cluster"] and "cluster.conf" in " ".join(services[n]["volumes"])


def _dockerfile() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


SYSTEM_STEPS = ("useradd",)  # changes this machine's users: not run here (the image runs as that user)


def test_the_dockerfile_steps_run_in_a_scratch_venv_and_the_image_serves_its_health_check(tmp_path):
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.1") and steps[0][1].endswith("-slim")
    assert ("USER", "hipcall") in steps
    root = tmp_path / "image"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv}/bin:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    workdir, entrypoint, healthcheck, volumes = root, None, None, []
    for word, rest in steps:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif word == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *sources, target = rest.split()
            for source in sources:
                destination = (workdir / target) if not target.startswith("/") else root / target.lstrip("/")
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, destination / Path(source).name)
        elif word == "RUN" and not rest.startswith(SYSTEM_STEPS):
            command = rest.replace(" /app", f" {root}/app")
            done = subprocess.run(["bash", "-ec", command], cwd=workdir, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"RUN {rest}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        elif word == "VOLUME":
            volumes = json.loads(rest)
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "HEALTHCHECK":
            healthcheck = json.loads(rest[rest.index("CMD") + 3:])
    assert entrypoint == ["hipcall-ingest"] and healthcheck and "/healthz" in healthcheck[-1]
    config = load_config(None, {})
    assert sorted(volumes) == sorted(f"/var/lib/hipcall-ingest/{d}" for d in (config.spool.dir, str(Path(config.reconcile.ledger).parent)))
    for volume in volumes:
        assert (root / volume.lstrip("/")).is_dir()  # made in the image, so a fresh volume starts with its owner

    # The entrypoint as the container runs it (config from HIPCALL_CONFIG, as set in the image).
    env["HIPCALL_CONFIG"] = str(root / env["HIPCALL_CONFIG"].lstrip("/"))
    help_text = subprocess.run(entrypoint + ["--help"], env=env, capture_output=True, text=True, cwd=workdir)
    assert help_text.returncode == 0 and all(command in help_text.stdout for command in COMMANDS)
    port = free_port()
    serve = subprocess.Popen(entrypoint + ["serve"], env={**env, "HIPCALL_HTTP_PORT": str(port),
                                                          "HIPCALL_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"},
                             cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(port), what="serve from the image's venv")
        check = healthcheck[:-1] + [healthcheck[-1].replace("8080", str(port))]
        assert subprocess.run(check, env=env, cwd=workdir).returncode == 0  # the HEALTHCHECK command itself
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    # The console from the installed package: its templates and stylesheet are in the image.
    port = free_port()
    console = subprocess.Popen(entrypoint + ["console"], env={**env, "HIPCALL_CONSOLE_TOKENS": "t",
                                                              "HIPCALL_CONSOLE_PORT": str(port)},
                               cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = wait_until(lambda: _get(f"http://127.0.0.1:{port}/login"), what="the console from the image's venv")
        assert page[0] == 200 and b"Log in" in page[1]
        assert _get(f"http://127.0.0.1:{port}/static/console.css")[0] == 200
    finally:
        console.terminate()
        console.wait(timeout=30)


def _get(url: str):
    try:
        status, _, body = http("GET", url)
        return status, body
    except OSError:
        return None


def _answers(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("path", ["Dockerfile", "docker-compose.yml", ".dockerignore"])
def test_the_container_files_are_in_the_deployment_docs(path):
    assert path in (ROOT / "docs" / "deployment.md").read_text()


def test_the_systemd_units_verify_and_reload_with_a_hup(tmp_path):
    """deploy/systemd/: systemd-analyze (Debian's `systemd` package) finds nothing wrong in either unit,
    with ExecStart pointed at this venv's command; reload is a SIGHUP to the supervisor alone."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    units = ROOT / "deploy" / "systemd"
    service = (units / "hipcall-ingest.service").read_text()
    socket_unit = (units / "hipcall-ingest.socket").read_text()
    command = Path(sys.executable).parent / "hipcall-ingest"
    (tmp_path / "hipcall-ingest.service").write_text(service.replace("/opt/hipcall-ingest/bin/hipcall-ingest", str(command)))
    (tmp_path / "hipcall-ingest.socket").write_text(socket_unit)
    done = subprocess.run([analyze, "verify", "./hipcall-ingest.socket", "./hipcall-ingest.service"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in service and "KillMode=mixed" in service
    assert "ExecStart=/opt/hipcall-ingest/bin/hipcall-ingest run" in service
    assert f"Backlog={load_config(None, {}).http.max_connections}" in socket_unit
