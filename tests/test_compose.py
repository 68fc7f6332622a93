"""docker/compose.yaml, the Dockerfiles and the KEDA example, checked as files.

No Docker engine runs in CI, so the stack itself is not started here: these checks hold
the files to what docs/deploy.md promises (services, healthchecks, GPU reservations,
no weights in images, every variable documented in .env.example).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
GPU_WORKERS = [name for name in SERVICES if name.startswith("worker-gpu")]
ENV_EXAMPLE = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def cpu_refine_workers() -> list[str]:
    return [
        name
        for name, s in SERVICES.items()
        if "cpu" in s.get("profiles", [])
        and "--queues refine" in command(s)
        and environment(s).get("REFINERY_DEVICE") == "cpu"
    ]


def queues_served(service: dict) -> list[str]:
    """The queues `refinery worker` (the worker image's entrypoint) serves with the service's
    command as its arguments, under default settings."""
    from cli.worker import resolve_queues, worker
    from shared.settings import Settings

    context = worker.make_context("worker", list(service.get("command", [])))
    return resolve_queues(Settings(_env_file=None), context.params["queues"])


def test_model_workers_serve_the_default_queues_and_name_only_known_ones() -> None:
    from shared.routing import default_queues, model_queues
    from shared.settings import Settings

    settings = Settings(_env_file=None)
    assert default_queues(settings) == ["generate", "refine"]
    for name in [*GPU_WORKERS, *cpu_refine_workers()]:
        assert set(queues_served(SERVICES[name])) <= set(model_queues(settings)), name


def test_services_exist() -> None:
    for name in ("redis", "minio", "minio-init", "worker-gpu0", "callbacks", "gateway", "flower"):
        assert name in SERVICES, name
    assert cpu_refine_workers(), "a CPU refine worker under a profile"
    assert "--queues callbacks" in command(SERVICES["callbacks"])


def test_redis_persists_and_needs_a_password() -> None:
    cmd = command(SERVICES["redis"])
    assert "--appendonly yes" in cmd
    assert "--requirepass ${REDIS_PASSWORD" in cmd
    assert "/data" in " ".join(SERVICES["redis"]["volumes"])
    # Every client connects with that password.
    for name, service in SERVICES.items():
        url = environment(service).get("REFINERY_REDIS_URL")
        if url is not None:
            # Unless REDIS_URL replaces it (profile "ha", where it carries the password too).
            assert url.startswith("${REDIS_URL:-redis://:${REDIS_PASSWORD"), name
            assert "@${REDIS_ADDRESS:-redis:6379}/" in url, name


def test_ha_profile_has_a_replica_and_three_sentinels_with_a_quorum() -> None:
    ha = {name for name, s in SERVICES.items() if "ha" in s.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel1", "sentinel2", "sentinel3"}
    replica = command(SERVICES["redis-replica"])
    assert "--replicaof redis 6379" in replica and "--appendonly yes" in replica
    assert "--maxmemory-policy noeviction" in replica
    for node in ("redis", "redis-replica"):
        # Either may be primary after a failover: both ask for the password and give it.
        assert "--requirepass ${REDIS_PASSWORD" in command(SERVICES[node]), node
        assert "--masterauth ${REDIS_PASSWORD" in command(SERVICES[node]), node
    volumes = set()
    for name in ("sentinel1", "sentinel2", "sentinel3"):
        script = " ".join(SERVICES[name]["entrypoint"])
        assert "sentinel monitor mymaster redis 6379 2" in script, name
        assert "sentinel auth-pass mymaster $$REDIS_PASSWORD" in script, name
        assert "--sentinel" in script, name
        # Each rewrites its own file: one volume each.
        (volume,) = SERVICES[name]["volumes"]
        volumes.add(volume.split(":")[0])
    assert len(volumes) == 3
    # The clients reach them through REDIS_URL, named in .env.example with the master name.
    assert {"REDIS_URL", "REFINERY_REDIS_SENTINEL_MASTER"} <= ENV_EXAMPLE
    assert "REFINERY_REDIS_SENTINEL_MASTER" in COMPOSE["x-refinery-env"]


def test_every_long_running_service_has_a_healthcheck() -> None:
    long_running = [name for name, s in SERVICES.items() if s.get("restart", "no") != "no"]
    assert set(long_running) >= {"redis", "minio", "worker-gpu0", "callbacks", "flower", *cpu_refine_workers()}
    for name in long_running:
        test = SERVICES[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert "redis-cli" in " ".join(SERVICES["redis"]["healthcheck"]["test"])
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_each_gpu_worker_reserves_one_nvidia_gpu() -> None:
    assert GPU_WORKERS
    seen_ids = []
    for name in GPU_WORKERS:
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, name
        seen_ids += device["device_ids"]
        # The container sees its one GPU as device 0, whatever its host index.
        assert environment(SERVICES[name]).get("CUDA_VISIBLE_DEVICES") == "0", name
        # No queues spelt out: the worker's own default, from the job kinds' declarations.
        assert queues_served(SERVICES[name]) == ["generate", "refine"], name
    assert len(seen_ids) == len(set(seen_ids)), "two workers on one GPU"
    for name in cpu_refine_workers():
        assert "deploy" not in SERVICES[name]
    # Callbacks run in their own service, so no model worker starts one beside itself.
    for name in [*GPU_WORKERS, *cpu_refine_workers()]:
        assert "--no-callbacks" in command(SERVICES[name]), name


def test_published_host_ports_do_not_collide() -> None:
    published = [str(port).rsplit(":", 1)[0] for s in SERVICES.values() for port in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_gateway_serves_on_its_port_and_checks_readiness() -> None:
    """`refinery gateway --host 0.0.0.0` in the light image, on the port it publishes, with
    /readyz (Redis and the bucket answer) as its healthcheck (docs/deploy.md, "8. The HTTP gateway")."""
    from cli.gateway import gateway as gateway_command

    service = SERVICES["gateway"]
    argv = service["command"]
    assert argv == ["refinery", "gateway", "--host", "0.0.0.0"]
    # The arguments are ones the command takes.
    assert gateway_command.make_context("gateway", argv[2:]).params["host"] == "0.0.0.0"
    assert service["image"].startswith("${PRODUCER_IMAGE")
    assert service["build"]["dockerfile"] == "docker/producer.Dockerfile"
    env = environment(service)
    port = env["REFINERY_GATEWAY_PORT"]
    assert env["REFINERY_REDIS_URL"] and env["REFINERY_S3_BUCKET"]
    assert [str(p).rsplit(":", 1)[1] for p in service["ports"]] == [port]
    assert str(service["ports"][0]).startswith("${GATEWAY_PUBLISH:-127.0.0.1:")
    check = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in check
    # Ready means the bucket exists: after minio-init made it.
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert service["restart"] == "unless-stopped"


def test_flower_has_basic_auth_and_persistent_state() -> None:
    flower = SERVICES["flower"]
    cmd = command(flower)
    assert "flower" in cmd
    assert "--basic-auth=${FLOWER_BASIC_AUTH" in cmd
    assert "--persistent=True" in cmd and "--db=/data/flower.db" in cmd
    assert any(v.endswith(":/data") for v in flower["volumes"])
    assert any(str(p).endswith(":5555") for p in flower["ports"])


def test_images_never_bake_weights() -> None:
    allowed_sources = {"pyproject.toml", "README.md", "shared", "producer", "worker", "refiner", "cli", "./"}
    for dockerfile in ("worker.Dockerfile", "producer.Dockerfile"):
        text = (DOCKER / dockerfile).read_text()
        instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
        for line in instructions:
            if line.startswith(("COPY", "ADD")):
                sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
                assert set(sources) <= allowed_sources, line
            assert not re.search(r"from_pretrained|snapshot_download|huggingface-cli|hf download", line), line
            # A token in ARG or ENV would be stored in the image's layers.
            assert not re.match(r"(ARG|ENV)\b.*HF_TOKEN", line), line
        assert re.search(r"^USER (?!root|0\b)", text, re.MULTILINE), f"{dockerfile} runs as root"
    worker = (DOCKER / "worker.Dockerfile").read_text()
    assert "HF_HOME=/cache/huggingface" in worker
    assert re.search(r'^VOLUME \["/cache/huggingface"\]', worker, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["refinery", "worker"\]', worker, re.MULTILINE)
    assert 'pip install ".[worker]"' in worker
    assert "torch" not in (DOCKER / "producer.Dockerfile").read_text().split("RUN pip install")[1].split("\n")[0]
    for name in [*GPU_WORKERS, *cpu_refine_workers()]:
        assert any(v.startswith("hf-cache:/cache/huggingface") for v in SERVICES[name]["volumes"]), name
    for name in GPU_WORKERS:
        assert "HF_TOKEN" in environment(SERVICES[name]), name


def strings(node: object) -> list[str]:
    """Every string in the parsed file, where compose interpolates (comments are not)."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in strings(item)]
    return [node] if isinstance(node, str) else []


def test_every_compose_variable_is_in_env_example() -> None:
    text = "\n".join(strings(COMPOSE)).replace("$$", "")  # "$$" is a literal "$" for the container's shell
    braced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))  # ${VAR}, ${VAR:-x}, ${VAR:?x}, nested
    assert braced >= {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    assert not re.findall(r"\$(?!\{)[A-Za-z_]", text), "use ${VAR}, so this test sees it"
    # Keys without a value are passed through from the environment / .env file.
    passed_through = {key for s in SERVICES.values() for key, value in environment(s).items() if value is None}
    missing = sorted((braced | passed_through) - ENV_EXAMPLE)
    assert not missing, f"add to .env.example: {missing}"


def test_keda_scales_on_the_generate_lists() -> None:
    from shared.broker import PRIORITY_STEPS, queue_lists
    from shared.contract import Priority
    from shared.settings import Settings

    documents = list(yaml.safe_load_all((DOCKER / "keda-scaledobject.yaml").read_text()))
    (scaled,) = [d for d in documents if d["kind"] == "ScaledObject"]
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    # Celery on Redis keeps each queue as lists named like the queue, one per priority step;
    # the backlog is all of them, added up by the formula.
    queue = Settings(_env_file=None).queue("generate_and_refine")
    assert queue == "generate"
    lists = {t["metadata"]["listName"] for t in triggers}
    assert lists <= set(queue_lists(queue))
    assert {queue_lists(queue)[PRIORITY_STEPS.index(p.rank)] for p in Priority} <= lists
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert all(t["name"] in formula for t in triggers)
    for trigger in triggers:
        auth = trigger["authenticationRef"]["name"]
        assert any(d["kind"] == "TriggerAuthentication" and d["metadata"]["name"] == auth for d in documents)
