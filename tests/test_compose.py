"""compose.yaml runs PostgreSQL, the engine (cpu or gpu profile) and the bot; checked without a Docker engine.

The file is read with PyYAML and its `${VAR}` references are interpolated here as compose does, so the
settings it passes are fed to the real settings classes (BotSettings, EngineSettings).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from bot.settings import BotSettings
from engine.settings import ENV_PREFIX, EngineSettings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ENGINES = ("engine-cpu", "engine-gpu")
# Placeholder values standing in for .env when the file is interpolated.
FAKE_ENV = {"DISCORD_TOKEN": "fake-token", "POSTGRES_PASSWORD": "fake-password",
            "MASQUE_ENGINE_API_KEY": "fake-key"}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY", re.IGNORECASE)
REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# The settings of the postgres image itself (https://hub.docker.com/_/postgres), not of our code.
POSTGRES_IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_INITDB_ARGS", "PGDATA"}


class MissingVariable(Exception):
    """A `${VAR:?message}` reference whose variable is unset or empty: compose refuses to start."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op else ""
    return REFERENCE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment after interpolation (FAKE_ENV unless told otherwise)."""
    raw = SERVICES[service].get("environment", {})
    assert isinstance(raw, dict), f"{service}: write environment as a mapping"
    return {key: interpolate(str(value), FAKE_ENV if env is None else env) for key, value in raw.items()}


def seconds(duration: str) -> float:
    """A compose duration (`90s`, `10m`, `1h30m`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    hours, minutes, secs = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined) by stage name."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\w+)", line, re.IGNORECASE):
            current = stages.setdefault(match[1], [])
        elif line and not line.startswith("#"):
            current.append(line)
    return stages


