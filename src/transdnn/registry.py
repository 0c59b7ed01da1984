"""Model registry: one registered model per partition; the alias `champion` names the model to use.

Promotion registers the replicates of a training run (idempotently), picks the best by the criterion
in params.yaml, moves `champion` to it and keeps the former champion as `previous`. With
`require_better` it moves only to a replicate that beats the champion; figures compare only when both
are ranks of the same checkpoint kind on the same transform sets, genes and homology, and otherwise the
new training's best takes the alias.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from transdnn.errors import TrackingError
from transdnn.lineage import RANKED_ON
from transdnn.tracking import PARENT_ROLE, ROLE_TAG, answered, input_digests, reader, retry, store_lock, training_run

CHAMPION = "champion"
PREVIOUS = "previous"
CHECKPOINT_PARAM = "embed.checkpoint"  # a training run's param: which checkpoint its chosen ranks are of
MAX_RUNS_NAMED = 3  # a promotion reason names up to this many training runs, else counts them


def model_name(partition: str) -> str:
    return f"transdnn-{partition}"


def champion_uri(partition: str) -> str:
    return f"models:/{model_name(partition)}@{CHAMPION}"


@dataclass(frozen=True)
class Candidate:
    run_id: str
    replicate: int
    model_uri: str
    rank: float
    valid_loss: float
    dataset: str
    parent_run_id: str

    def key(self, criterion: str) -> tuple[float, float]:
        return (self.rank, self.valid_loss) if criterion == "homology_rank" else (self.valid_loss, self.rank)

    def figures(self) -> str:
        return f"homology rank {self.rank:.4f}, valid loss {self.valid_loss:.5f}"

    @property
    def trained(self) -> bool:
        """Whether its chosen checkpoint holds trained weights: a NaN rank says it diverged before that
        checkpoint's first finite validation loss; runs of older transdnn ranked such initial weights, so a
        loss that was never finite (MLflow stores it as the largest float) says so too."""
        return math.isfinite(self.rank) and self.valid_loss < sys.float_info.max


def describe(version: str, cand: Candidate | None, dataset: str | None = None) -> dict[str, Any]:
    """A registered version as `promotion.json` and `registry show --json` both print it, under the names
    its run's metrics carry in MLflow (None where the version's run is gone)."""
    return {
        "version": int(version),
        "run_id": cand.run_id if cand else None,
        "dataset": cand.dataset if cand else dataset,
        "replicate": cand.replicate if cand else None,
        "chosen_homology_rank": cand.rank if cand else None,
        "best_valid_loss": cand.valid_loss if cand else None,
    }


@dataclass(frozen=True)
class Promotion:
    """Where `champion` points after a promotion, and the training's best it was offered."""

    version: str
    champion: Candidate
    candidate_version: str
    candidate: Candidate
    moved: bool
    reason: str


def latest_training(client: MlflowClient, experiment_id: str, partition: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        f"tags.partition = '{partition}' and tags.`{ROLE_TAG}` = '{PARENT_ROLE}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise TrackingError(
            f"experiment {experiment_id}: no finished training run for partition '{partition}' (expected `transdnn train {partition}` first)"
        )
    return runs[0].info.run_id


def candidates(client: MlflowClient, run_ids: list[str], partition: str) -> list[Candidate]:
    """Replicates with a logged model, from one or more training runs of the partition (one per training set)."""
    out = [c for run_id in run_ids for c in _run_candidates(client, run_id, partition)]
    if not out:
        raise TrackingError(
            f"runs {', '.join(run_ids)}: no replicate with a logged model and trained weights (a finite validation loss) "
            "in its chosen checkpoint (expected a completed training that did not diverge)"
        )
    return out


def _run_candidates(client: MlflowClient, run_id: str, partition: str) -> list[Candidate]:
    parent = training_run(client, run_id)
    tags = parent.data.tags
    if tags.get(ROLE_TAG) != PARENT_ROLE:
        raise TrackingError(
            f"run {run_id}: not a training run (tag {ROLE_TAG} is {tags.get(ROLE_TAG)!r}; "
            f"expected the id of a `transdnn train {partition}` run)"
        )
    if tags.get("partition") != partition:
        raise TrackingError(f"run {run_id}: a training of partition {tags.get('partition')!r} (expected one of '{partition}')")
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    return sorted((c for c in map(_candidate, kids) if c is not None and c.trained), key=lambda c: c.replicate)


def _candidate(run: Run) -> Candidate | None:
    """A replicate's run as a candidate, with its exact metrics; None before it logged a model."""
    tags, metrics = run.data.tags, run.data.metrics
    if "model_uri" not in tags or "chosen_homology_rank" not in metrics:
        return None
    return Candidate(
        run_id=run.info.run_id,
        replicate=int(tags["replicate"]),
        model_uri=tags["model_uri"],
        rank=metrics["chosen_homology_rank"],
        valid_loss=metrics["best_valid_loss"],
        dataset=tags.get("dataset", ""),
        parent_run_id=tags.get("mlflow.parentRunId", ""),
    )


def _version_candidate(client: MlflowClient, version: Any) -> Candidate | None:
    """The replicate a registered version came from, read from its run: the version's tags are rounded
    for people, and comparing rounded figures can let a worse replicate replace a better one."""
    try:
        return _candidate(retry(lambda: client.get_run(version.run_id)))
    except MlflowException:
        return None


