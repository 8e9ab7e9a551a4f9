"""MLflow store helpers under concurrency: queued DVC experiments share one sqlite store."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import mlflow


def _register(uri: str, run_id: str, folder: str, start: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from sdvae.tracking import register_folder

    client = mlflow.MlflowClient(uri)
    start.wait()
    try:
        out.put(register_folder(client, run_id, folder, "vae", "racing"))
    except Exception as exc:  # reported to the parent, which fails with it
        out.put(f"{type(exc).__name__}: {exc}")


def test_two_exports_registering_at_once_both_get_a_version(tmp_path: Path) -> None:
    """`dvc queue start -j 2` ends two experiments together: each registers its export as a new
    version of one model that neither found in the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "mlruns"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    runs = [client.create_run(exp).info.run_id for _ in range(6)]
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(runs)), ctx.Queue()
    procs = [ctx.Process(target=_register, args=(uri, r, str(folder), start, out)) for r in runs]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(results, key=str) == [1, 2, 3, 4, 5, 6], results
    versions = client.search_model_versions("name='racing'")
    assert sorted(v.run_id for v in versions) == sorted(runs)
