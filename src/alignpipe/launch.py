"""Run a training stage on several GPUs: torchrun within a node, a Kubeflow Trainer job past it.

Within one node, :func:`torchrun_command` turns the accelerator count into a ``torchrun`` command
line and :func:`launch` runs it in this pod. Past one node, :func:`launch` writes a Kubeflow
Trainer job (a ``TrainJob`` of ``trainer.kubeflow.org/v1alpha1`` on a runtime such as
``torch-distributed``, or a ``PyTorchJob`` of ``kubeflow.org/v1`` on clusters with the older
training operator), submits it through the Kubernetes API and follows its status conditions to
completion or a timeout. The job's name is derived from the KFP run id and the stage, so a
launcher whose pod is restarted finds its job and follows it instead of starting a second one.

Every process runs :func:`worker_main` (``python -m alignpipe.launch``), which runs the stage
through the ``alignpipe`` CLI. All ranks share the stage's checkpoints; only global rank 0
writes the rest of the output, tracks to MLflow and uploads the result. Credentials reach the
job pods as references to the same Kubernetes secrets the pipelines use, never as values in the
manifest. The Kubernetes API calls live in :mod:`alignpipe.kube`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignpipe import __version__, kube
from alignpipe.config import is_secret_key, option
from alignpipe.errors import ConfigError

log = logging.getLogger(__name__)

# Stages built on a TRL trainer: under torchrun, transformers' Trainer runs them data-parallel.
DISTRIBUTED_STAGES = frozenset({"sft", "dpo", "reward_model", "multitask"})
WORKER_MODULE = "alignpipe.launch"
UPLOAD_ENV = "ALIGNPIPE_UPLOAD_TO"
PROCESSES_ENV = "ALIGNPIPE_PROCESSES"  # processes a component runs a stage on; unset = GPUs
# Stages that only read and write data, on CPU pods: no device count needed (nor a torch import).
DATA_STAGES = frozenset({"prep", "ingest"})
MAX_NAME_LENGTH = 40  # pods are named <job>-<replica>-<index>-<suffix>; those must fit in 63

# Secret keys the job pods read as environment variables of the same names; True = required.
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": True,
    "AWS_SECRET_ACCESS_KEY": True,
    "AWS_ENDPOINT_URL": False,
    "AWS_DEFAULT_REGION": False,
}
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_URI": True,
    "MLFLOW_TRACKING_USERNAME": False,
    "MLFLOW_TRACKING_PASSWORD": False,
    "MLFLOW_TRACKING_TOKEN": False,
    "MLFLOW_S3_ENDPOINT_URL": False,
}


@dataclass
class LaunchOptions:
    """Where and how a stage runs when it needs more than one GPU."""

    kind: Literal["trainjob", "pytorchjob"] = option(
        "trainjob",
        help="trainjob = a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1); "
        "pytorchjob = a PyTorchJob (kubeflow.org/v1), for the older training operator.",
    )
    nodes: int = option(
        1, help="Nodes (pods) to train on; 1 runs torchrun in this pod unless job=true."
    )
    gpus_per_node: int = option(
        1, help="Accelerators per node, and so processes per node (0 = one CPU process per node)."
    )
    accelerator: str = option("nvidia.com/gpu", help="Resource name of the accelerator.")
    cpu: str | None = option("8", help="CPU request and limit per node; unset = none.")
    memory: str | None = option("64G", help="Memory request and limit per node; unset = none.")
    shm_size: str | None = option(
        "8Gi", help="Size of /dev/shm in the job pods (NCCL needs more than the 64 MB default)."
    )
    image: str | None = option(
        None, help="Image of the job pods; unset = $ALIGNPIPE_GPU_IMAGE or the CUDA image."
    )
    namespace: str | None = option(
        None, help="Namespace of the job; unset = $ALIGNPIPE_K8S_NAMESPACE or this pod's own."
    )
    runtime: str = option(
        "torch-distributed", help="ClusterTrainingRuntime a TrainJob runs on (kind=trainjob)."
    )
    service_account: str | None = option(
        None, help="Service account of the job pods; unset = the namespace's default."
    )
    s3_secret: str | None = option(
        "alignpipe-s3", help="Secret with the AWS_* keys the pods read; unset = no S3 access."
    )
    mlflow_secret: str | None = option(
        "alignpipe-mlflow", help="Secret with the MLFLOW_* keys the pods read; unset = no tracking."
    )
    node_selector: dict[str, str] = option(
        default_factory=dict, help="Node labels the job pods must run on (a GPU pool)."
    )
    tolerations: list[dict[str, Any]] = option(
        default_factory=list, help="Tolerations of the job pods, as Kubernetes writes them."
    )
    labels: dict[str, str] = option(default_factory=dict, help="Extra labels on the job.")
    output_pvc: str | None = option(
        None,
        help="A ReadWriteMany PersistentVolumeClaim mounted in every job pod; outputs and "
        "checkpoints on it survive pod restarts, so a restarted job resumes.",
    )
    pvc_mount: str = option("/mnt/alignpipe", help="Where output_pvc is mounted in the pods.")
    upload_to: str | None = option(
        None,
        help="s3:// prefix that global rank 0 copies the stage's output to (without "
        "checkpoints) when the stage succeeds.",
    )
    run_id: str | None = option(
        None, help="The KFP run id; with the stage it names the job (needed for nodes > 1)."
    )
    parent_run_id: str | None = option(None, help="MLflow parent run the stage logs under.")
    experiment: str = option("alignpipe", help="MLflow experiment, when there is no parent run.")
    config: dict[str, Any] = option(
        default_factory=dict,
        help="The stage's own options, as for `alignpipe STAGE` (e.g. {training: {max_steps: "
        "500}}); checked here before anything is submitted.",
    )
    timeout_s: float = option(
        86400.0, help="Give up this many seconds after the job was created (not re-attached)."
    )
    poll_s: float = option(20.0, help="Seconds between status checks of the job.")
    delete_on_timeout: bool = option(
        True, help="Delete the job when the timeout fires, so it stops holding GPUs."
    )
    job: bool = option(
        False, help="Run as a cluster job even on one node (a CPU pod launching a GPU job)."
    )
    backoff_limit: int = option(3, help="Pod restarts a PyTorchJob allows before it fails.")
    dry_run: bool = option(False, help="Print the job manifest instead of submitting it.")

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus_per_node must be 0 or more, got {self.gpus_per_node}")
        if self.timeout_s <= 0 or self.poll_s <= 0:
            raise ConfigError("timeout_s and poll_s must be positive numbers of seconds")
        for item in self.tolerations:
            if not isinstance(item, Mapping) or not ({"key", "operator"} & set(item)):
                raise ConfigError(
                    f"toleration {item!r} needs a key or an operator, e.g. {{key: "
                    "nvidia.com/gpu, operator: Exists, effect: NoSchedule}"
                )
        for key, value in {**self.labels, **self.node_selector}.items():
            if not _LABEL_VALUE.match(str(value)) or not _LABEL_KEY.match(str(key)):
                raise ConfigError(
                    f"{key}={value} is not a valid Kubernetes label; use letters, digits, '-', "
                    "'_' and '.', at most 63 characters"
                )
        if self.output_pvc and not self.pvc_mount.startswith("/"):
            raise ConfigError(f"pvc_mount must be an absolute path, got {self.pvc_mount!r}")
        if self.upload_to is not None and not self.upload_to.startswith("s3://"):
            raise ConfigError(f"upload_to must be an s3:// prefix, got {self.upload_to!r}")

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class LaunchResult:
    """What a launch did: where the stage ran and how it ended."""

    stage: str
    mode: Literal["local", "job", "dry_run"]
    name: str | None = None  # the job's name (mode job / dry_run)
    state: str | None = None  # the job's last state
    attached: bool = False  # True when an existing job was followed instead of a new one
    manifest: dict[str, Any] | None = None


# -- what runs --------------------------------------------------------------------------------


def stage_name(stage: str) -> str:
    """The runner's name of a stage given either way (``reward-model`` or ``reward_model``)."""
    from alignpipe.runner import STAGES

    name = stage.replace("-", "_")
    if name not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(sorted(STAGES))}")
    return name


