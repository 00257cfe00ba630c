"""The images: hadolint-clean Dockerfiles, named and tagged as the components expect them."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

import alignpipe

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda", "Dockerfile.mlflow")
# variables that change the image names; each test sets the ones it means
NAME_VARIABLES = (
    "ALIGNPIPE_IMAGE",
    "ALIGNPIPE_GPU_IMAGE",
    "ALIGNPIPE_IMAGE_REGISTRY",
    "IMAGE_REGISTRY",
    "IMAGE_TAG",
    "MLFLOW_IMAGE",
)
# An extra makefile read after the project's: prints the images the components compile with,
# as seen from inside a make recipe (where the Makefile's exports apply).
PRINT_COMPONENT_IMAGES = (
    "print-component-images:\n"
    '\t@$(TEST_PYTHON) -c "import components; print(components.CPU_IMAGE, components.GPU_IMAGE)"\n'
)


def tool(name: str) -> str:
    """A checker from the dev extra: the virtualenv's copy first, then PATH; never a skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install the dev tools with `make setup`")
    return found


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def clean_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NAME_VARIABLES}
    return {**env, **overrides}


def make(*args: str, env: dict, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def planned_builds(env: dict) -> dict:
    """Dockerfile -> (tag, version build arg) from the commands `make images` would run."""
    builds = {}
    for line in make("-n", "images", env=env).splitlines():
        if line.startswith("docker build"):
            dockerfile = re.search(r"-f images/(\S+)", line).group(1)
            tag = re.search(r"-t (\S+)", line).group(1)
            version = re.search(r"--build-arg ALIGNPIPE_VERSION=(\S+)", line).group(1)
            builds[dockerfile] = (tag, version)
    return builds


def component_images(env: dict) -> list[str]:
    out = make(
        "-f", "Makefile", "-f", "-", "print-component-images",
        f"TEST_PYTHON={sys.executable}",
        env=env,
        stdin=PRINT_COMPONENT_IMAGES,
    )  # fmt: skip
    return out.split()


def final_stage(dockerfile: str) -> str:
    text = (IMAGES / dockerfile).read_text()
    return text[text.rindex("\nFROM ") :]


def test_dockerfiles_are_hadolint_clean():
    result = hadolint(*(IMAGES / name for name in DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    # the check above can fail: an unpinned base image and an unpinned pip install
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = hadolint(bad)
    assert result.returncode == 1
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_make_images_tags_what_the_components_run_on():
    version = alignpipe.__version__
    tag = version.replace("+", "-")
    # the wheel the Dockerfiles install is named by the normalised version
    assert str(Version(version)) == version
    builds = planned_builds(clean_env())
    assert builds == {
        "Dockerfile": (f"ghcr.io/alignpipe/alignpipe:{tag}", version),
        "Dockerfile.cuda": (f"ghcr.io/alignpipe/alignpipe-cuda:{tag}", version),
        "Dockerfile.mlflow": (f"ghcr.io/alignpipe/alignpipe-mlflow:{tag}", version),
    }
    # the names the components derive by themselves, with no variable set
    outside = subprocess.run(
        [
            sys.executable,
            "-c",
            "import components; print(components.CPU_IMAGE, components.GPU_IMAGE)",
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outside.returncode == 0, outside.stderr
    expected = [builds["Dockerfile"][0], builds["Dockerfile.cuda"][0]]
    assert outside.stdout.split() == expected


def test_one_registry_and_tag_setting_moves_images_and_components_together():
    env = clean_env(IMAGE_REGISTRY="registry.example.com/team", IMAGE_TAG="rc1")
    builds = planned_builds(env)
    assert builds["Dockerfile"][0] == "registry.example.com/team/alignpipe:rc1"
    assert builds["Dockerfile.cuda"][0] == "registry.example.com/team/alignpipe-cuda:rc1"
    # `make compile` (any recipe) compiles the components with the same names
    assert component_images(env) == [builds["Dockerfile"][0], builds["Dockerfile.cuda"][0]]
    # the components' own registry variable is honoured by make too
    env = clean_env(ALIGNPIPE_IMAGE_REGISTRY="registry.example.com/other")
    builds = planned_builds(env)
    assert builds["Dockerfile"][0].startswith("registry.example.com/other/alignpipe:")
    assert component_images(env) == [builds["Dockerfile"][0], builds["Dockerfile.cuda"][0]]


def test_the_manifests_run_the_mlflow_image_make_builds():
    kustomization = yaml.safe_load((ROOT / "manifests" / "base" / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "alignpipe-mlflow"]
    tag, _ = planned_builds(clean_env())["Dockerfile.mlflow"]
    assert f"{image['newName']}:{image['newTag']}" == tag


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_runtime_images_install_this_version_as_a_non_root_user(dockerfile):
    stage = final_stage(dockerfile)
    assert "ARG ALIGNPIPE_VERSION" in stage
    assert "file:///tmp/dist/alignpipe-${ALIGNPIPE_VERSION}-py3-none-any.whl" in stage
    assert "--constraint /tmp/constraints.txt" in stage  # torch stays the build it was given
    user = re.findall(r"^USER (\S+)$", stage, flags=re.M)
    assert user == ["10001:10001"]
    # the KFP launcher writes input artifacts under these, as the container's user
    assert "chown alignpipe:alignpipe /gcs /minio /s3 /oci" in stage


def test_cpu_image_takes_torch_from_the_cpu_index_first():
    stage = final_stage("Dockerfile")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in stage
    # the contrastive extra: the contrastive component runs on these images too
    assert stage.index('"torch==${TORCH_VERSION}"') < stage.index(
        "alignpipe[contrastive] @ file://"
    )
    makefile = (ROOT / "Makefile").read_text()
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, flags=re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_version}" in stage


def test_cuda_image_builds_on_pytorch_with_the_gpu_and_contrastive_extras():
    stage = final_stage("Dockerfile.cuda")
    assert stage.startswith(
        "\nFROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn${CUDNN_VERSION}-runtime"
    )
    assert "alignpipe[gpu,contrastive] @ file://" in stage


def test_dockerignore_admits_only_what_the_images_copy():
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for name in DOCKERFILES:
        for line in (IMAGES / name).read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(line.split()[1:-1])
    assert copied == admitted == {"pyproject.toml", "README.md", "src"}
