"""The kustomize manifests, built offline and checked: schema-valid, non-root, no secret values."""

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from pipelines import resources

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
NAMESPACE = "kubeflow"
# the oldest Kubernetes still common under KFP 2, and the newest the validator knows
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
SECRET_KEYS = {
    resources.S3_SECRET: set(resources.S3_SECRET_KEYS),
    resources.MLFLOW_SECRET: set(resources.MLFLOW_SECRET_KEYS),
    "alignpipe-postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
}
# keys whose committed example must stay a placeholder
CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "POSTGRES_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
)
PLACEHOLDERS = ("", "CHANGE_ME")


def tool(name: str) -> str:
    """A checker from the dev extra: the virtualenv's copy first, then PATH; never a skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install the dev tools with `make setup`")
    return found


def env_file(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def sentinel(key: str) -> str:
    return f"sentinel-{key.lower().replace('_', '-')}-7f3a"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of manifests/ with every secret env file filled with a recognisable value."""
    copy = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy)
    for example in (copy / "secrets").glob("*.env.example"):
        values = env_file(example)
        lines = [
            f"{k}={v if k == 'MLFLOW_TRACKING_URI' else sentinel(k)}" for k, v in values.items()
        ]
        (copy / "secrets" / example.name.removesuffix(".example")).write_text("\n".join(lines))
    return copy


def kustomize(folder: Path) -> str:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def builds(checkout) -> dict[str, str]:
    return {
        "default": kustomize(checkout),
        "external-postgres": kustomize(checkout / "overlays" / "external-postgres"),
    }


def objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def named(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_specs(objs: list[dict]) -> dict[str, dict]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_default_build_has_the_server_database_secrets_and_rbac(builds):
    objs = objects(builds["default"])
    for obj in objs:
        assert obj["apiVersion"] and obj["kind"], obj
        assert obj["metadata"]["name"], obj
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "alignpipe"
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert [k for k in kinds if k[0] != "ConfigMap"] == [
        ("Deployment", "alignpipe-mlflow"),
        ("NetworkPolicy", "alignpipe-mlflow"),
        ("NetworkPolicy", "alignpipe-postgres"),
        ("Role", "alignpipe-runner"),
        ("RoleBinding", "alignpipe-runner"),
        ("Secret", "alignpipe-mlflow"),
        ("Secret", "alignpipe-postgres"),
        ("Secret", "alignpipe-s3"),
        ("Service", "alignpipe-mlflow"),
        ("Service", "alignpipe-postgres"),
        ("ServiceAccount", "alignpipe-runner"),
        ("StatefulSet", "alignpipe-postgres"),
    ]
    (binding,) = named(objs, "RoleBinding").values()
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "alignpipe-runner", "namespace": NAMESPACE}
    ]


def test_external_postgres_overlay_drops_the_database_and_points_elsewhere(builds):
    objs = objects(builds["external-postgres"])
    assert "alignpipe-postgres" not in named(objs, "StatefulSet")
    assert "alignpipe-postgres" not in named(objs, "Service")
    assert list(named(objs, "NetworkPolicy")) == ["alignpipe-mlflow"]
    assert set(named(objs, "Secret")) == set(SECRET_KEYS)
    (config,) = named(objs, "ConfigMap").values()
    assert config["data"]["POSTGRES_HOST"] == "postgres.example.internal"
    assert config["data"]["ARTIFACTS_DESTINATION"].startswith("s3://")


@pytest.mark.parametrize("build", ["default", "external-postgres"])
def test_every_object_is_valid_for_kubernetes(builds, build):
    for version in KUBERNETES_VERSIONS:
        for obj in objects(builds[build]):
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_a_bad_object(builds):
    # the check above can fail: a misspelt field and a wrong type
    deployment = named(objects(builds["default"]), "Deployment")["alignpipe-mlflow"]
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[0], strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("build", ["default", "external-postgres"])
def test_every_container_is_non_root_with_requests_and_limits(builds, build):
    specs = pod_specs(objects(builds[build]))
    assert specs
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert "runAsUser" not in context or context["runAsUser"] > 0, name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, (name, bound)


