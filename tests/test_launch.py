"""The launcher without a cluster: job manifests, torchrun command lines, and submit/re-attach/
follow against a local stand-in of the Kubernetes API (tests/k8s_api_standin.py)."""

import json
import re
from datetime import datetime, timedelta, timezone

import kubernetes_validate
import pytest
import yaml
from kfp.dsl import Dataset, Metrics, Model

from alignpipe import kube
from alignpipe import launch as L
from alignpipe.cli import main
from alignpipe.errors import ConfigError
from tests import k8s_api_standin

RUN_ID = "3f6c1e2a-9b1d-4c55-8e0a-52d1c0ffee42"
NAMESPACE = "team-a"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
COMPLETE = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}
RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0}]}


def options(**overrides):
    values = {
        "nodes": 2,
        "gpus_per_node": 4,
        "run_id": RUN_ID,
        "namespace": NAMESPACE,
        "upload_to": "s3://models/run-1/sft",
        "node_selector": {"pool": "h100"},
        "tolerations": [TOLERATION],
        "labels": {"team": "alignment"},
        "config": {"model": "s3://models/base", "training": {"max_steps": 500}},
        "poll_s": 0.01,
        **overrides,
    }
    return L.LaunchOptions(**values)


def manifest(kind="trainjob", **overrides):
    return L.build_manifest("sft", ["s3://data/prep"], None, options(kind=kind, **overrides))


def validate(obj):
    """Strict schema validation of a built-in Kubernetes kind (kubernetes-validate's schemas)."""
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# -- manifests ------------------------------------------------------------------------------


def test_trainjob_manifest_runs_the_stage_on_every_node():
    job = manifest()
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert set(spec) <= {"runtimeRef", "trainer", "labels", "podTemplateOverrides"}
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"] == [
        "torchrun", "--nnodes=2", "--nproc-per-node=4", "--module", "alignpipe.launch"
    ]  # fmt: skip
    output = f"/tmp/alignpipe/{job['metadata']['name']}"
    assert trainer["args"][:4] == ["sft", "s3://data/prep", "--output", output]
    assert 'model="s3://models/base"' in trainer["args"]
    assert "training.max_steps=500" in trainer["args"]
    # the pods' disks go with them: checkpoints are kept beside the upload, so a restart resumes
    assert 'training.checkpoint_uri="s3://models/run-1/sft/checkpoints"' in trainer["args"]
    mine = {"model": "s3://m", "training": {"checkpoint_uri": "s3://ckpt/here"}}
    assert (
        'training.checkpoint_uri="s3://ckpt/here"'
        in manifest(config=mine)["spec"]["trainer"]["args"]
    )
    override = spec["podTemplateOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["spec"]["nodeSelector"] == {"pool": "h100"}
    assert override["spec"]["tolerations"] == [TOLERATION]
    assert job["metadata"]["labels"]["alignpipe/run-id"] == RUN_ID
    assert job["metadata"]["labels"]["team"] == "alignment"
    # the Kubernetes-typed parts, put in a Pod the way the runtime's "node" container gets them
    container = {
        "name": "node",
        **{key: trainer[key] for key in ("image", "command", "args", "env")},
        "resources": trainer["resourcesPerNode"],
        "volumeMounts": override["spec"]["containers"][0]["volumeMounts"],
    }
    pod_spec = {k: v for k, v in override["spec"].items() if k != "containers"}
    validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": job["metadata"]["name"], "labels": job["metadata"]["labels"]},
            "spec": {**pod_spec, "containers": [container]},
        }
    )


