"""Multi-node training component: submit a Kubeflow Trainer job for a stage and follow it."""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import cpu_component


@cpu_component
def trainjob(
    stage: str,
    data: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    kfp_run_id: str,
    upload_to: str,
    nodes: int = 2,
    gpus_per_node: int = 8,
    config: Optional[dict] = None,
    launch_options: Optional[dict] = None,
    parent_run_id: Optional[str] = None,
):
    """Train a stage across several nodes as a Kubeflow Trainer job, and wait for it.

    Use this instead of the stage's own component when one node's GPUs are not enough (a model
    or a batch that needs several nodes). This task itself needs no GPU: it writes a TrainJob
    (or a PyTorchJob, ``launch_options={"kind": "pytorchjob"}``), submits it with the pod's
    service account, and follows it to completion or ``timeout_s``. If this pod is restarted,
    the job's name (from the run id and the stage) lets it find and follow the same job instead
    of starting a second one. The job pods read S3 and MLflow credentials from the same secrets
    as the pipeline (``alignpipe-s3``, ``alignpipe-mlflow``). Global rank 0 copies the stage's
    output (without checkpoints) to ``upload_to``; the model output of this task refers to it.

    Only stages built on TRL trainers run this way (sft, dpo, reward_model, multitask);
    alignpipe's PPO is single-process and is refused.

    Args:
        stage: The stage to run: ``sft``, ``dpo``, ``reward_model`` or ``multitask``.
        data: The stage's data; its URI must be readable from the job pods (an ``s3://`` or
            ``minio://`` artifact store that the ``alignpipe-s3`` secret can read).
        base_model: The model to start from (a reference in its metadata, or its URI).
        model: Refers to ``<upload_to>/model`` in its metadata (``reference``).
        metrics: The stage's final metrics, read from ``<upload_to>/metrics.json``.
        kfp_run_id: The KFP run id (pass ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); names the job.
        upload_to: An ``s3://`` prefix for the stage's output, e.g. one per run and stage.
        nodes: Nodes (pods) of the job.
        gpus_per_node: Accelerators, and so training processes, per node.
        config: Options of the stage (``alignpipe options STAGE``), as for its own component.
        launch_options: Options of ``alignpipe.launch.LaunchOptions``: ``kind``, ``namespace``,
            ``image``, ``accelerator``, ``cpu``, ``memory``, ``tolerations``,
            ``node_selector``, ``output_pvc``, ``timeout_s``, ...
        parent_run_id: MLflow parent run of this pipeline run.
    """
    import json

    from alignpipe import launch, storage
    from alignpipe.config import from_dict

    start = base_model.metadata.get("reference") or launch.remote_uri(base_model.uri)
    options = from_dict(
        launch.LaunchOptions,
        {
            **(launch_options or {}),
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "run_id": kfp_run_id,
            "job": True,
            "upload_to": upload_to,
            "parent_run_id": parent_run_id or None,
            "config": {**(config or {}), "model": start},
        },
    )
    launch.launch(stage, [launch.remote_uri(data.uri)], None, options)

    model.metadata["reference"] = f"{upload_to.rstrip('/')}/model"
    final = json.loads(storage.read_text(f"{upload_to.rstrip('/')}/metrics.json"))
    for key, value in final.items():
        metrics.log_metric(key, value)
