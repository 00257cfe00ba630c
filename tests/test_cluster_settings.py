"""Cluster settings in the compiled YAML: secrets by name, GPU pool scheduling, timeouts, retries.

Every pipeline is compiled with fake credentials in the environment; the YAML must carry none
of them, read both secrets through the ``s3_secret``/``mlflow_secret`` run parameters on every
task, and give GPU tasks tolerations, a timeout and retries. A settings file named by
``$ALIGNPIPE_CLUSTER_CONFIG`` changes them at compile time (checked in a fresh interpreter,
because KFP builds the graphs when the pipeline modules are imported).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignpipe.errors import ConfigError
from components import GPU_IMAGE
from pipelines import PIPELINES, resources

REPO = Path(__file__).resolve().parent.parent
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKECLUSTER0001",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-for-cluster-test",
    "AWS_ENDPOINT_URL": "http://fake-s3.internal:8333",
    "MLFLOW_TRACKING_URI": "http://fake-mlflow.internal:5000",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-42",
}


# the training tasks of each pipeline; each runs the component (comp-NAME) of its name
TRAINING_TASKS = {
    "dpo": {"sft", "dpo"},
    "rlhf": {"sft", "reward-model", "ppo"},
    "compare": {"sft", "dpo", "reward-model", "ppo"},
    "multitask": {"multitask"},
    "contrastive": {"contrastive"},
}
TRAINING_COMPONENTS = {f"comp-{task}" for tasks in TRAINING_TASKS.values() for task in tasks}


def parse(text: str) -> tuple[dict, dict]:
    """The pipeline spec, and the kubernetes settings of each executor."""
    spec, platform = yaml.safe_load_all(text)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def retry_policies(spec: dict) -> dict[str, dict]:
    """Each executor's retry policy (it lives on the DAG task that runs the executor)."""
    components = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in components.values() if "dag" in c]
    policies = {}
    for dag in dags:
        for task in dag["tasks"].values():
            executor = components[task["componentRef"]["name"]].get("executorLabel")
            if executor:
                policies[executor] = task.get("retryPolicy", {})
    return policies