def check_distributed(stage: str, processes: int) -> None:
    """Refuse a stage that cannot run as ``processes`` processes, rather than run it wrongly."""
    if processes <= 1:
        return
    if stage == "ppo":
        raise NotImplementedError(
            "alignpipe's PPO loop is single-process (rollouts, reward scoring and updates run "
            "in one process, with no gradient sync between ranks); run ppo with nodes=1 and "
            "gpus_per_node=1"
        )
    if stage not in DISTRIBUTED_STAGES:
        raise NotImplementedError(
            f"{stage} does not run data-parallel; only {', '.join(sorted(DISTRIBUTED_STAGES))} "
            "do (TRL trainers under torchrun). Run it with nodes=1 and gpus_per_node=1"
        )


def torchrun_command(
    nproc_per_node: int,
    *,
    nodes: int = 1,
    rendezvous: Literal["standalone", "pytorchjob", "trainjob"] = "standalone",
) -> list[str]:
    """The ``torchrun`` command line that starts :func:`worker_main` on every process.

    Args:
        nproc_per_node: Processes per node, one per accelerator.
        nodes: Nodes taking part.
        rendezvous: ``standalone`` for one node (a local rendezvous); ``pytorchjob`` reads the
            node rank and master address the training operator sets in each pod (``$(RANK)``,
            ``$(MASTER_ADDR)``, ``$(MASTER_PORT)``, expanded by Kubernetes); ``trainjob`` leaves
            them to the ``PET_*`` variables the Trainer's torch runtime sets.
    """
    if nproc_per_node < 1 or nodes < 1:
        raise ConfigError(f"torchrun needs at least one process, got {nodes} x {nproc_per_node}")
    command = ["torchrun"]
    if rendezvous == "standalone":
        if nodes != 1:
            raise ConfigError("a standalone torchrun runs on one node; use a job for more")
        command += ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    elif rendezvous == "pytorchjob":
        command += [
            f"--nnodes={nodes}",
            f"--nproc-per-node={nproc_per_node}",
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
    else:
        command += [f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}"]
    return [*command, "--module", WORKER_MODULE]


def stage_arguments(
    stage: str, inputs: Sequence[str], output: str, options: LaunchOptions
) -> list[str]:
    """The ``alignpipe STAGE ...`` arguments, after checking the stage's config here.

    The stage's options travel as ``key=value`` overrides with JSON values (which the CLI reads
    as YAML). Options whose names look like credentials are refused: those belong in secrets.
    """
    from alignpipe.runner import build_config

    flat = _flatten(options.config)
    secret = [key for key in flat if is_secret_key(key)]
    if secret:
        raise ConfigError(
            f"config option {secret[0]} looks like a credential; put it in a Kubernetes secret "
            "and the pods' environment, not in the launched command"
        )
    build_config(stage, None, flat)  # fail here, not after the job has waited for GPUs
    args = [stage.replace("_", "-"), *inputs, "--output", output]
    args += [f"{key}={json.dumps(value)}" for key, value in flat.items()]
    args += ["--experiment", options.experiment]
    if options.parent_run_id:
        args += ["--parent-run-id", options.parent_run_id]
    return args


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- the job manifest -------------------------------------------------------------------------


def job_name(run_id: str, stage: str) -> str:
    """A job name that is the same for the same KFP run and stage, and valid in Kubernetes.

    Lower-case letters, digits and '-', starting with a letter (RFC 1035, which TrainJob
    requires), at most :data:`MAX_NAME_LENGTH` characters; a hash of the full run id and stage
    keeps names of different runs apart when the readable part is cut.
    """
    if not run_id or not run_id.strip():
        raise ConfigError(
            "a cluster job needs run_id (the KFP run id, dsl.PIPELINE_JOB_ID_PLACEHOLDER) to "
            "get a stable name a restarted launcher can find"
        )
    digest = hashlib.sha256(f"{run_id}\0{stage}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9]+", "-", f"{stage}-{run_id}".lower()).strip("-")
    head = f"ap-{readable}"[: MAX_NAME_LENGTH - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def remote_uri(uri: str) -> str:
    """An artifact URI as the job pods read it: ``s3://`` as it is, ``minio://`` as ``s3://``."""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    if uri.startswith("s3://"):
        return uri
    raise ConfigError(
        f"{uri} cannot be read from the pods of a cluster job; give the stage s3:// inputs (an "
        "S3 or MinIO artifact store, or a model reference in the artifact's metadata)"
    )


def default_image() -> str:
    """The CUDA image of this package version, as the GPU components use it."""
    registry = os.environ.get("ALIGNPIPE_IMAGE_REGISTRY", "ghcr.io/alignpipe")
    tag = __version__.replace("+", "-")
    return os.environ.get("ALIGNPIPE_GPU_IMAGE", f"{registry}/alignpipe-cuda:{tag}")


def default_output(options: LaunchOptions, name: str) -> str:
    """Where the stage writes inside the job pods: on the shared volume, or the pod's disk."""
    if options.output_pvc:
        return f"{options.pvc_mount.rstrip('/')}/{name}"
    return f"/tmp/alignpipe/{name}"


def secret_env(options: LaunchOptions) -> list[dict[str, Any]]:
    """Environment variables read from the secrets by reference; no value is copied."""
    env = []
    for secret, keys in (
        (options.s3_secret, S3_SECRET_KEYS),
        (options.mlflow_secret, MLFLOW_SECRET_KEYS),
    ):
        if not secret:
            continue
        for key, required in keys.items():
            ref: dict[str, Any] = {"name": secret, "key": key}
            if not required:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def build_manifest(
    stage: str, inputs: Sequence[str], output: str | None, options: LaunchOptions
) -> dict[str, Any]:
    """The TrainJob or PyTorchJob that runs ``stage`` on ``options.nodes`` nodes.

    Raises:
        ConfigError: Missing run id, an output that would vanish with the pods, or a bad
            stage config.
        NotImplementedError: The stage cannot run as several processes.
    """
    stage = stage_name(stage)
    check_distributed(stage, options.nodes * options.processes_per_node)
    name = job_name(options.run_id or "", stage)
    if not options.output_pvc and not options.upload_to:
        raise ConfigError(
            "a cluster job's output would vanish with its pods; set upload_to=s3://... (rank 0 "
            "copies the output there) or output_pvc=<ReadWriteMany claim>"
        )
    output = output or default_output(options, name)
    if options.output_pvc and not output.startswith(options.pvc_mount.rstrip("/") + "/"):
        raise ConfigError(
            f"output {output} is not on the shared volume; put it under {options.pvc_mount}/"
        )
    if not options.output_pvc:
        options = _with_checkpoint_store(stage, options)
    args = stage_arguments(stage, inputs, output, options)
    labels = {
        "app.kubernetes.io/name": "alignpipe",
        "app.kubernetes.io/component": stage.replace("_", "-"),
        "app.kubernetes.io/version": _label_safe(__version__),
        "app.kubernetes.io/managed-by": "alignpipe-launch",
        "alignpipe/stage": stage.replace("_", "-"),
        "alignpipe/run-id": _label_safe(options.run_id or ""),
        **options.labels,
    }
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, *secret_env(options)]
    if options.upload_to:
        env.append({"name": UPLOAD_ENV, "value": options.upload_to})
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if options.gpus_per_node:
        limits[options.accelerator] = str(options.gpus_per_node)
    for resource, amount in (("cpu", options.cpu), ("memory", options.memory)):
        if amount:
            limits[resource] = requests[resource] = str(amount)
    resources = {"limits": limits, **({"requests": requests} if requests else {})}
    volumes, mounts = _volumes(options)
    build = _trainjob if options.kind == "trainjob" else _pytorchjob
    spec = build(options, args, env, resources, volumes, mounts, labels)
    api_version, _, kind = kube.RESOURCES[options.kind]
    manifest = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "labels": labels, "annotations": {}},
        "spec": spec,
    }
    manifest["metadata"]["annotations"][kube.SPEC_ANNOTATION] = _spec_digest(spec)
    return manifest