def test_secret_values_appear_only_in_secrets(builds):
    for text in builds.values():
        objs = objects(text)
        # no Secret carries a value the env files did not give it
        for name, secret in named(objs, "Secret").items():
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            assert set(data) == SECRET_KEYS[name]
            for key, value in data.items():
                assert value == (
                    "http://alignpipe-mlflow:5000"
                    if key == "MLFLOW_TRACKING_URI"
                    else sentinel(key)
                )
        # and no other object holds one of those values
        others = yaml.safe_dump_all([o for o in objs if o["kind"] != "Secret"])
        assert "sentinel-" not in others


def test_committed_secret_files_are_placeholders():
    examples = sorted((MANIFESTS / "secrets").glob("*.env.example"))
    assert [p.name for p in examples] == [
        "mlflow.env.example",
        "postgres.env.example",
        "s3.env.example",
    ]
    for example in examples:
        for key, value in env_file(example).items():
            if key in CREDENTIALS:
                assert value in PLACEHOLDERS, (example.name, key)
    # filled-in copies are ignored by git, and none is tracked
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "manifests/secrets/s3.env"], cwd=ROOT, timeout=30
    )
    assert ignored.returncode == 0
    tracked = subprocess.run(
        ["git", "ls-files", "manifests"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert not [path for path in tracked if path.endswith(".env")]
    assert not [p for p in MANIFESTS.rglob("*.yaml") if "kind: Secret" in p.read_text()]


def test_secret_names_and_keys_match_the_pipelines(builds):
    objs = objects(builds["default"])
    secrets = named(objs, "Secret")
    assert {k: set(v["data"]) for k, v in secrets.items()} == SECRET_KEYS
    # the runner may read the components' secrets, and no other secret of its namespace
    (role,) = named(objs, "Role").values()
    (secret_rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rule["verbs"] == ["get"]
    assert {resources.S3_SECRET, resources.MLFLOW_SECRET} <= set(secret_rule["resourceNames"])


def test_mlflow_server_uses_postgres_and_s3_from_its_settings(builds):
    objs = objects(builds["default"])
    (config,) = named(objs, "ConfigMap").values()
    (container,) = pod_specs(objs)["alignpipe-mlflow"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "--artifacts-destination=$(ARTIFACTS_DESTINATION)" in container["args"]
    assert config["data"]["ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": resources.S3_SECRET,
        "key": "AWS_ENDPOINT_URL",
    }
    # Kubernetes leaves a $(NAME) it cannot resolve as it is: every one must be defined, and
    # (for env values) defined before its use or in envFrom
    from_config = set(config["data"])
    defined = set(from_config)
    for entry in container["env"]:
        for name in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
            assert name in defined, (entry["name"], name)
        defined.add(entry["name"])
    for arg in container["args"]:
        for name in re.findall(r"\$\((\w+)\)", arg):
            assert name in defined, (arg, name)
    postgres = pod_specs(objs)["alignpipe-postgres"]["containers"][0]
    assert postgres["envFrom"] == [{"secretRef": {"name": "alignpipe-postgres"}}]


def test_mlflow_server_answers_the_names_clients_use(builds):
    from mlflow.server.security_utils import is_allowed_host_header

    (config,) = named(objects(builds["default"]), "ConfigMap").values()
    allowed = config["data"]["ALLOWED_HOSTS"].split(",")
    uri = env_file(MANIFESTS / "secrets" / "mlflow.env.example")["MLFLOW_TRACKING_URI"]
    clients = [
        urlparse(uri).netloc,  # pipeline pods, as the secret template says
        f"alignpipe-mlflow.{NAMESPACE}.svc.cluster.local:5000",  # from another namespace
        "localhost:5000",  # kubectl port-forward
    ]
    for host in clients:
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")
