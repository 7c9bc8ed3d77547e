"""Training the approval net: validate the data, split, fit (resumable), calibrate, evaluate.

One labelled row is one logged outcome: the inputs of an (attempt, route) pair, which output column the
outcome belongs to (0: this attempt on this route, ``1 + b``: a retry after delay bucket ``b``) and
whether it was approved. The loss is binary cross-entropy on that column only. After training, the best
epoch (by validation loss) is kept and a per-column Platt calibration is fitted on the validation split
and stored in the net, so the exported artifact serves calibrated probabilities.

`fit` is deterministic for a given seed (same machine, same torch thread count): the split, the
initialization and the shuffling are all seeded. With a ``checkpoint_dir`` it writes a checkpoint after
every epoch and a later call with the same arguments resumes after the last completed epoch; an
interrupted-then-resumed run ends with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from model.errors import ModelError
from model.net import ApprovalNet, EnsembleNet

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "FitResult",
    "TrainingDataError",
    "TrainingSet",
    "expected_calibration_error",
    "fit",
    "reliability_bins",
    "roc_auc",
]

CHECKPOINT_FILE = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1
_MIN_CALIBRATION_ROWS = 50  # fewer validation rows in a column: its calibration stays the identity
_PLATT_RIDGE = 1e-4  # pulls (scale, bias) toward (1, 0): finite even on a separable column
_EVAL_CHUNK = 65_536


class TrainingDataError(ModelError, ValueError):
    """The training set cannot train a model; the message says what is wrong and what to do."""


class CheckpointError(ModelError, ValueError):
    """A checkpoint cannot be resumed: unreadable, or written by a run with different arguments."""


@dataclass
class TrainingSet:
    """Labelled rows: inputs `x` float32 ``[N, D]``, output `column` int64 ``[N]``, label `y` 0/1 ``[N]``."""

    x: npt.NDArray[np.float32]
    column: npt.NDArray[np.int64]
    y: npt.NDArray[np.float32]

    def validate(self, n_outputs: int) -> None:
        """Raise `TrainingDataError` unless these rows can train a net with `n_outputs` columns."""
        x, column, y = self.x, self.column, self.y
        if x.ndim != 2 or column.ndim != 1 or y.ndim != 1:
            raise TrainingDataError(
                f"x must be [N, D], column and y [N]; got shapes x {x.shape}, column {column.shape}, "
                f"y {y.shape}"
            )
        n = x.shape[0]
        if n == 0:
            raise TrainingDataError(
                "the training log produced no rows: there is nothing to fit "
                "(check the log's time range and filters)"
            )
        if column.shape[0] != n or y.shape[0] != n or x.shape[1] == 0:
            raise TrainingDataError(
                f"shape mismatch: x has {n} rows of {x.shape[1]} inputs, column {column.shape[0]} rows "
                f"and y {y.shape[0]}; every row needs inputs, an output column and a label"
            )
        if x.dtype != np.float32:
            raise TrainingDataError(f"x must be float32 (the served dtype), got {x.dtype}")
        if not np.issubdtype(column.dtype, np.integer):
            raise TrainingDataError(f"column must hold integers, got {column.dtype}")
        _check_finite(x)
        _check_labels(y)
        _check_columns(column, n_outputs)
        _check_route_head(column, y)


def _check_finite(x: npt.NDArray[np.float32]) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(v[0]) for v in np.nonzero(~finite))
        raise TrainingDataError(
            f"x holds {int((~finite).sum())} non-finite values (NaN or ±inf), the first at row {row}, "
            f"input {col}: they would turn every loss into NaN; fix the encoding or drop those rows"
        )


def _check_labels(y: npt.NDArray[Any]) -> None:
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        row = int(np.argmax(bad))
        raise TrainingDataError(
            f"labels y must be 0 (declined) or 1 (approved); {int(bad.sum())} rows are not, "
            f"e.g. row {row} = {y[row]!r}"
        )


def _check_columns(column: npt.NDArray[Any], n_outputs: int) -> None:
    bad = (column < 0) | (column >= n_outputs)
    if bad.any():
        row = int(np.argmax(bad))
        raise TrainingDataError(
            f"output column out of range: the model has {n_outputs} outputs (0 = route head, "
            f"1..{n_outputs - 1} = retry delay buckets) but {int(bad.sum())} rows name another, "
            f"e.g. row {row} = {int(column[row])}"
        )


def _check_route_head(column: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
    route = y[column == 0]
    if route.size == 0:
        raise TrainingDataError(
            f"none of the {column.size} rows is a route-head row (column 0): P(approve) of an attempt "
            "on a route would be untrained; the log must include first attempts, not only retries"
        )
    approved = int(route.sum())
    if approved in (0, route.size):
        outcome = "approved" if approved else "declined"
        raise TrainingDataError(
            f"all {route.size} route-head rows are {outcome}: a model cannot learn P(approve) from one "
            "class; log with a policy that sees both outcomes (explores routes, includes declines) "
            "or widen the log's time range"
        )


@dataclass(frozen=True)
class FitResult:
    """A trained net (eval mode, normalization and calibration set), its metrics and per-epoch history."""

    net: ApprovalNet | EnsembleNet
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Data:
    x: torch.Tensor
    column: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class _State:
    """Everything a checkpoint restores: training continues exactly where it stopped."""

    net: ApprovalNet
    opt: torch.optim.Adam
    gen: torch.Generator
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "config": config,
            "epoch": self.epoch,
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "generator": self.gen.get_state(),
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best": self.best,
            "history": self.history,
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.gen.set_state(ckpt["generator"])
        self.epoch = int(ckpt["epoch"])
        self.best_loss = float(ckpt["best_loss"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.best = dict(ckpt["best"])
        self.history = [dict(h) for h in ckpt["history"]]


def fit(
    data: TrainingSet,
    *,
    n_buckets: int,
    seed: int = 0,
    epochs: int = 8,
    hidden: int = 64,
    batch_size: int = 2048,
    lr: float = 3e-3,
    val_fraction: float = 0.15,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    categorical_groups: Sequence[Sequence[int]] = (),
    threads: int = 1,
    split_seed: int | None = None,
    holdout: Literal["random", "newest"] = "random",
) -> FitResult:
    """Train an `ApprovalNet` on `data`; keep the best epoch by validation loss; calibrate; evaluate.

    Raises `TrainingDataError` for data that cannot train a model and `CheckpointError` for a
    checkpoint in `checkpoint_dir` written with different arguments or data (`epochs` may grow: a
    finished run continues). The validation metrics are measured on the split the calibration was
    fitted on (two parameters per column, so only slightly optimistic).

    `threads` is torch's intra-op thread count during the fit (restored after). One thread is about as
    fast as two for this small net, many times faster when other processes share the cores (idle
    threads spin), and keeps the weights independent of the machine's core count; it is part of the
    checkpoint's identity because results are bit-identical only for the same thread count.

    `holdout`: "random" validates on a random `val_fraction` of the rows; "newest" on the last
    `val_fraction` of them (rows in time order: a time-based split, what a log's training uses).
    """
    if (
        epochs < 1
        or batch_size < 1
        or threads < 1
        or not (math.isfinite(lr) and lr > 0)
        or not 0 < val_fraction < 1
        or holdout not in ("random", "newest")
    ):
        raise ValueError(
            f"bad training arguments: epochs={epochs} batch_size={batch_size} lr={lr} "
            f"val_fraction={val_fraction} threads={threads} holdout={holdout!r} "
            "(need epochs, batch_size, threads >= 1, lr > 0, 0 < val_fraction < 1, "
            "holdout random or newest)"
        )
    n_outputs = 1 + n_buckets
    data.validate(n_outputs)
    split_seed = seed if split_seed is None else split_seed
    train, val = _split(data, val_fraction, split_seed, holdout)
    groups = [[int(i) for i in g] for g in categorical_groups]
    config: dict[str, Any] = {
        "n_rows": len(data.y),
        "n_inputs": int(data.x.shape[1]),
        "n_buckets": n_buckets,
        "seed": seed,
        **({} if split_seed == seed else {"split_seed": split_seed}),
        "hidden": hidden,
        "batch_size": batch_size,
        "lr": lr,
        "val_fraction": val_fraction,
        **({} if holdout == "random" else {"holdout": holdout}),
        "categorical_groups": groups,
        "threads": threads,
        "data_digest": _digest(data),
    }
    with _reproducible(threads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ApprovalNet(config["n_inputs"], n_buckets, hidden, categorical_groups=groups)
        x_train = train.x.numpy()
        net.set_normalization(
            torch.from_numpy(x_train.mean(axis=0, dtype=np.float64)),
            torch.from_numpy(x_train.std(axis=0, dtype=np.float64)),
        )
        state = _State(net, torch.optim.Adam(net.parameters(), lr=lr), torch.Generator().manual_seed(seed))
        path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
        if path is not None and path.exists():
            _resume(state, path, config, epochs)
        _train(
            state, train, val, epochs=epochs, batch_size=batch_size, path=path, config=config, show=progress
        )
        net.load_state_dict(state.best)
        net.eval()
        metrics = _calibrate_and_evaluate(net, val, n_outputs)
    metrics.update(
        train_rows=float(len(train)),
        val_rows=float(len(val)),
        epochs=float(state.epoch),
        best_epoch=float(state.best_epoch),
        val_loss=state.best_loss,
    )
    return FitResult(net=net, metrics=metrics, history=state.history)


def fit_ensemble(
    data: TrainingSet,
    *,
    members: int,
    seed: int = 0,
    val_fraction: float = 0.15,
    checkpoint_dir: Path | None = None,
    threads: int = 1,
    holdout: Literal["random", "newest"] = "random",
    **kwargs: Any,
) -> FitResult:
    """`members` nets fitted like `fit` (seeds seed, seed + 1, ...) on one train/validation split,
    averaged into an `EnsembleNet` and Platt-calibrated on that validation split.

    Each member checkpoints under ``checkpoint_dir/member-<k>`` (so an interrupted run resumes);
    with ``members == 1`` this is `fit`. Metrics are the ensemble's, plus each member's validation
    loss as ``member_<k>_val_loss``.
    """
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if members == 1:
        return fit(
            data,
            seed=seed,
            val_fraction=val_fraction,
            checkpoint_dir=checkpoint_dir,
            threads=threads,
            holdout=holdout,
            **kwargs,
        )
    results = [
        fit(
            data,
            seed=seed + k,
            split_seed=seed,
            val_fraction=val_fraction,
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"member-{k}",
            threads=threads,
            holdout=holdout,
            **kwargs,
        )
        for k in range(members)
    ]
    ensemble = EnsembleNet([cast(ApprovalNet, r.net) for r in results]).eval()  # `fit` makes ApprovalNets
    _, val = _split(data, val_fraction, seed, holdout)
    with _reproducible(threads):
        metrics = _calibrate_and_evaluate(ensemble, val, 1 + ensemble.n_buckets)
    first = results[0].metrics
    metrics.update({k: first[k] for k in ("train_rows", "val_rows", "epochs") if k in first})
    metrics["members"] = float(members)
    for k, r in enumerate(results):
        metrics[f"member_{k}_val_loss"] = r.metrics["val_loss"]
    metrics["val_loss"] = _mean_loss(ensemble, val)
    return FitResult(net=ensemble, metrics=metrics, history=results[0].history)


@contextmanager
def _reproducible(threads: int) -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _split(data: TrainingSet, val_fraction: float, seed: int, holdout: str = "random") -> tuple[_Data, _Data]:
    n = len(data.y)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise TrainingDataError(f"only {n} rows: need at least 2 to hold out a validation split")
    if holdout == "newest":  # the last rows validate: order puts them first
        order = np.concatenate([np.arange(n - n_val, n), np.arange(n - n_val)])
    else:
        order = np.random.default_rng(seed).permutation(n)
    column = data.column.astype(np.int64, copy=False)
    y = data.y.astype(np.float32, copy=False)

    def take(rows: npt.NDArray[np.int64]) -> _Data:
        i = np.sort(rows)  # in row order: the per-batch gathers then walk memory forward
        return _Data(torch.from_numpy(data.x[i]), torch.from_numpy(column[i]), torch.from_numpy(y[i]))

    return take(order[n_val:]), take(order[:n_val])


def _digest(data: TrainingSet) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in (data.x, data.column.astype(np.int64, copy=False), data.y.astype(np.float32, copy=False)):
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _resume(state: _State, path: Path, config: dict[str, Any], epochs: int) -> None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file; all mean "cannot resume"
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a format-{_CHECKPOINT_FORMAT} training checkpoint")
    old = ckpt["config"]
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {v!r}" for k, v in config.items() if old.get(k) != v]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with different arguments or data "
            f"({'; '.join(diff)}); use another checkpoint_dir, or delete it to start over"
        )
    if int(ckpt["epoch"]) > epochs:
        raise CheckpointError(
            f"checkpoint {path} has already completed {ckpt['epoch']} epochs, more than epochs={epochs}"
        )
    state.restore(ckpt)


def _save(state: _State, path: Path, config: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(state.checkpoint(config), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


class _RowsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = (task.finished_time if task.finished else task.elapsed) or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} rows/s", style="progress.data.speed")


def _train(
    state: _State,
    train: _Data,
    val: _Data,
    *,
    epochs: int,
    batch_size: int,
    path: Path | None,
    config: dict[str, Any],
    show: bool,
) -> None:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RowsPerSecond(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        console=Console(stderr=True),
        disable=not show,
    )
    with bar:
        while state.epoch < epochs:
            task = bar.add_task(f"epoch {state.epoch + 1}/{epochs}", total=len(train), loss=math.nan)
            started = time.perf_counter()
            train_loss = _train_epoch(state, train, batch_size, bar, task)
            seconds = time.perf_counter() - started
            val_loss = _mean_loss(state.net, val)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise FloatingPointError(
                    f"training diverged in epoch {state.epoch + 1} (train loss {train_loss}, "
                    f"validation loss {val_loss}); lower lr"
                )
            state.epoch += 1
            if val_loss < state.best_loss:
                state.best_loss, state.best_epoch = val_loss, state.epoch
                state.best = {k: v.detach().clone() for k, v in state.net.state_dict().items()}
            state.history.append(
                {
                    "epoch": float(state.epoch),
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "seconds": seconds,
                    "rows_per_s": len(train) / seconds if seconds > 0 else 0.0,
                }
            )
            bar.update(task, description=f"epoch {state.epoch}/{epochs} val {val_loss:.4f}")
            if path is not None:
                _save(state, path, config)


def _train_epoch(state: _State, train: _Data, batch_size: int, bar: Progress, task: TaskID) -> float:
    net, opt = state.net, state.opt
    net.train()
    order = torch.randperm(len(train), generator=state.gen)
    total = 0.0
    for start in range(0, len(train), batch_size):
        idx = order[start : start + batch_size]
        z = net.logits(train.x.index_select(0, idx)).gather(1, train.column[idx].unsqueeze(1)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(z, train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        batch_loss = float(loss.detach())
        total += batch_loss * len(idx)
        bar.update(task, advance=len(idx), loss=total / (start + len(idx)))
    return total / len(train)


def _val_logits(net: ApprovalNet | EnsembleNet, data: _Data) -> torch.Tensor:
    """Uncalibrated logit of each row's own column, ``[N]``."""
    net.eval()
    with torch.no_grad():
        parts = [
            net.logits(data.x[i : i + _EVAL_CHUNK]).gather(1, data.column[i : i + _EVAL_CHUNK].unsqueeze(1))
            for i in range(0, len(data), _EVAL_CHUNK)
        ]
    return torch.cat(parts).squeeze(1)


def _mean_loss(net: ApprovalNet | EnsembleNet, data: _Data) -> float:
    z = _val_logits(net, data)
    return float(F.binary_cross_entropy_with_logits(z.double(), data.y.double()))


def _fit_platt(
    z: torch.Tensor, column: torch.Tensor, y: torch.Tensor, n_outputs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (scale, bias) minimizing the mean NLL of each column; identity for sparse columns."""
    counts = torch.bincount(column, minlength=n_outputs)
    fitted = counts >= _MIN_CALIBRATION_ROWS
    keep = fitted[column]
    z, column, y = z[keep].double(), column[keep], y[keep].double()
    weight = 1.0 / counts[column].double()
    scale = torch.ones(n_outputs, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_outputs, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [scale, bias],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = F.binary_cross_entropy_with_logits(z * scale[column] + bias[column], y, reduction="none")
        loss = (nll * weight).sum() + _PLATT_RIDGE * (((scale - 1) ** 2).sum() + (bias**2).sum())
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    if bool(keep.any()):
        opt.step(closure)  # type: ignore[no-untyped-call]
    a, b = scale.detach(), bias.detach()
    ok = fitted & torch.isfinite(a) & torch.isfinite(b)
    return torch.where(ok, a, 1.0), torch.where(ok, b, 0.0)


def calibrate(net: ApprovalNet | EnsembleNet, data: TrainingSet) -> dict[str, float]:
    """Refit the net's Platt calibration on `data` (e.g. held-out rows of the traffic it will serve);
    returns ECE (and AUC) on those rows after and before, as `val_*` metrics."""
    data.validate(1 + net.n_buckets)
    rows = _Data(
        torch.from_numpy(data.x),
        torch.from_numpy(data.column.astype(np.int64, copy=False)),
        torch.from_numpy(data.y.astype(np.float32, copy=False)),
    )
    net.eval()
    return _calibrate_and_evaluate(net, rows, 1 + net.n_buckets)


def _calibrate_and_evaluate(net: ApprovalNet | EnsembleNet, val: _Data, n_outputs: int) -> dict[str, float]:
    z = _val_logits(net, val)
    scale, bias = _fit_platt(z, val.column, val.y, n_outputs)
    net.set_calibration(scale, bias)
    z64 = z.double()
    p_raw = torch.sigmoid(z64).numpy()
    p_cal = torch.sigmoid(z64 * scale[val.column] + bias[val.column]).numpy()
    y, column = val.y.numpy(), val.column.numpy()
    route, retry = column == 0, column > 0
    metrics: dict[str, float] = {}
    if route.any():
        metrics["val_ece_route"] = expected_calibration_error(p_cal[route], y[route])
        metrics["val_ece_route_uncalibrated"] = expected_calibration_error(p_raw[route], y[route])
        if 0 < y[route].sum() < route.sum():
            metrics["val_auc_route"] = roc_auc(p_cal[route], y[route])
    if retry.any():
        metrics["val_ece_retry"] = expected_calibration_error(p_cal[retry], y[retry])
    return metrics


def _bins(p: npt.ArrayLike, y: npt.ArrayLike, n_bins: int) -> tuple[Any, Any, Any]:
    pa, ya = np.asarray(p, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if pa.size == 0 or pa.shape != ya.shape:
        raise ValueError(f"need equally many (>0) probabilities and labels, got {pa.size} and {ya.size}")
    if n_bins < 1 or not bool(((pa >= 0) & (pa <= 1)).all()):
        raise ValueError("probabilities must lie in [0, 1] and n_bins must be >= 1")
    idx = np.minimum((pa * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    return (
        count,
        np.bincount(idx, weights=pa, minlength=n_bins),
        np.bincount(idx, weights=ya, minlength=n_bins),
    )


def expected_calibration_error(p: npt.ArrayLike, y: npt.ArrayLike, n_bins: int = 15) -> float:
    """ECE: over equal-width bins of `p` on [0, 1], ``sum(count / N * |mean(p) - mean(y)|)``."""
    count, p_sum, y_sum = _bins(p, y, n_bins)
    return float(np.abs(p_sum - y_sum).sum() / count.sum())


def reliability_bins(p: npt.ArrayLike, y: npt.ArrayLike, n_bins: int = 15) -> list[tuple[float, float, int]]:
    """Per non-empty equal-width bin: (mean predicted probability, observed rate, row count)."""
    count, p_sum, y_sum = _bins(p, y, n_bins)
    return [(float(p_sum[i] / c), float(y_sum[i] / c), int(c)) for i, c in enumerate(count) if c > 0]


def roc_auc(p: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); `y` must hold both classes."""
    pa, ya = np.asarray(p, dtype=np.float64).reshape(-1), np.asarray(y).reshape(-1) > 0.5
    n_pos = int(ya.sum())
    n_neg = ya.size - n_pos
    if pa.shape != ya.shape or n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs equally many scores and labels, with both classes present")
    _, inverse, counts = np.unique(pa, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = float(avg_rank[inverse][ya].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
