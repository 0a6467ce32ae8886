"""What can be checked here of the container setup (no Docker engine runs on this machine):
the compose stack's services, the Dockerfile's steps against the README's, the bundled model."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


def test_compose_runs_the_service_after_a_healthy_persistent_redis():
    services = COMPOSE["services"]
    redis, dsmi = services["redis"], services["dsmi"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in COMPOSE["volumes"]  # a named volume
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert dsmi["depends_on"]["redis"]["condition"] == "service_healthy"
    assert dsmi["environment"]["DSMI_REDIS_URL"].startswith("redis://redis:6379")
    assert any(p.endswith(":8000") for p in dsmi["ports"])
    assert dsmi["build"]["target"] == "cpu" and "profiles" not in dsmi


def test_compose_gpu_profile_reserves_a_gpu():
    gpu = COMPOSE["services"]["dsmi-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    ports = {p.rsplit(":", 1)[0] for s in COMPOSE["services"].values() for p in s.get("ports", [])}
    assert len(ports) == sum(len(s.get("ports", [])) for s in COMPOSE["services"].values())


def test_compose_cluster_profile_is_three_masters_with_a_replica_each():
    services = COMPOSE["services"]
    nodes = [name for name, s in services.items() if name.startswith("redis-node-")]
    assert len(nodes) == 6
    for name in nodes:
        node = services[name]
        assert node["profiles"] == ["cluster"]
        command = node["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--appendonly") + 1] == "yes"
        assert node["volumes"][0].split(":")[0] in COMPOSE["volumes"]  # a volume of its own
    init = services["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert set(init["depends_on"]) == set(nodes)
    assert all(d["condition"] == "service_healthy" for d in init["depends_on"].values())
    service = services["dsmi-cluster"]
    assert service["environment"]["DSMI_REDIS_CLUSTER"] == "1"
    assert service["environment"]["DSMI_REDIS_URL"].startswith("redis://redis-node-")
    assert service["depends_on"]["redis-cluster-init"]["condition"] == \
        "service_completed_successfully"
    assert "--profile cluster" in README  # the README shows cluster mode


def _stage(name: str) -> str:
    match = re.search(rf"^FROM .* AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


@pytest.mark.parametrize("stage,extra", [("cpu", "serve-cpu"), ("gpu", "serve")])
def test_images_are_lean_non_root_and_healthchecked(stage, extra):
    body = _stage(stage)
    assert re.search(r"^USER (?!root)\w+", body, re.M)
    assert "HEALTHCHECK" in body and "/healthz" in body
    assert 'ENTRYPOINT ["dsmi", "serve"]' in body
    assert f"[{extra}]" in body
    assert "_NO_CACHE" in body  # pip / uv keep no download cache in the image
    assert "torch" not in body and "[dev]" not in body and "[train]" not in body
    assert "COPY . " not in DOCKERFILE  # only the package sources go into the build stage
    assert DOCKERFILE.rstrip().endswith("FROM cpu AS default")


def test_dockerfile_installs_what_the_readme_installs():
    pyproject = (ROOT / "pyproject.toml").read_text()
    import tomllib

    optional = tomllib.loads(pyproject)["project"]["optional-dependencies"]
    # the README's service command and both images install the same service dependencies,
    # differing only in the ONNX Runtime build
    assert re.search(r"pip install '\.\[serve\]'", README)
    assert "dsmi serve" in README
    for extra in ("serve", "serve-cpu"):
        assert "dsmi-reid[service]" in optional[extra]
    assert any(d.startswith("onnxruntime-gpu") for d in optional["serve"])
    assert any(d.startswith("onnxruntime>") for d in optional["serve-cpu"])


def test_the_bundled_model_and_the_console_ship_in_the_wheel(tmp_path):
    manifest = json.loads((ROOT / "service" / "default_model" / "manifest.json").read_text())
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("dsmi_reid-*.whl"))).namelist()
    for name in manifest["files"]:
        assert f"service/default_model/{name}" in names
    assert "service/default_model/MODEL_CARD.md" in names
    for name in ("index.html", "console.js", "console.css"):
        assert f"service/console/{name}" in names