def _with_checkpoint_store(stage: str, options: LaunchOptions) -> LaunchOptions:
    """Keep checkpoints under ``upload_to`` when the pods' own disks are all they have.

    A restarted job's pods start with empty folders; with ``training.checkpoint_uri`` set they
    resume from the newest stored checkpoint instead of from step 0. A value the stage config
    sets itself is kept.
    """
    import dataclasses

    from alignpipe.config import describe
    from alignpipe.runner import config_class

    known = {row[0] for row in describe(config_class(stage))}
    training = options.config.get("training") or {}
    if "training.checkpoint_uri" not in known or training.get("checkpoint_uri"):
        return options
    uri = f"{options.upload_to.rstrip('/')}/checkpoints"
    config = {**options.config, "training": {**training, "checkpoint_uri": uri}}
    return dataclasses.replace(options, config=config)


def _trainjob(options, args, env, resources, volumes, mounts, labels) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runtimeRef": {"name": options.runtime},
        "trainer": {
            "image": options.image or default_image(),
            "command": torchrun_command(
                options.processes_per_node, nodes=options.nodes, rendezvous="trainjob"
            ),
            "args": args,
            "env": env,
            "numNodes": options.nodes,
            "numProcPerNode": options.processes_per_node,
            "resourcesPerNode": resources,
        },
        "labels": labels,
    }
    pod: dict[str, Any] = {}
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    if options.node_selector:
        pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod["tolerations"] = [dict(t) for t in options.tolerations]
    if volumes:
        pod["volumes"] = volumes
        pod["containers"] = [{"name": "node", "volumeMounts": mounts}]
    if pod:
        spec["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "spec": pod}]
    return spec


def _pytorchjob(options, args, env, resources, volumes, mounts, labels) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "pytorch",  # the training operator looks for this container name
        "image": options.image or default_image(),
        "command": torchrun_command(
            options.processes_per_node, nodes=options.nodes, rendezvous="pytorchjob"
        ),
        "args": args,
        "env": env,
        "resources": resources,
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {"containers": [container]}
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    if options.node_selector:
        pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod["tolerations"] = [dict(t) for t in options.tolerations]
    if volumes:
        pod["volumes"] = volumes

    def replicas(count: int) -> dict[str, Any]:
        template = {"metadata": {"labels": labels}, "spec": pod}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    spec: dict[str, Any] = {
        "runPolicy": {"backoffLimit": options.backoff_limit, "cleanPodPolicy": "None"},
        "nprocPerNode": str(options.processes_per_node),
        "pytorchReplicaSpecs": {"Master": replicas(1)},
    }
    if options.nodes > 1:
        spec["pytorchReplicaSpecs"]["Worker"] = replicas(options.nodes - 1)
    return spec


def _volumes(options: LaunchOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes, mounts = [], []
    if options.shm_size:
        volumes.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}}
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if options.output_pvc:
        volumes.append(
            {"name": "output", "persistentVolumeClaim": {"claimName": options.output_pvc}}
        )
        mounts.append({"name": "output", "mountPath": options.pvc_mount})
    return volumes, mounts


