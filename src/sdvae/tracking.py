"""MLflow helpers for the stages after training: they add to the training run, never a new one."""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# DVC runs queued (`dvc exp run --queue`, `dvc queue start -j N`) and temporary (`--temp`)
# experiments in a copy of the repo under .dvc/tmp/exps/ that it deletes afterwards, and tells
# the stages where the user's workspace is (DVC_ROOT) and which experiment runs (DVC_EXP_*),
# in dvc/repo/experiments/queue/base.py. A default store relative to the stage's directory
# would live, and die, in that copy.
DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV = "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"


def workspace_root() -> Path:
    """The user's workspace: DVC's `DVC_ROOT` under any DVC run, else the current directory."""
    return Path(os.environ.get(DVC_ROOT) or ".").resolve()


def default_store() -> tuple[str, str]:
    """(tracking URI, artifact location) of the default store: mlflow.db and mlruns/ in the workspace."""
    root = workspace_root()
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "mlruns")


def resolve_store(explicit: str | None) -> tuple[str, str | None]:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI (artifacts where that store puts them), else the default."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return (uri, None) if uri else default_store()


def holds_run(uri: str, run_id: str) -> bool:
    """Whether the store at `uri` holds run `run_id`; a sqlite store that is not there is not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    try:
        with store_lock(uri):  # opening may migrate the schema
            MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def experiment_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to, so `dvc exp show` rows and MLflow runs match both ways."""
    tags = {"dvc.exp_name": os.environ.get(DVC_EXP_NAME), "dvc.baseline_rev": os.environ.get(DVC_EXP_BASELINE_REV)}
    return {k: v for k, v in tags.items() if v}


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
    """The training run's store and id. A run in the default store is found in this workspace's
    store (the record travels with `dvc pull` to other clones, an absolute path would not)."""
    info = json.loads(Path(run_file).read_text())
    uri = default_store()[0] if info.get("default_store") else info["tracking_uri"]
    return MlflowClient(tracking_uri=uri), info["run_id"]


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], prefix: str, step: int = 0) -> None:
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run_id, f"{prefix}{key}", float(value), step=step)


def register_folder(client: MlflowClient, run_id: str, folder: str | Path, artifact_path: str, name: str) -> int:
    """Log `folder` as artifacts and register it as a new version of model `name`.

    Queued experiments (`dvc queue start -j 2`) export at the same moment into one sqlite store:
    unserialised, both see no registered model and the second `create_registered_model` fails,
    or both number their version alike. The store's lock makes check-and-create one step."""
    client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    with store_lock(client.tracking_uri):
        try:
            client.get_registered_model(name)
        except MlflowException:  # absent
            client.create_registered_model(name, description="sdvae KL autoencoders (diffusers AutoencoderKL format)")
        version = client.create_model_version(name, source=source, run_id=run_id)
    return int(version.version)