def test_pytorchjob_manifest_has_a_master_and_workers_and_valid_pod_templates():
    job = manifest("pytorchjob", nodes=3, output_pvc="shared-rwx")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4"
    for spec in replicas.values():
        validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": job["metadata"]["name"]},
                "template": spec["template"],
            }
        )
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert "--node-rank=$(RANK)" in container["command"]
        assert "--master-addr=$(MASTER_ADDR)" in container["command"]
        # the output is on the shared claim, mounted where the output path points
        claim = spec["template"]["spec"]["volumes"][-1]["persistentVolumeClaim"]
        assert claim == {"claimName": "shared-rwx"}
        output = container["args"][container["args"].index("--output") + 1]
        assert output.startswith("/mnt/alignpipe/")
        assert not any(a.startswith("training.checkpoint_uri") for a in container["args"])
    # one node: a master alone
    single = manifest("pytorchjob", nodes=1, job=True)["spec"]["pytorchReplicaSpecs"]
    assert set(single) == {"Master"}


def test_secrets_are_referenced_by_name_never_inlined(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-do-not-leak")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-do-not-leak")
    for kind in ("trainjob", "pytorchjob"):
        job = manifest(kind, mlflow_secret="mlflow-prod")
        text = json.dumps(job)
        assert "do-not-leak" not in text
        env = (
            job["spec"]["trainer"]["env"]
            if kind == "trainjob"
            else job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
                "env"
            ]
        )
        by_name = {e["name"]: e for e in env}
        for key in (*L.S3_SECRET_KEYS, *L.MLFLOW_SECRET_KEYS):
            assert "value" not in by_name[key], key
            ref = by_name[key]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == key
            assert ref["name"] == ("alignpipe-s3" if key in L.S3_SECRET_KEYS else "mlflow-prod")
        assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"].get("optional") is None
    # no secret: no reference to it
    names = {e["name"] for e in manifest(s3_secret=None)["spec"]["trainer"]["env"]}
    assert not names & set(L.S3_SECRET_KEYS)
    # a credential in the stage config is refused rather than put on a command line
    with pytest.raises(ConfigError, match="credential"):
        manifest(config={"model": "x", "hub_token": "abc"})


def test_job_names_are_deterministic_valid_and_distinct():
    name = L.job_name(RUN_ID, "reward_model")
    assert name == L.job_name(RUN_ID, "reward_model")
    assert DNS_1035.match(name) and len(name) <= L.MAX_NAME_LENGTH
    assert name != L.job_name(RUN_ID, "sft")
    assert name != L.job_name(RUN_ID.replace("3f", "4f"), "reward_model")
    odd = L.job_name("9_Run.ID/with spaces" + "x" * 80, "dpo")
    assert DNS_1035.match(odd) and len(odd) <= L.MAX_NAME_LENGTH
    # two long ids that share their first characters still get different names
    assert L.job_name("a" * 90 + "1", "sft") != L.job_name("a" * 90 + "2", "sft")
    with pytest.raises(ConfigError, match="run_id"):
        L.job_name("", "sft")


def test_bad_options_fail_before_anything_is_submitted():
    with pytest.raises(ConfigError, match=r"training\.max_steps must be positive"):
        manifest(config={"model": "s3://m", "training": {"max_steps": 0}})
    with pytest.raises(ConfigError, match="needs a model"):
        manifest(config={})
    with pytest.raises(ConfigError, match="upload_to=s3://"):
        manifest(upload_to=None)
    with pytest.raises(ConfigError, match="not on the shared volume"):
        L.build_manifest("sft", ["s3://d"], "/elsewhere/out", options(output_pvc="rwx"))
    with pytest.raises(ConfigError, match="toleration"):
        options(tolerations=[{"effect": "NoSchedule"}])
    with pytest.raises(ConfigError, match="label"):
        options(labels={"team": "not a label value"})
    with pytest.raises(ConfigError, match="needs its data"):
        L.launch("sft", [], None, options())
    with pytest.raises(ConfigError, match="unknown stage"):
        L.build_manifest("train", [], None, options())


