"""Components that open and close the MLflow parent run of a pipeline run."""

from typing import Optional

from kfp import dsl

from components import cpu_component


@cpu_component
def start_tracking(
    pipeline_name: str,
    kfp_run_id: str,
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
) -> str:
    """Check that MLflow answers and open the parent run every later step logs under.

    Runs first, so a wrong tracking URI or missing credentials fail the pipeline in seconds
    instead of after training.

    Args:
        pipeline_name: Name of the pipeline; tagged on the run.
        kfp_run_id: The KFP run id (pass ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); tagged on the
            run so the exit step can find it.
        experiment: MLflow experiment, created if missing.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI`` of the pod
            (from a Kubernetes secret on a cluster).

    Returns:
        The MLflow run id of the parent run.
    """
    from alignpipe import tracking

    return tracking.open_pipeline_run(tracking_uri, experiment, pipeline_name, kfp_run_id)


@cpu_component
def end_tracking(
    kfp_run_id: str,
    status: dsl.PipelineTaskFinalStatus,
    tracking_uri: Optional[str] = None,
):
    """End the parent run FINISHED when every step succeeded, FAILED otherwise.

    Args:
        kfp_run_id: The KFP run id the start step tagged the parent run with.
        status: The final status of the tracked steps (filled in by KFP).
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
    """
    from alignpipe import tracking

    state = "FINISHED" if status.state == "SUCCEEDED" else "FAILED"
    tracking.close_pipeline_run(tracking_uri, kfp_run_id, state, status.error_message)