def _ranked_on(client: MlflowClient, cand: Candidate) -> tuple[str, ...] | None:
    """What a replicate's homology rank is of: the digests of the files it came from and the checkpoint
    kind that was ranked (a best-rank checkpoint was chosen by that very rank); None where its training
    run is gone or recorded none."""
    try:
        parent = retry(lambda: client.get_run(cand.parent_run_id))
    except MlflowException:
        return None
    digests = input_digests(parent)
    found = (*(digests.get(name, "") for name in RANKED_ON), parent.data.params.get(CHECKPOINT_PARAM, ""))
    return found if all(found) else None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        retry(lambda: client.get_registered_model(name))
    except MlflowException:
        try:
            retry(
                lambda: client.create_registered_model(
                    name, description="transdnn detached model; alias 'champion' is the one to use"
                )
            )
        except MlflowException:
            retry(lambda: client.get_registered_model(name))  # created meanwhile by a concurrent promote


def _version_for(client: MlflowClient, name: str, cand: Candidate, partition: str) -> str:
    """Register a replicate once, race-free: versions are found by their run id, and if two concurrent
    promotes both created one, both keep the lowest version and delete the other."""

    def existing() -> list[Any]:
        return retry(lambda: client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'"))

    tags = {
        "source_run_id": cand.run_id,
        "partition": partition,
        "replicate": str(cand.replicate),
        "dataset": cand.dataset,
        "chosen_homology_rank": f"{cand.rank:.4f}",
        "best_valid_loss": f"{cand.valid_loss:.4f}",
    }
    found = existing()
    if not found:  # created with its tags: one store call, not one per tag (a first promotion of 1,000)
        model_id = cand.model_uri.removeprefix("models:/")  # a LoggedModel id: servers require it with the source
        retry(lambda: client.create_model_version(name, cand.model_uri, run_id=cand.run_id, tags=tags, model_id=model_id))
        found = existing()
    keep, *extra = sorted(found, key=lambda v: int(v.version))
    for dup in extra:
        with contextlib.suppress(MlflowException):  # the other promote may have deleted it first
            client.delete_model_version(name, dup.version)
    if any(keep.tags.get(k) != v for k, v in tags.items()):
        for k, v in tags.items():
            retry(functools.partial(client.set_model_version_tag, name, keep.version, k, v))
    return keep.version


def _current(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promotion_reason(criterion: str, replicates: int, run_ids: list[str]) -> str:
    """Why a version is champion, in one line: a job over the published 100 data sets has 100 training
    runs, whose ids would make it 3,400 characters (each version keeps its own run id)."""
    runs = f"run(s) {', '.join(run_ids)}" if len(run_ids) <= MAX_RUNS_NAMED else f"{len(run_ids)} training runs"
    return f"lowest {criterion} among {replicates} replicate{'s' * (replicates != 1)} of {runs}"


@answered
def promote(
    partition: str, experiment_id: str, criterion: str, run_ids: list[str] | None = None, require_better: bool = False
) -> Promotion:
    """Register the replicates of `run_ids` (default: the latest training) and move `champion` to the best.
    Promotions into one local store take turns (`store_lock`), so each compares with the champion the
    last one left; trainings starting meanwhile do not wait for them."""
    client = MlflowClient()
    run_ids = run_ids or [latest_training(client, experiment_id, partition)]
    cands = candidates(client, run_ids, partition)
    with store_lock("promote.lock"):
        return _register_and_move(client, partition, criterion, run_ids, cands, require_better)


def _register_and_move(
    client: MlflowClient, partition: str, criterion: str, run_ids: list[str], cands: list[Candidate], require_better: bool
) -> Promotion:
    best = min(cands, key=lambda c: c.key(criterion))
    name = model_name(partition)
    _ensure_registered_model(client, name)
    versions = {c.run_id: _version_for(client, name, c, partition) for c in cands}
    version = versions[best.run_id]
    current = _current(client, name, CHAMPION)
    if current is not None and current.version == version:
        return Promotion(version, best, version, best, False, "already champion")
    reason = promotion_reason(criterion, len(cands), run_ids)
    if current is not None and require_better:
        held = _version_candidate(client, current)
        ranked_on = _ranked_on(client, held) if held is not None else None
        if held is None or ranked_on is None:
            reason += f"; champion v{current.version} has no training run to compare with"
        elif not held.trained:
            reason += f"; champion v{current.version} holds no trained weights (it diverged)"
        elif ranked_on != _ranked_on(client, best):
            reason += f"; champion v{current.version} was ranked on other transform sets, genes or homology, or is another checkpoint kind"
        elif best.key(criterion) >= held.key(criterion):
            return Promotion(
                current.version,
                held,
                version,
                best,
                False,
                f"candidate v{version} ({best.figures()}) does not beat it by {criterion}",
            )
        else:
            reason += f"; beats champion v{current.version} ({held.figures()})"
    retry(lambda: client.set_model_version_tag(name, version, "promotion_reason", reason))
    if current is not None:
        retry(lambda: client.set_registered_model_alias(name, PREVIOUS, current.version))
    retry(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    return Promotion(version, best, version, best, True, reason)


@answered
def show(partitions: list[str]) -> list[dict[str, Any]]:
    """Per partition and alias: version, run, data set, replicate, exact metrics (None where the version's
    run is gone), why it was promoted and URI; no rows before the store exists."""
    client = reader()
    rows: list[dict[str, Any]] = []
    if client is None:
        return rows
    for partition in partitions:
        name = model_name(partition)
        for alias in (CHAMPION, PREVIOUS):
            mv = _current(client, name, alias)
            if mv is None:
                continue
            cand = _version_candidate(client, mv)
            rows.append(
                {
                    "partition": partition,
                    "alias": alias,
                    **describe(mv.version, cand, mv.tags.get("dataset")),
                    "run_id": mv.run_id,
                    "promotion_reason": mv.tags.get("promotion_reason"),
                    "uri": f"models:/{name}@{alias}",
                }
            )
    return rows