def walk_strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string value in the file with its path."""
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in walk_strings(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [item for index, value in enumerate(node) for item in walk_strings(value, f"{path}[{index}]")]
    return [(path, node)] if isinstance(node, str) else []


def engine_env_field_exists(name: str) -> bool:
    """True when EngineSettings reads this variable: MASQUE_CACHE_DIR, or MASQUE_ENGINE_<FIELD>[__<SUB>...]."""
    if name == "MASQUE_CACHE_DIR":
        return True
    if not name.startswith(ENV_PREFIX):
        return False
    model: type[BaseModel] | None = EngineSettings
    for part in name[len(ENV_PREFIX):].lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No MASQUE_* or DISCORD_* variable of the machine running the tests leaks into the settings."""
    import os

    for name in list(os.environ):
        if name.startswith(("MASQUE_", "DISCORD_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_three_parts_pgvector_two_engine_variants_and_the_bot():
    assert set(SERVICES) == {"postgres", *ENGINES, "bot"}
    assert SERVICES["postgres"]["image"] == "pgvector/pgvector:pg16"
    assert "profiles" not in SERVICES["postgres"] and "profiles" not in SERVICES["bot"]  # always run


def test_engine_profiles_cpu_offline_and_gpu_with_an_nvidia_reservation():
    cpu, gpu = SERVICES["engine-cpu"], SERVICES["engine-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert environment("engine-cpu")["MASQUE_ENGINE_PRESET"] == "offline"
    assert environment("engine-gpu")["MASQUE_ENGINE_PRESET"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert "deploy" not in cpu


def test_the_engine_image_takes_host_port_and_preset_from_the_environment():
    """A --preset (or --host, --port) in the image's CMD would beat MASQUE_ENGINE_PRESET: both variants would
    run whatever the CMD says."""
    commands = [line for line in dockerfile_stages()["engine"] if line.upper().startswith(("CMD", "ENTRYPOINT"))]
    commands += [str(SERVICES[name].get("command", "")) + str(SERVICES[name].get("entrypoint", "")) for name in ENGINES]
    for command in commands:
        assert not re.search(r"--(preset|host|port)\b", command), command


def test_every_service_has_a_health_check_that_probes_it():
    checks = {name: service["healthcheck"] for name, service in SERVICES.items()}
    assert "pg_isready" in checks["postgres"]["test"]
    for name in ENGINES:
        port = environment(name)["MASQUE_ENGINE_PORT"]
        assert f"127.0.0.1:{port}/health" in " ".join(checks[name]["test"])
        # The first start converts (cpu) or downloads (gpu) the models before /health says 200.
        assert seconds(checks[name]["start_period"]) >= 5 * 60
    assert seconds(checks["engine-gpu"]["start_period"]) >= seconds(checks["engine-cpu"]["start_period"])
    metrics_port = environment("bot")["MASQUE_METRICS_PORT"]
    assert int(metrics_port) > 0  # 0 turns /metrics off, and the check with it
    assert f"127.0.0.1:{metrics_port}/metrics" in " ".join(checks["bot"]["test"])
    for name, check in checks.items():
        assert check["test"][0] == "CMD", f"{name}: exec form, no shell needed"
        assert not check.get("disable"), name
        for key in ("interval", "timeout", "start_period"):
            seconds(check[key])


def test_the_bot_starts_after_healthy_postgres_and_engine():
    depends = SERVICES["bot"]["depends_on"]
    assert set(depends) == {"postgres", *ENGINES}
    assert all(dependency["condition"] == "service_healthy" for dependency in depends.values())
    for name, service in SERVICES.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on an unknown service {dependency}"
            # A dependency left out by its profile must be optional, else compose refuses the whole project.
            if set(SERVICES[dependency].get("profiles", [])) - set(service.get("profiles", [])):
                assert spec.get("required") is False, f"{name} -> {dependency}"
    assert depends["postgres"].get("required", True) is True


def test_named_volumes_declared_and_mounted_where_the_state_is():
    declared = set(COMPOSE["volumes"])
    mounts = {name: [volume.split(":")[:2] for volume in service.get("volumes", [])]
              for name, service in SERVICES.items()}
    used = {source for entries in mounts.values() for source, _ in entries if not source.startswith((".", "/"))}
    assert used == declared
    assert ["postgres-data", "/var/lib/postgresql/data"] in mounts["postgres"]
    for name in ENGINES:
        cache_dir = environment(name)["MASQUE_CACHE_DIR"]
        targets = [target for source, target in mounts[name] if source in declared]
        assert any(cache_dir == target or cache_dir.startswith(target.rstrip("/") + "/") for target in targets), name


def test_the_engine_image_makes_the_cache_mount_point_as_its_user():
    """Docker makes a missing mount point as root; a new named volume copies the image folder's owner instead."""
    engine = dockerfile_stages()["engine"]
    user_at = max(index for index, line in enumerate(engine) if line.upper().startswith("USER "))
    made = " ".join(line for line in engine[user_at:] if line.upper().startswith("RUN ") and "mkdir" in line)
    for name in ENGINES:
        for volume in SERVICES[name]["volumes"]:
            target = volume.split(":")[1]
            assert re.search(rf"{re.escape(target)}(/|\s|$)", made), f"no `mkdir -p {target}` after USER"


def test_restart_policies():
    for name, service in SERVICES.items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name


def test_no_secret_values_in_the_file():
    for path, value in walk_strings(COMPOSE):
        key = path.rsplit(".", 1)[-1]
        if SECRET_NAME.search(key):
            assert REFERENCE.fullmatch(value), f"{path} must be a ${{VAR}} reference, not a value"
            assert REFERENCE.fullmatch(value)["op"] == ":?", f"{path}: ${{VAR:?message}}, so it cannot be left empty"
        assert not re.search(r"[\w-]{24,}\.[\w-]{6,}\.[\w-]{27,}", value), f"{path} looks like a Discord token"
    assert SERVICES["bot"]["environment"]["DISCORD_TOKEN"].startswith("${DISCORD_TOKEN")
    url = SERVICES["bot"]["environment"]["MASQUE_DATABASE_URL"]
    assert make_url(interpolate(url, FAKE_ENV)).password == FAKE_ENV["POSTGRES_PASSWORD"]  # by reference only


@pytest.mark.parametrize("missing", sorted(FAKE_ENV))
def test_compose_refuses_to_start_without_a_secret(missing: str):
    env = {name: value for name, value in FAKE_ENV.items() if name != missing}
    with pytest.raises(MissingVariable, match=missing):
        for name in SERVICES:
            environment(name, env)
    with pytest.raises(MissingVariable, match=missing):  # an empty value in .env counts as missing
        for name in SERVICES:
            environment(name, {**env, missing: ""})


def test_build_targets_exist_in_the_dockerfile():
    stages = dockerfile_stages()
    built = {name: service["build"] for name, service in SERVICES.items() if "build" in service}
    assert set(built) == {*ENGINES, "bot"}
    for name, build in built.items():
        assert build["context"] == "." and build["target"] in stages, name
    assert built["bot"]["target"] == "bot" and {built[name]["target"] for name in ENGINES} == {"engine"}


def test_every_variable_set_is_a_setting_the_code_reads():
    bot_names = {field.validation_alias for field in BotSettings.model_fields.values()}
    unknown = set(environment("bot")) - bot_names
    assert not unknown, f"the bot reads no {unknown}"
    for name in ENGINES:
        unknown = {variable for variable in environment(name) if not engine_env_field_exists(variable)}
        assert not unknown, f"the engine reads no {unknown}"
    assert set(environment("postgres")) <= POSTGRES_IMAGE_ENV


def test_the_field_lookup_tells_real_engine_settings_from_made_up_ones():
    assert engine_env_field_exists("MASQUE_ENGINE_CHAT__MAX_BATCH")
    assert not engine_env_field_exists("MASQUE_ENGINE_CHAT__MAX_BATCHES")
    assert not engine_env_field_exists("MASQUE_ENGINE_CHAT__MAX_BATCH__X")
    assert not engine_env_field_exists("MASQUE_ENGINE_URL")


def test_the_bot_settings_read_from_the_file_point_at_the_services(clean_env: pytest.MonkeyPatch):
    for key, value in environment("bot").items():
        clean_env.setenv(key, value)
    settings = BotSettings(_env_file=None)
    assert settings.discord_token is not None and settings.discord_token.get_secret_value() == "fake-token"
    database = make_url(settings.database_url)
    postgres = environment("postgres")
    assert database.drivername == "postgresql+asyncpg" and database.host == "postgres"
    assert (database.username, database.database) == (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"])
    engine_url = urlsplit(settings.engine_url)
    for name in ENGINES:
        assert engine_url.hostname in SERVICES[name]["networks"]["default"]["aliases"]
        assert engine_url.port == int(environment(name)["MASQUE_ENGINE_PORT"]) and engine_url.path == "/v1"
    assert settings.engine_api_key is not None and settings.engine_api_key.get_secret_value() == "fake-key"
    assert settings.metrics_port == 9100


@pytest.mark.parametrize(("service", "preset"), [("engine-cpu", "offline"), ("engine-gpu", "gpu")])
def test_the_engine_settings_read_from_the_file(clean_env: pytest.MonkeyPatch, service: str, preset: str):
    for key, value in environment(service).items():
        clean_env.setenv(key, value)
    settings = EngineSettings()
    assert settings.preset == preset and settings.host == "0.0.0.0" and settings.port == 8000
    assert not settings.is_loopback() and settings.api_key is not None  # the engine refuses 0.0.0.0 without a key
    assert settings.chat.device == ("cpu" if preset == "offline" else "cuda")


def test_env_example_has_every_required_variable_and_no_values_for_secrets():
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    required = {match["name"] for _, value in walk_strings(COMPOSE) for match in REFERENCE.finditer(value)
                if match["op"] == ":?"}
    assert required == set(FAKE_ENV) and required <= set(example)
    for name, value in example.items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example: {name} must be a blank placeholder"
    assert example["COMPOSE_PROFILES"] in {"cpu", "gpu"}
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for stage in dockerfile_stages().values() for line in stage
              if line.upper().startswith("COPY ") and "--from" not in line for source in line.split()[1:-1]]
    assert {"pyproject.toml", "bot", "engine", "migrations", "personas"} <= set(copied)
    for source in copied:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source