def _training_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the graph (sub-pipelines included) that runs a checkpointing stage."""
    components = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in components.values() if "dag" in c]
    return {
        name: task
        for dag in dags
        for name, task in dag["tasks"].items()
        if task["componentRef"]["name"] in TRAINING_COMPONENTS
    }


def gpu_executors(spec: dict) -> set[str]:
    executors = spec["deploymentSpec"]["executors"]
    return {name for name, e in executors.items() if e["container"]["image"] == GPU_IMAGE}


def compile_fresh(out: Path, settings: Path | None = None) -> dict[str, str]:
    """Compile every pipeline in a new interpreter whose environment holds the fake credentials.

    A fresh process, because KFP builds the graphs when their modules are imported: a value read
    from the environment then is in the YAML, and a process that imported them earlier hides it.
    """
    env = {**os.environ, **FAKE_CREDENTIALS}
    env.pop(resources.SETTINGS_ENV, None)
    if settings is not None:
        env[resources.SETTINGS_ENV] = str(settings)
    subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--output", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    return {name: (out / f"{name}.yaml").read_text() for name in PIPELINES}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_fresh(tmp_path_factory.mktemp("compiled"))


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_no_credential_values_in_the_yaml(compiled, name):
    for key, value in FAKE_CREDENTIALS.items():
        assert value not in compiled[name], f"{key}'s value leaked into {name}.yaml"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_task_reads_both_secrets_named_by_run_parameters(compiled, name):
    spec, kubernetes = parse(compiled[name])
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["s3_secret"]["defaultValue"] == "alignpipe-s3"
    assert inputs["mlflow_secret"]["defaultValue"] == "alignpipe-mlflow"
    for executor in spec["deploymentSpec"]["executors"]:
        secrets = kubernetes[executor]["secretAsEnv"]
        by_parameter = {
            s["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--"): s
            for s in secrets
        }
        assert set(by_parameter) == {"s3_secret", "mlflow_secret"}, executor
        for parameter, keys in (
            ("s3_secret", resources.S3_SECRET_KEYS),
            ("mlflow_secret", resources.MLFLOW_SECRET_KEYS),
        ):
            entry = by_parameter[parameter]
            assert {(m["secretKey"], m["envVar"]) for m in entry["keyToEnv"]} == {
                (k, k) for k in keys
            }
            assert entry["optional"] is False
            assert "secretName" not in entry  # a name fixed at compile time would be here


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_gpu_tasks_get_pool_scheduling_timeout_and_retries(compiled, name):
    spec, kubernetes = parse(compiled[name])
    gpu = gpu_executors(spec)
    assert {f"exec-{task}" for task in TRAINING_TASKS[name]} <= gpu
    policies = retry_policies(spec)
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for executor in spec["deploymentSpec"]["executors"]:
        settings = kubernetes[executor]
        if executor in gpu:
            assert settings["tolerations"] == [gpu_toleration], executor
            assert settings["activeDeadlineSeconds"] == "86400", executor
            assert policies[executor]["maxRetryCount"] == 2, executor
            assert policies[executor]["backoffDuration"] == "60s", executor
        else:
            assert "tolerations" not in settings and "activeDeadlineSeconds" not in settings
            assert not policies[executor], executor
        assert "pvcMount" not in settings  # no model cache unless one is configured


def test_overrides_from_the_settings_file_take_effect(tmp_path):
    overrides = {
        "gpu_tolerations": [{"key": "pool", "operator": "Equal", "value": "h100"}],
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "model_cache_pvc": "hf-cache",
        "model_cache_path": "/models/hf",
        "timeout_s": 7200,
        "retries": 4,
        "secrets_optional": True,
        "checkpoint_root": "s3://ml-checkpoints/alignpipe",
        "stages": {
            "ppo": {"accelerator_count": 2, "memory": "128G", "timeout_s": 172800},
            "evaluate": {"retries": 0, "accelerator_type": "nvidia.com/mig-1g.10gb"},
            "reward_model": {"accelerator_count": 0, "cpu": "16"},
            "ingest": {"cpu": "4", "memory": "8G", "timeout_s": 600, "retries": 3},
        },
    }
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(overrides))
    every = compile_fresh(tmp_path / "out", config)
    for name, text in every.items():
        for key, value in FAKE_CREDENTIALS.items():
            assert value not in text, f"{key}'s value leaked into {name}.yaml"
    spec, kubernetes = parse(every["rlhf"])
    executors = spec["deploymentSpec"]["executors"]
    policies = retry_policies(spec)

    ppo = executors["exec-ppo"]["container"]["resources"]
    assert ppo["accelerator"]["resourceCount"] == "2"  # a constant now, not the run parameter
    assert ppo["resourceMemoryLimit"] == "128G"
    assert kubernetes["exec-ppo"]["activeDeadlineSeconds"] == "172800"
    sft = executors["exec-sft"]["container"]["resources"]
    parameter = "{{$.inputs.parameters['pipelinechannel--accelerator_count']}}"
    assert sft["accelerator"]["resourceCount"] == parameter  # the run parameter still
    assert kubernetes["exec-sft"]["activeDeadlineSeconds"] == "7200"
    assert policies["exec-sft"]["maxRetryCount"] == 4
    evaluate = executors["exec-evaluate"]["container"]["resources"]["accelerator"]
    assert evaluate["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert not policies["exec-evaluate"]

    # accelerator_count 0 moves a stage to CPU nodes: no accelerator, no GPU-pool scheduling
    reward_model = executors["exec-reward-model"]["container"]["resources"]
    assert "accelerator" not in reward_model and reward_model["resourceCpuLimit"] == "16"
    assert "tolerations" not in kubernetes["exec-reward-model"]
    assert "nodeSelector" not in kubernetes["exec-reward-model"]
    assert kubernetes["exec-reward-model"]["activeDeadlineSeconds"] == "7200"

    for executor in ("exec-sft", "exec-ppo", "exec-evaluate"):
        settings = kubernetes[executor]
        assert settings["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "h100"}]
        assert settings["nodeSelector"]["labels"] == overrides["gpu_node_selector"]
        assert settings["pvcMount"][0]["mountPath"] == "/models/hf"
        assert settings["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == (
            "hf-cache"
        )
        env = executors[executor]["container"]["env"]
        assert {"name": "HF_HOME", "value": "/models/hf"} in env
    assert "pvcMount" in kubernetes["exec-base-model"]  # it fills the cache
    assert "pvcMount" not in kubernetes["exec-prep"]
    assert "nodeSelector" not in kubernetes["exec-prep"]
    assert all(s["optional"] for s in kubernetes["exec-prep"]["secretAsEnv"])

    # a CPU stage takes what its entry sets, and only then a timeout and retries
    ingest = executors["exec-ingest"]["container"]["resources"]
    assert (ingest["resourceCpuLimit"], ingest["resourceMemoryLimit"]) == ("4", "8G")
    assert kubernetes["exec-ingest"]["activeDeadlineSeconds"] == "600"
    assert policies["exec-ingest"]["maxRetryCount"] == 3
    assert "resources" not in executors["exec-prep"]["container"]
    assert "activeDeadlineSeconds" not in kubernetes["exec-prep"] and not policies["exec-prep"]

    # training tasks of every pipeline keep checkpoints under the root, by run id, so that
    # retries resume
    for name, text in every.items():
        training = {
            task_name: task["inputs"]["parameters"]
            for task_name, task in _training_tasks(parse(text)[0]).items()
        }
        assert set(training) == TRAINING_TASKS[name], name
        for parameters in training.values():
            root = parameters["checkpoint_root"]["runtimeValue"]["constant"]
            assert root == "s3://ml-checkpoints/alignpipe"
            run_id = parameters["kfp_run_id"]["runtimeValue"]["constant"]
            assert run_id == "{{$.pipeline_job_uuid}}"


def test_an_accelerator_for_a_cpu_stage_is_one_line_naming_the_fix(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("stages: {prep: {accelerator_count: 1}}\n")
    env = {**os.environ, resources.SETTINGS_ENV: str(config)}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: cluster settings give stage 'prep' an accelerator, but it runs on the CPU "
        "image; remove stages.prep.accelerator_type and accelerator_count"
    ]


def test_bad_settings_are_errors_that_name_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retries: 2\ngpu_tolerations: [{key: a, operatr: Exists}]\n")
    with pytest.raises(ConfigError, match="unknown field operatr; use key, operator"):
        resources.load_settings(str(bad))
    bad.write_text("stages: {ppo: {acelerator_count: 2}}\n")
    with pytest.raises(ConfigError, match=r"unknown option stages\.ppo\.acelerator_count"):
        resources.load_settings(str(bad))
    with pytest.raises(ConfigError, match="accelerator_count must be 0 or more"):
        resources.ClusterSettings(stages={"ppo": {"accelerator_count": -1}})
    with pytest.raises(ConfigError, match="does not exist; fix ALIGNPIPE_CLUSTER_CONFIG"):
        resources.load_settings(str(tmp_path / "missing.yaml"))


def test_a_stage_name_no_pipeline_has_is_reported(compiled):
    typo = resources.ClusterSettings(stages={"reward-model": {"retries": 1}})
    with pytest.raises(ConfigError, match=r"name stage 'reward-model'.*reward_model"):
        resources.check_stage_names(typo)
    resources.check_stage_names(resources.ClusterSettings(stages={"reward_model": {}}))


def test_configure_outside_a_pipeline_body_is_an_error():
    with pytest.raises(RuntimeError, match=r"inside a @dsl\.pipeline body"):
        resources.configure(**resources.hardware("nvidia.com/gpu", 1, "8", "64G"))