def _label_safe(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _spec_digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# -- the entry points -------------------------------------------------------------------------


def launch(
    stage: str,
    inputs: Sequence[str],
    output: str | None,
    options: LaunchOptions,
    *,
    client: kube.KubeClient | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> LaunchResult:
    """Run ``stage`` on ``options.nodes`` x ``options.gpus_per_node`` accelerators.

    One node: torchrun in this process's machine (or the plain CLI for one process). More
    nodes: a TrainJob or PyTorchJob, created or re-attached to, and followed to the end.

    Raises:
        ConfigError: Bad launch or stage options (before anything runs).
        NotImplementedError: The stage cannot run as several processes (e.g. ppo).
        kube.JobFailedError, kube.JobTimeoutError, kube.KubernetesApiError: The job failed,
            ran out of time, or the API refused.
    """
    stage = stage_name(stage)
    if not inputs:
        raise ConfigError(f"{stage} needs its data: alignpipe launch {stage} INPUT... --output DIR")
    if options.nodes == 1 and not options.job and not options.dry_run:
        if not output:
            raise ConfigError(f"{stage} needs an output folder when it runs in this pod")
        run_local(stage, inputs, output, options)
        return LaunchResult(stage, "local")
    manifest = build_manifest(stage, inputs, output, options)
    name = manifest["metadata"]["name"]
    if options.dry_run:
        return LaunchResult(stage, "dry_run", name=name, manifest=manifest)
    client = client or kube.KubeClient.from_environment()
    namespace = kube.resolve_namespace(options.namespace)
    job, attached = kube.submit_or_attach(client, namespace, manifest)
    state = kube.follow(
        client,
        namespace,
        job,
        timeout_s=options.timeout_s,
        poll_s=options.poll_s,
        delete_on_timeout=options.delete_on_timeout,
        sleep=sleep,
    )
    return LaunchResult(stage, "job", name=name, state=state, attached=attached)


def run_local(
    stage: str,
    inputs: Sequence[str],
    output: str,
    options: LaunchOptions,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run the stage on this machine: under torchrun for several GPUs, else one process.

    ``env`` is added to this process's environment for the workers (e.g. the tracking URI).
    """
    processes = options.processes_per_node
    check_distributed(stage, processes)
    args = stage_arguments(stage, inputs, output, options)
    if processes > 1:
        command = torchrun_command(processes)
        command[0] = str(Path(sys.executable).with_name("torchrun"))
    else:
        command = [sys.executable, "-m", WORKER_MODULE]
    log.info("running %s on %d process(es): %s", stage, processes, " ".join(command + args))
    # a lone worker has no LOCAL_RANK: this keeps its run_stage from launching one per GPU
    environment = {**os.environ, **(env or {}), PROCESSES_ENV: "1"}
    code = subprocess.run([*command, *args], check=False, env=environment).returncode
    if code != 0:
        raise kube.JobFailedError(f"{stage} exited with status {code}; its error is logged above")


def local_processes(
    stage: str, env: Mapping[str, str] | None = None, device_count: int | None = None
) -> int:
    """How many processes a component runs ``stage`` on in its own pod (1 = in-process).

    One per GPU (``device_count``, by default ``torch.cuda.device_count()``), or
    ``$ALIGNPIPE_PROCESSES`` when set (which also lets a CPU machine run several gloo
    processes). Always 1 inside a torchrun worker, and for stages that do not run data-parallel:
    those log why and use one device.
    """
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env or "WORLD_SIZE" in env:
        return 1  # already one rank of a launched stage
    raw = env.get(PROCESSES_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{PROCESSES_ENV}={raw!r}: set it to a whole number of at least 1")
        processes = int(raw)
    elif stage in DATA_STAGES:
        return 1
    else:
        if device_count is None:
            import torch

            device_count = torch.cuda.device_count()
        processes = max(device_count, 1)
    if processes > 1 and stage not in DISTRIBUTED_STAGES:
        why = (
            "its loop is single-process (rollouts, scoring and updates in one process)"
            if stage == "ppo"
            else "it does not run data-parallel"
        )
        log.info("%s runs in one process although %d are available: %s", stage, processes, why)
        return 1
    return processes


def run_processes(
    stage: str,
    inputs: str | Sequence[str],
    output: str,
    config: Any,
    processes: int,
    *,
    tracking_uri: str | None,
    experiment: str,
    parent_run_id: str | None,
) -> Any:
    """Run ``stage`` under torchrun on ``processes`` local processes and return its result.

    The ready ``config`` travels to the workers as overrides; global rank 0 opens the stage's
    MLflow run (under ``parent_run_id``) and writes ``OUTPUT``, so this launcher opens none.
    The result is read back from ``OUTPUT/metrics.json``; it has no ``peak_rss_mb`` (this
    launcher's own memory says nothing of the workers'; rank 0 logs its own peak to its run).
    """
    from alignpipe.config import to_dict
    from alignpipe.models import STAGE_MODEL_DIR
    from alignpipe.training import TrainResult

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    options = LaunchOptions(
        gpus_per_node=processes,
        config=to_dict(config),
        parent_run_id=parent_run_id,
        experiment=experiment,
    )
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    run_local(stage, inputs, output, options, env=env)
    out = Path(output).expanduser()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))  # rank 0 wrote it
    return TrainResult(model_dir=str(out / STAGE_MODEL_DIR), metrics=metrics)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One process of a launched stage: run it through the CLI; rank 0 alone tracks and writes.

    Every rank trains, and all share ``OUTPUT/checkpoints`` (the trainer writes each checkpoint
    once and one RNG state per rank, and every rank resumes from the same step). Only global
    rank 0 writes the rest of ``OUTPUT`` and tracks to MLflow: the other ranks drop the tracking
    settings and write their copy of the model and metrics to a scratch folder that is deleted
    afterwards, so no two processes write the same file and an MLflow run is opened once per
    stage, not once per GPU. With ``$ALIGNPIPE_UPLOAD_TO`` set, rank 0 copies the output
    (without checkpoints) there after the stage succeeds.
    """
    import shutil
    import tempfile

    from alignpipe import cli
    from alignpipe.training import CHECKPOINT_DIR

    argv = list(sys.argv[1:] if argv is None else argv)
    output = _option_value(argv, "--output")
    if output is None:
        raise ConfigError("a launched stage needs --output")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        code = cli.main(argv)
        upload_to = os.environ.get(UPLOAD_ENV)
        if code == 0 and upload_to:
            upload_output(output, upload_to)
        return code

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    shared = Path(output).expanduser().resolve() / CHECKPOINT_DIR
    shared.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"alignpipe-rank{rank}-"))
    try:
        (scratch / CHECKPOINT_DIR).symlink_to(shared, target_is_directory=True)
        argv = _without_options(argv, ("--tracking-uri", "--parent-run-id", "--output"))
        return cli.main([*argv, "--output", str(scratch)])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # removes the link, not the checkpoints


def upload_output(output: str, uri: str) -> None:
    """Copy a stage's output folder to ``uri``, leaving its checkpoints behind."""
    from alignpipe import storage
    from alignpipe.training import CHECKPOINT_DIR

    for child in sorted(Path(output).iterdir()):
        if child.name != CHECKPOINT_DIR:
            storage.upload(child, f"{uri.rstrip('/')}/{child.name}")
    log.info("uploaded %s to %s", output, uri)


def _without_options(argv: list[str], names: Sequence[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(f"{n}=") for n in names):
            continue
        kept.append(arg)
    return kept


def _option_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def summary(result: LaunchResult) -> str:
    """One line (or, for a dry run, the manifest as YAML) saying what a launch did."""
    if result.manifest is not None:
        import yaml

        # a JSON round trip drops the shared objects YAML would print as anchors
        return yaml.safe_dump(json.loads(json.dumps(result.manifest)), sort_keys=False).rstrip()
    if result.mode == "local":
        return f"launch: {result.stage} finished in this pod"
    how = "re-attached to" if result.attached else "created"
    return f"launch: {result.stage} {how} {result.name}, which ended {result.state}"


if __name__ == "__main__":
    sys.exit(worker_main())