def test_torchrun_command_lines_and_the_stages_that_may_use_them():
    assert L.torchrun_command(8) == [
        "torchrun", "--standalone", "--nproc-per-node=8", "--module", "alignpipe.launch"
    ]  # fmt: skip
    assert L.torchrun_command(2, nodes=4, rendezvous="pytorchjob")[1:3] == [
        "--nnodes=4",
        "--nproc-per-node=2",
    ]
    with pytest.raises(ConfigError, match="one node"):
        L.torchrun_command(2, nodes=2)
    for stage in ("sft", "dpo", "reward_model"):
        L.check_distributed(stage, 16)
    L.check_distributed("ppo", 1)
    with pytest.raises(NotImplementedError, match="PPO loop is single-process"):
        L.check_distributed("ppo", 2)
    with pytest.raises(NotImplementedError, match="PPO"):
        L.build_manifest("ppo", ["s3://p"], None, options(config={"model": "s3://m"}))
    with pytest.raises(NotImplementedError, match="does not run data-parallel"):
        L.check_distributed("evaluate", 2)


def test_cli_prints_the_manifest_and_refuses_multi_process_ppo(capsys):
    code = main(
        ["launch", "dpo", "s3://data/pairs", "--output", "/mnt/alignpipe/dpo", "--nodes", "2",
         "--gpus-per-node", "8", "--dry-run", f"run_id={RUN_ID}", "kind=pytorchjob",
         "output_pvc=rwx", "config.model=s3://models/sft", "config.beta=0.2"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    job = yaml.safe_load(out)
    assert job["kind"] == "PyTorchJob" and job["metadata"]["name"] == L.job_name(RUN_ID, "dpo")
    args = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "beta=0.2" in args["args"]

    code = main(["launch", "ppo", "data", "--output", "out", "--gpus-per-node", "2",
                 "config.model=tiny", "config.reward=gold"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "single-process" in err


# -- submit, re-attach, follow (against the stand-in) ----------------------------------------


@pytest.fixture
def api():
    with k8s_api_standin.serve() as state:
        yield state


def client_for(api, attempts=4):
    return kube.KubeClient(api.url, token=api.token, attempts=attempts, backoff_s=0.01)


def run(api, opts=None, stage="sft"):
    return L.launch(stage, ["s3://data/prep"], None, opts or options(), client=client_for(api))


def test_first_launch_creates_the_job_and_follows_it_to_success(api):
    api.script = [{}, RUNNING, RUNNING, COMPLETE]
    result = run(api)
    assert (result.mode, result.state, result.attached) == ("job", "Succeeded", False)
    posts = api.calls("POST")
    assert len(posts) == 1
    assert posts[0].path == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
    assert posts[0].body == manifest()
    assert posts[0].authorization == f"Bearer {api.token}"
    # one GET before creating (nothing there), then polls until Complete
    gets = api.calls("GET")
    assert len(gets) >= 4 and all(g.path.endswith(result.name) for g in gets)


def test_a_restarted_launcher_follows_the_existing_job_instead_of_creating_one(api):
    api.put(NAMESPACE, "trainjobs", manifest())
    api.script = [RUNNING, COMPLETE]
    result = run(api)
    assert result.attached and result.state == "Succeeded"
    assert api.calls("POST") == []


def test_a_conflict_on_create_re_attaches(api):
    api.conflict_on_create = True  # another launcher created it between our GET and POST
    api.script = [RUNNING, COMPLETE]
    result = run(api, options(kind="pytorchjob"))
    assert result.attached and result.state == "Succeeded"
    assert len(api.calls("POST")) == 1
    assert api.calls("POST")[0].path.endswith(f"/namespaces/{NAMESPACE}/pytorchjobs")
    assert len(api.objects) == 1


def test_a_failed_job_raises_a_clear_error(api):
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "BackoffLimitExceeded",
        "message": "node-1 exited with code 1",
    }
    api.script = [RUNNING, {"conditions": [failed]}]
    with pytest.raises(kube.JobFailedError) as err:
        run(api)
    text = str(err.value)
    assert L.job_name(RUN_ID, "sft") in text
    assert "BackoffLimitExceeded: node-1 exited with code 1" in text
    assert f"kubectl logs -n {NAMESPACE} -l jobset.sigs.k8s.io/jobset-name=" in text


def test_a_retry_after_a_failure_replaces_the_failed_job(api):
    # the launcher's pod is retried by KFP because the job failed: the job is submitted anew
    # (its stage resumes from the checkpoints), not re-attached to and failed again at once
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailure"}]}
    api.put(NAMESPACE, "trainjobs", manifest())
    api.script = [failed, RUNNING, COMPLETE]
    result = run(api)
    assert (result.state, result.attached) == ("Succeeded", False)
    [delete] = api.calls("DELETE")
    assert delete.path.endswith(f"/trainjobs/{result.name}")
    [post] = api.calls("POST")
    assert post.body == manifest()
    methods = [r.method for r in api.requests]
    assert methods.index("DELETE") < methods.index("POST")


def test_the_timeout_fires_and_the_job_is_deleted(api):
    api.script = [RUNNING]  # never finishes
    with pytest.raises(kube.JobTimeoutError, match=r"did not finish within 0\.3 s"):
        run(api, options(timeout_s=0.3, poll_s=0.05))
    assert len(api.calls("DELETE")) == 1 and api.objects == {}


def test_the_timeout_counts_from_the_jobs_creation_not_the_re_attach(api):
    created = datetime.now(timezone.utc) - timedelta(hours=2)
    api.put(NAMESPACE, "trainjobs", manifest(), created=created)
    api.script = [RUNNING]
    with pytest.raises(kube.JobTimeoutError, match="left it running"):
        run(api, options(timeout_s=3600, delete_on_timeout=False))
    assert api.calls("POST") == [] and api.calls("DELETE") == []
    assert len(api.objects) == 1


def test_api_hiccups_are_retried_and_a_deleted_job_is_an_error(api):
    api.put(NAMESPACE, "trainjobs", manifest())
    api.script = [RUNNING, RUNNING, COMPLETE]
    # the API answers 503 to the look-up: retried, and still no second job
    api.get_errors = [503, 503]
    assert run(api).attached and api.calls("POST") == []
    # past the client's attempts, the error surfaces
    api.get_errors = [503, 503]
    with pytest.raises(kube.KubernetesApiError, match="HTTP 503"):
        L.launch("sft", ["s3://d"], None, options(), client=client_for(api, attempts=2))
    api.get_errors = []
    sleeps = []

    def flaky(seconds):  # the API server restarts while the launcher waits between polls
        sleeps.append(seconds)
        if len(sleeps) == 1:
            api.get_errors = [503, 500, 502, 504, 503]  # more than one poll's attempts

    result = L.launch(
        "sft", ["s3://data/prep"], None, options(), client=client_for(api), sleep=flaky
    )
    assert result.state == "Succeeded" and result.attached

    api.script = [RUNNING]
    with pytest.raises(kube.JobFailedError, match="was deleted while it ran"):
        L.launch(
            "sft", ["s3://data/prep"], None, options(), client=client_for(api),
            sleep=lambda _: api.objects.clear(),
        )  # fmt: skip


def test_a_refused_token_names_the_fix(api):
    with pytest.raises(kube.KubernetesApiError, match="token was refused"):
        L.launch("sft", ["s3://d"], None, options(), client=kube.KubeClient(api.url, token="bad"))


def test_job_state_reads_both_kinds_of_conditions():
    def state(*conditions, **status):
        return kube.job_state({"status": {"conditions": list(conditions), **status}})[0]

    assert state({"type": "Created", "status": "True"}) == "Pending"
    assert state({"type": "Running", "status": "True"}) == "Running"
    assert state({"type": "Succeeded", "status": "True"}) == "Succeeded"
    assert state({"type": "Complete", "status": "True"}) == "Succeeded"
    assert state({"type": "Complete", "status": "False"}) == "Pending"
    assert state({"type": "Suspended", "status": "True"}) == "Suspended"
    assert state(jobsStatus=[{"name": "node", "active": 1}]) == "Running"


# -- the pods' side and the component --------------------------------------------------------


def test_worker_writes_tracks_and_uploads_on_rank_zero_only(
    tmp_path, monkeypatch, sample_data, capsys
):
    data = sample_data / "gsm8k_chat_messages/chat_train.jsonl"
    db = tmp_path / "mlflow.db"
    tracking = ["--tracking-uri", f"sqlite:///{db}", "--parent-run-id", "abc123"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(L.UPLOAD_ENV, str(tmp_path / "uploaded-1"))
    (tmp_path / "r1/checkpoints/checkpoint-1").mkdir(parents=True)
    assert L.worker_main(["prep", str(data), "--output", str(tmp_path / "r1"), *tracking]) == 0
    # rank 1 ran (its output went to a scratch folder) but wrote, tracked and uploaded nothing
    assert capsys.readouterr().out.startswith("prep: read 449")
    assert {p.name for p in (tmp_path / "r1").iterdir()} == {"checkpoints"}
    assert (tmp_path / "r1/checkpoints/checkpoint-1").is_dir()
    assert not db.exists() and not (tmp_path / "uploaded-1").exists()

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(L.UPLOAD_ENV, str(tmp_path / "uploaded-0"))
    (tmp_path / "r0/checkpoints/checkpoint-1").mkdir(parents=True)
    assert L.worker_main(["prep", str(data), "--output", str(tmp_path / "r0")]) == 0
    uploaded = {p.name for p in (tmp_path / "uploaded-0").iterdir()}
    assert "stats.json" in uploaded and "train.parquet" in uploaded
    assert "checkpoints" not in uploaded


def test_trainjob_component_compiles_with_its_docstring_and_no_secrets(tmp_path, monkeypatch):
    from kfp import compiler

    from components.trainjob import trainjob

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-do-not-leak")
    path = tmp_path / "trainjob.yaml"
    compiler.Compiler().compile(trainjob, str(path))
    text = path.read_text()
    spec = yaml.safe_load(text)
    assert "do-not-leak" not in text
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["stage"]["description"].startswith("The stage to run")
    assert "Kubeflow Trainer job" in text  # the docstring travels in the component's source
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))
    assert "alignpipe-cuda" not in executor["container"]["image"]  # a CPU pod: it only waits


def test_trainjob_component_submits_follows_and_reports(api, tmp_path, monkeypatch, s3_env):
    from alignpipe import storage
    from components.trainjob import trainjob

    monkeypatch.setenv("ALIGNPIPE_K8S_HOST", api.url)
    monkeypatch.setenv("ALIGNPIPE_K8S_TOKEN", api.token)
    upload_to = f"{s3_env}/runs/{RUN_ID}/sft"
    # what rank 0 of the job leaves behind when it succeeds
    storage.write_text(f"{upload_to}/metrics.json", json.dumps({"eval_loss": 1.25}))
    api.script = [RUNNING, COMPLETE]

    data = Dataset(name="data", uri="minio://mlpipeline/artifacts/prep/data", metadata={})
    base = Model(name="base", uri="minio://mlpipeline/x", metadata={"reference": "s3://m/base"})
    model = Model(name="model", uri=str(tmp_path / "model"), metadata={})
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={})
    trainjob.python_func(
        stage="sft",
        data=data,
        base_model=base,
        model=model,
        metrics=metrics,
        kfp_run_id=RUN_ID,
        upload_to=upload_to,
        nodes=2,
        gpus_per_node=8,
        config={"training": {"max_steps": 100}},
        launch_options={"namespace": NAMESPACE, "poll_s": 0.01},
    )
    assert model.metadata["reference"] == f"{upload_to}/model"
    assert metrics.metadata["eval_loss"] == 1.25
    body = api.calls("POST")[0].body
    args = body["spec"]["trainer"]["args"]
    assert args[:2] == ["sft", "s3://mlpipeline/artifacts/prep/data"]
    assert 'model="s3://m/base"' in args and "training.max_steps=100" in args
    assert body["spec"]["trainer"]["numProcPerNode"] == 8
