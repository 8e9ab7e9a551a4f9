"""MLflow helpers for the stages after training: they add to the training run, never a new one."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.tracking import MlflowClient


def store_lock(uri: str) -> AbstractContextManager[Any]:
    """Serialises opening a sqlite tracking store across processes (DDP ranks, nodes on a shared
    disk): MLflow creates and migrates the schema when a client first opens the file, and two
    processes doing it at once collide ("duplicate column name"). Server URIs need no lock."""
    if uri.startswith("sqlite:///"):
        return FileLock(uri.removeprefix("sqlite:///") + ".lock")
    return nullcontext()


# MLflow 3.17's UI opens every experiment in its GenAI view (traces, "Evaluation runs", judges)
# unless the page's `workflowType` query parameter, or the GenAI / Model training switch it
# remembers in the browser, says otherwise (seen in headless Chromium: the experiment tag below is
# read only where that switch is disabled). So links we print carry the parameter, and the tag
# covers UIs that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
UI_MODEL_TRAINING = "workflowType=machine_learning"


def ui_link(experiment_id: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """The `mlflow ui` page of an experiment (or run) in the model-training view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_MODEL_TRAINING}"


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training, unless someone chose its kind already."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def training_run(run_file: str | Path = "models/train/run.json") -> tuple[MlflowClient, str]:
    info = json.loads(Path(run_file).read_text())
    return MlflowClient(tracking_uri=info["tracking_uri"]), info["run_id"]


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], prefix: str, step: int = 0) -> None:
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run_id, f"{prefix}{key}", float(value), step=step)


def register_folder(client: MlflowClient, run_id: str, folder: str | Path, artifact_path: str, name: str) -> int:
    """Log `folder` as artifacts and register it as a new version of model `name`."""
    client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    try:
        client.get_registered_model(name)
    except Exception:  # mlflow raises RestException/MlflowException when absent
        client.create_registered_model(name, description="sdvae KL autoencoders (diffusers AutoencoderKL format)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    return int(version.version)
