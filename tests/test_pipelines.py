"""Every pipeline compiles, with every stage, GPU requests on GPU stages and no secrets."""

import builtins
import threading

import pytest
import yaml
from kfp.local import logging_utils

from pipelines import PIPELINES
from pipelines.__main__ import compile_all, print_kept

SECRET_VALUES = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-value-123",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-456",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-789",
}
GPU_STAGES = {
    "dpo": ("sft", "dpo", "evaluate"),
    "rlhf": ("sft", "reward-model", "ppo", "evaluate"),
    "compare": ("sft", "dpo", "reward-model", "ppo", "evaluate", "evaluate-2"),
    "multitask": ("multitask",),
    "contrastive": ("contrastive",),
}
CPU_STAGES = ("prep", "ingest", "base-model", "start-tracking", "end-tracking")
TRACKING_AND_DATA = ("start-tracking", "end-tracking", "prep", "ingest", "base-model", "sft")
EVERY_STAGE = {
    "dpo": (*TRACKING_AND_DATA, "dpo", "evaluate", "register"),
    "rlhf": (*TRACKING_AND_DATA, "reward-model", "ppo", "evaluate", "register"),
    "compare": (
        *TRACKING_AND_DATA,
        "dpo",
        "reward-model",
        "ppo",
        "evaluate",
        "evaluate-2",
        "compare-report",
    ),
    "multitask": (
        "start-tracking",
        "end-tracking",
        "prep",
        "merge-tasks",
        "base-model",
        "multitask",
        "multitask-report",
    ),
    "contrastive": (
        "start-tracking",
        "end-tracking",
        "prep",
        "base-model",
        "contrastive",
        "contrastive-report",
    ),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in SECRET_VALUES.items():
        mp.setenv(key, value)
    try:
        paths = compile_all(tmp_path_factory.mktemp("compiled"))
    finally:
        mp.undo()
    return {p.stem: p.read_text() for p in paths}


def pipeline_spec(text: str) -> dict:
    # the file holds the pipeline spec, then the kubernetes platform spec as a second document
    return next(yaml.safe_load_all(text))


def test_every_pipeline_compiles(compiled):
    assert set(compiled) == set(PIPELINES)


@pytest.mark.parametrize("name", sorted(EVERY_STAGE))
def test_every_stage_is_in_the_graph(compiled, name):
    spec = pipeline_spec(compiled[name])
    executors = set(spec["deploymentSpec"]["executors"])
    for stage in EVERY_STAGE[name]:
        assert f"exec-{stage}" in executors, f"{stage} missing from {name}"


@pytest.mark.parametrize("name", sorted(GPU_STAGES))
def test_gpu_stages_request_accelerators(compiled, name):
    executors = pipeline_spec(compiled[name])["deploymentSpec"]["executors"]
    for stage in GPU_STAGES[name]:
        resources = executors[f"exec-{stage}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"], stage
        assert resources["accelerator"]["resourceCount"], stage
        assert "resourceCpuLimit" in resources and "resourceMemoryLimit" in resources
    for stage in set(CPU_STAGES) & set(EVERY_STAGE[name]):
        assert "accelerator" not in executors[f"exec-{stage}"]["container"].get("resources", {})


def test_components_run_on_the_pinned_image_without_installing(compiled):
    from components import CPU_IMAGE, GPU_IMAGE

    executors = pipeline_spec(compiled["dpo"])["deploymentSpec"]["executors"]
    assert executors["exec-sft"]["container"]["image"] == GPU_IMAGE
    assert executors["exec-prep"]["container"]["image"] == CPU_IMAGE
    for executor in executors.values():
        assert "pip install" not in " ".join(executor["container"].get("command", []))


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_no_credential_values_in_compiled_yaml(compiled, name):
    for value in SECRET_VALUES.values():
        assert value not in compiled[name]


def test_component_docstrings_reach_the_spec(compiled):
    # KFP copies docstrings into the spec: they are the documentation users see in the UI
    assert "Fine-tune the base model on conversations" in compiled["dpo"]
    assert "Align the SFT model on preference pairs with DPO" in compiled["dpo"]


TRAINING_COMPONENTS = (
    "comp-sft",
    "comp-dpo",
    "comp-reward-model",
    "comp-ppo",
    "comp-multitask",
    "comp-contrastive",
)


def _training_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the graph (sub-pipelines included) that runs a checkpointing stage."""
    found = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            component = task["componentRef"]["name"]
            if component in TRAINING_COMPONENTS:
                found[name] = task
    return found


@pytest.mark.parametrize("name", ["dpo", "rlhf", "compare"])
def test_evaluation_gets_the_model_fine_tuning_started_from(compiled, name):
    # the few-shot baseline prompts the base model step's output, not the SFT model
    spec = pipeline_spec(compiled[name])
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    [sft] = [d for d in dags if "base_model" in d.get("outputs", {}).get("artifacts", {})]
    assert sft["outputs"]["artifacts"]["base_model"]["artifactSelectors"] == [
        {"outputArtifactKey": "model", "producerSubtask": "base-model"}
    ]
    from_sft = {"taskOutputArtifact": {"outputArtifactKey": "base_model", "producerTask": "sft"}}
    tasks = [task for dag in dags for task in dag["tasks"].values()]
    evaluations = [t for t in tasks if t["componentRef"]["name"].startswith("comp-evaluate")]
    gates = [t for t in tasks if t["componentRef"]["name"] == "comp-gate"]
    assert len(evaluations) == (2 if name == "compare" else 1)
    for task in evaluations:
        # straight from the SFT sub-pipeline (compare), or through the gate's input
        source = task["inputs"]["artifacts"]["base_model"]
        assert source in (from_sft, {"componentInputArtifact": "base_model"}), source
    for gate in gates:
        assert gate["inputs"]["artifacts"]["base_model"] == from_sft


@pytest.mark.parametrize(
    ("name", "count"),
    [("dpo", 2), ("rlhf", 3), ("compare", 4), ("multitask", 1), ("contrastive", 1)],
    ids=["dpo", "rlhf", "compare", "multitask", "contrastive"],
)
def test_training_tasks_know_the_run_id_and_keep_checkpoints_locally_by_default(
    compiled, name, count
):
    # without checkpoint_root in the cluster settings, checkpoints stay in the task's output;
    # test_cluster_settings.py sets one and checks that every training task gets it
    tasks = _training_tasks(pipeline_spec(compiled[name]))
    assert len(tasks) == count
    for task_name, task in tasks.items():
        parameters = task["inputs"]["parameters"]
        assert "checkpoint_root" not in parameters, task_name
        run_id = parameters["kfp_run_id"]["runtimeValue"]["constant"]
        assert run_id == "{{$.pipeline_job_uuid}}", task_name


def test_a_local_run_with_parallel_tasks_leaves_print_as_it_was(capsys):
    """Two kfp.local tasks in threads: the first to start ends first, as a short branch does."""
    original = builtins.print
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first_task():
        with logging_utils.indented_print():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second_task():
        first_in.wait(10)
        with logging_utils.indented_print():
            second_in.set()
            first_out.wait(10)

    with print_kept():
        threads = [threading.Thread(target=first_task), threading.Thread(target=second_task)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        print("inside")  # kfp.local's indenting print outlived both tasks
    print("after")

    assert builtins.print is original
    assert capsys.readouterr().out.splitlines() == ["    inside", "after"]
