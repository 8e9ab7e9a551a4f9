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


# MLflow 3's UI opens an experiment by this tag: without it, one of our experiments opened in the
# GenAI view (traces, "Evaluation runs", judges) instead of the runs table and their charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


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
