"""Training: signal recovery, calibration, determinism, resumable checkpoints, data validation, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model.train as train_mod
from model import DELAY_BUCKETS_S, INPUT_LAYOUT, ApprovalNet, export_model, quiet_torchscript_deprecation
from model.export import MODEL_FILE
from model.net import EnsembleNet, FusedEnsembleNet, layout_categorical_groups
from model.train import (
    CheckpointError,
    TrainingDataError,
    TrainingSet,
    expected_calibration_error,
    fit,
    reliability_bins,
    roc_auc,
)

D, B = 6, 2


def _synthetic(
    n: int, seed: int, *, d: int = D, n_buckets: int = B, groups: list[list[int]] | None = None
) -> TrainingSet:
    """Rows from a known logistic model (fixed weights); ~60% route-head rows, the rest retries.

    The columns of each of `groups` hold a one-hot category (or all 0: none) instead of a normal value.
    """
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1234).normal(size=(d, 1 + n_buckets))
    x = rng.normal(size=(n, d)).astype(np.float32)
    for g in groups or []:
        x[:, g] = 0
        k = rng.integers(0, len(g) + 1, size=n)
        hot = k < len(g)
        x[np.nonzero(hot)[0], np.asarray(g)[k[hot]]] = 1
    column = np.where(rng.random(n) < 0.6, 0, rng.integers(1, 1 + n_buckets, size=n)).astype(np.int64)
    logit = (x @ w)[np.arange(n), column] - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return TrainingSet(x=x, column=column, y=y)


def _fit(data: TrainingSet, **kw: Any) -> train_mod.FitResult:
    args: dict[str, Any] = {"n_buckets": B, "epochs": 3, "hidden": 16, "batch_size": 256, "progress": False}
    args.update(kw)
    return fit(data, **args)


def _same_weights(a: ApprovalNet, b: ApprovalNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _own_column(net: ApprovalNet, data: TrainingSet) -> np.ndarray:
    """Each row's predicted probability for its own labelled column (calibrated, as served)."""
    with torch.no_grad():
        p: np.ndarray = net(torch.from_numpy(data.x)).numpy()
    return np.asarray(p[np.arange(len(data.y)), data.column])


def _load(path: Path) -> torch.jit.ScriptModule:
    quiet_torchscript_deprecation()
    module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module


def test_fit_recovers_the_signal_and_calibration_holds_on_held_out_rows() -> None:
    threads_before = torch.get_num_threads()
    result = _fit(_synthetic(20_000, seed=0), epochs=6, batch_size=512)
    test = _synthetic(20_000, seed=1)
    p = _own_column(result.net, test)
    route = test.column == 0
    assert roc_auc(p[route], test.y[route]) > 0.8
    assert expected_calibration_error(p[route], test.y[route]) < 0.03
    assert expected_calibration_error(p[~route], test.y[~route]) < 0.03
    m = result.metrics
    assert m["val_auc_route"] > 0.8 and m["val_ece_route"] < 0.05 and m["val_ece_retry"] < 0.05
    assert {"val_loss", "val_ece_route_uncalibrated", "train_rows", "val_rows", "epochs"} <= m.keys()
    assert (m["train_rows"], m["val_rows"], m["epochs"]) == (17_000, 3_000, 6)
    assert all(np.isfinite(v) for v in m.values())
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert m["val_loss"] == min(h["val_loss"] for h in result.history)
    assert not result.net.training
    assert not torch.are_deterministic_algorithms_enabled()  # restored after fit
    assert torch.get_num_threads() == threads_before


def test_calibration_fixes_a_miscalibrated_net() -> None:
    """Platt scaling on the validation split undoes a deliberate distortion of the logits."""
    data = _synthetic(6_000, seed=2)
    result = _fit(data, epochs=4)
    net = result.net
    with torch.no_grad():
        net.route_head.weight.mul_(3.0)
        net.route_head.bias.add_(1.0)
    z = net.logits(torch.from_numpy(data.x)).detach()[:, 0].double()
    scale, bias = train_mod._fit_platt(z, torch.from_numpy(data.column), torch.from_numpy(data.y), 1 + B)
    route = data.column == 0
    raw = torch.sigmoid(z).numpy()[route]
    calibrated = torch.sigmoid(z * scale[0] + bias[0]).numpy()[route]
    assert expected_calibration_error(calibrated, data.y[route]) < 0.5 * expected_calibration_error(
        raw, data.y[route]
    )
    assert 0.2 < float(scale[0]) < 0.5


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    data = _synthetic(3_000, seed=3)
    a, b, c = _fit(data, seed=5), _fit(data, seed=5), _fit(data, seed=6)
    assert _same_weights(a.net, b.net)
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    assert not _same_weights(a.net, c.net)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    data = _synthetic(3_000, seed=4)
    whole = _fit(data, epochs=4)
    first = _fit(data, epochs=2, checkpoint_dir=tmp_path)
    assert len(first.history) == 2 and (tmp_path / train_mod.CHECKPOINT_FILE).exists()
    resumed = _fit(data, epochs=4, checkpoint_dir=tmp_path)
    assert _same_weights(whole.net, resumed.net)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    assert resumed.metrics["epochs"] == 4
    again = _fit(data, epochs=4, checkpoint_dir=tmp_path)  # complete: nothing left to train
    assert _same_weights(whole.net, again.net)
    assert not [p for p in tmp_path.iterdir() if p.name != train_mod.CHECKPOINT_FILE]  # no temp files


def test_run_killed_mid_epoch_resumes_to_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _synthetic(3_000, seed=4)
    whole = _fit(data, epochs=4)
    real = train_mod._train_epoch
    calls = []

    def dies_in_epoch_3(*args: Any) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _fit(data, epochs=4, checkpoint_dir=tmp_path)
    monkeypatch.setattr(train_mod, "_train_epoch", real)
    resumed = _fit(data, epochs=4, checkpoint_dir=tmp_path)
    assert _same_weights(whole.net, resumed.net)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    data = _synthetic(2_000, seed=5)
    _fit(data, epochs=2, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0, now 1"):
        _fit(data, epochs=2, seed=1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"threads: checkpoint 1, now 2"):
        _fit(data, epochs=2, threads=2, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"hidden: checkpoint 16, now 8"):
        _fit(data, epochs=2, hidden=8, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="data_digest"):
        _fit(_synthetic(2_000, seed=6), epochs=2, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="already completed 2 epochs, more than epochs=1"):
        _fit(data, epochs=1, checkpoint_dir=tmp_path)
    (tmp_path / train_mod.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        _fit(data, epochs=2, checkpoint_dir=tmp_path)


def _route_only(y: list[float]) -> TrainingSet:
    n = len(y)
    return TrainingSet(np.zeros((n, D), np.float32), np.zeros(n, np.int64), np.asarray(y, np.float32))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _route_only([]), "the training log produced no rows"),
        (lambda: _route_only([1.0] * 10), "all 10 route-head rows are approved: a model cannot learn"),
        (lambda: _route_only([0.0] * 7), "all 7 route-head rows are declined"),
        (lambda: _route_only([0.0, 1.0, 0.5]), r"labels y must be 0 \(declined\) or 1 \(approved\)"),
        (
            lambda: TrainingSet(np.zeros((3, D), np.float32), np.zeros(2, np.int64), np.zeros(3, np.float32)),
            "shape mismatch",
        ),
        (
            lambda: TrainingSet(
                np.zeros((2, D), np.float64), np.zeros(2, np.int64), np.array([0, 1], np.float32)
            ),
            "x must be float32",
        ),
        (
            lambda: TrainingSet(
                np.array([[0.0] * D, [np.nan] + [0.0] * (D - 1)], np.float32),
                np.zeros(2, np.int64),
                np.array([0, 1], np.float32),
            ),
            "non-finite values .* row 1, input 0",
        ),
        (
            lambda: TrainingSet(
                np.zeros((3, D), np.float32), np.array([0, 0, 3]), np.array([0, 1, 1], np.float32)
            ),
            r"output column out of range: the model has 3 outputs .* row 2 = 3",
        ),
        (
            lambda: TrainingSet(np.zeros((2, D), np.float32), np.array([1, 2]), np.array([0, 1], np.float32)),
            "none of the 2 rows is a route-head row",
        ),
    ],
)
def test_bad_training_data_is_explained(make: Any, message: str) -> None:
    data: TrainingSet = make()
    with pytest.raises(TrainingDataError, match=message):
        data.validate(1 + B)
    with pytest.raises(TrainingDataError, match=message):  # fit refuses before any NaN can appear
        _fit(data)


def test_calibration_survives_export_and_reload(tmp_path: Path) -> None:
    data = _synthetic(3_000, seed=7, d=len(INPUT_LAYOUT), n_buckets=len(DELAY_BUCKETS_S))
    net = _fit(data, n_buckets=len(DELAY_BUCKETS_S), epochs=1).net
    assert not torch.equal(net.cal_scale, torch.ones_like(net.cal_scale))  # a fitted, non-trivial calibration
    path = export_model(net, tmp_path, "1")
    x = torch.from_numpy(data.x[:256])
    with torch.no_grad():
        eager, uncalibrated = net(x), torch.sigmoid(net.logits(x))
    with torch.inference_mode():
        loaded = _load(path / MODEL_FILE)(x)
    torch.testing.assert_close(loaded, eager, atol=1e-5, rtol=0)
    assert float((loaded - uncalibrated).abs().max()) > 1e-3


def test_set_calibration_validates() -> None:
    net = ApprovalNet(3, 2, hidden=4)
    net.set_calibration([1.0, 2.0, 0.5], [0.0, -1.0, 0.25])
    assert net.cal_scale.tolist() == [1.0, 2.0, 0.5] and net.cal_bias.tolist() == [0.0, -1.0, 0.25]
    with pytest.raises(ValueError, match="needs 3 values"):
        net.set_calibration([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        net.set_calibration([1.0, float("nan"), 1.0], [0.0, 0.0, 0.0])


def test_layout_groups_are_the_one_hot_fields() -> None:
    groups = layout_categorical_groups(INPUT_LAYOUT)
    fields = {INPUT_LAYOUT[g[0]].rpartition(".")[0] for g in groups}
    assert fields == {
        "attempt.network",
        "attempt.funding",
        "attempt.channel",
        "attempt.initiator",
        "attempt.last_decline",
        "card_merchant.last_decline_class",
    }
    for g in groups:
        prefix = INPUT_LAYOUT[g[0]].rpartition(".")[0]
        assert g == [i for i, name in enumerate(INPUT_LAYOUT) if name.rpartition(".")[0] == prefix]
    assert "attempt.network_token" not in {INPUT_LAYOUT[i] for g in groups for i in g}
    with pytest.raises(ValueError, match="more than one categorical group"):
        ApprovalNet(4, 1, categorical_groups=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="outside"):
        ApprovalNet(4, 1, categorical_groups=[[3, 4]])


def test_embedding_net_scripts_exports_and_matches(tmp_path: Path) -> None:
    groups = layout_categorical_groups(INPUT_LAYOUT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ApprovalNet(
            len(INPUT_LAYOUT), len(DELAY_BUCKETS_S), hidden=16, categorical_groups=groups
        ).eval()
    net.set_calibration(
        torch.linspace(0.5, 1.5, 1 + len(DELAY_BUCKETS_S)), torch.linspace(-1, 1, 1 + len(DELAY_BUCKETS_S))
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, len(INPUT_LAYOUT), generator=gen)
    for k, g in enumerate(groups):  # row i: category i % (len+1) of each group, the last being "none"
        x[:, g] = 0
        for i in range(64):
            if (i + k) % (len(g) + 1) < len(g):
                x[i, g[(i + k) % (len(g) + 1)]] = 1
    path = export_model(net, tmp_path, "1")
    with torch.no_grad():
        eager = net(x)
    with torch.inference_mode():
        loaded = _load(path / MODEL_FILE)(x)
        scripted = torch.jit.script(net)(x)
    torch.testing.assert_close(scripted, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded, eager, atol=1e-5, rtol=0)
    # The group columns select an embedding row; their raw values are not normalized inputs.
    net.set_normalization(torch.full((len(INPUT_LAYOUT),), 5.0), torch.full((len(INPUT_LAYOUT),), 0.1))
    network = groups[0]
    a, b = x[:1].clone(), x[:1].clone()
    a[0, network], b[0, network] = 0, 0
    b[0, network[2]] = 1
    with torch.no_grad():
        assert not torch.equal(net(a), net(b))  # "none" and "amex" are different categories


def test_fit_with_embeddings_learns() -> None:
    d, groups = 8, [[2, 3, 4], [5, 6]]
    result = _fit(_synthetic(6_000, seed=8, d=d, groups=groups), categorical_groups=groups, epochs=4)
    assert result.net.embedding is not None
    test = _synthetic(10_000, seed=9, d=d, groups=groups)
    route = test.column == 0
    assert roc_auc(_own_column(result.net, test)[route], test.y[route]) > 0.8


def test_progress_goes_to_stderr_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    data = _synthetic(1_000, seed=10)
    _fit(data, epochs=1, progress=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    _fit(data, epochs=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" in err and "rows/s" in err


def test_ece_and_reliability_bins_on_hand_computed_cases() -> None:
    p, y = [0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]
    # bin [0.1, 0.2): mean p 0.1, rate 0.5, weight 1/2; bin [0.9, 1.0]: mean p 0.9, rate 1.0, weight 1/2
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert reliability_bins(p, y, n_bins=10) == [
        pytest.approx((0.1, 0.5, 2)),
        pytest.approx((0.9, 1.0, 2)),
    ]
    assert expected_calibration_error([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 0.0], [1, 0], n_bins=15) == 0.0  # p = 1 lands in the last bin
    assert expected_calibration_error([0.0, 1.0], [1, 0], n_bins=1) == pytest.approx(0.0)
    assert expected_calibration_error([0.0, 1.0], [1, 0], n_bins=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equally many"):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])


def test_roc_auc_on_hand_computed_cases() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # ties count half
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.2, 0.3], [1, 1])


def test_an_ensemble_averages_its_members_and_beats_their_mean_loss(tmp_path: Path) -> None:
    data = _synthetic(4_000, seed=9, d=len(INPUT_LAYOUT), n_buckets=len(DELAY_BUCKETS_S))
    args: dict[str, Any] = {
        "n_buckets": len(DELAY_BUCKETS_S), "epochs": 2, "hidden": 16, "batch_size": 256, "progress": False
    }  # fmt: skip
    result = train_mod.fit_ensemble(data, members=3, seed=4, checkpoint_dir=tmp_path / "ckpt", **args)
    net = result.net
    assert isinstance(net, EnsembleNet) and len(net.members) == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["member-0", "member-1", "member-2"]
    # members differ (seeds 4, 5, 6) but share the split: each is `fit` with that seed and split
    alone = fit(data, seed=5, split_seed=4, **args).net
    assert isinstance(alone, ApprovalNet)
    member = net.members[1]
    assert isinstance(member, ApprovalNet) and _same_weights(member, alone)
    assert not _same_weights(net.members[0], member)  # type: ignore[arg-type]
    x = torch.from_numpy(data.x[:64])
    with torch.no_grad():
        mean = torch.stack([m.logits(x) for m in net.members]).mean(dim=0)  # type: ignore[operator]
        torch.testing.assert_close(net.logits(x), mean)
    # BCE is convex in the logit: the mean logit's loss is at most the members' mean loss
    losses = [result.metrics[f"member_{k}_val_loss"] for k in range(3)]
    assert result.metrics["val_loss"] <= sum(losses) / 3 + 1e-12
    assert result.metrics["members"] == 3 and 0 <= result.metrics["val_ece_route"] < 0.1
    # one TorchScript module, calibrated as trained
    path = export_model(net, tmp_path / "models", "ens")
    with torch.no_grad():
        eager = net(x)
    with torch.inference_mode():
        torch.testing.assert_close(_load(path / MODEL_FILE)(x), eager, atol=1e-5, rtol=0)
    # deterministic and resumable: the same call again reads the finished checkpoints
    again = train_mod.fit_ensemble(data, members=3, seed=4, checkpoint_dir=tmp_path / "ckpt", **args).net
    with torch.no_grad():
        torch.testing.assert_close(again(x), eager, atol=0, rtol=0)


def test_an_ensemble_of_one_is_a_plain_fit() -> None:
    data = _synthetic(1_000, seed=3)
    one = train_mod.fit_ensemble(data, members=1, n_buckets=B, epochs=1, hidden=8, progress=False).net
    assert isinstance(one, ApprovalNet)
    with pytest.raises(ValueError, match="members"):
        train_mod.fit_ensemble(data, members=0, n_buckets=B)


def _layout_net(seed: int, hidden: int = 16) -> ApprovalNet:
    torch.manual_seed(seed)
    groups = layout_categorical_groups(INPUT_LAYOUT)
    net = ApprovalNet(len(INPUT_LAYOUT), len(DELAY_BUCKETS_S), hidden, categorical_groups=groups)
    net.set_normalization(torch.full((len(INPUT_LAYOUT),), 0.3), torch.full((len(INPUT_LAYOUT),), 2.0))
    return net.eval()


def _layout_rows(n: int, seed: int) -> torch.Tensor:
    """Rows of the real layout: numbers, and each one-hot group hot in one column or (some) in none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(INPUT_LAYOUT), generator=g) * 3
    for cols in layout_categorical_groups(INPUT_LAYOUT):
        x[:, cols] = 0.0
        pick = torch.randint(0, len(cols) + 1, (n,), generator=g)  # len(cols): none hot
        for r in range(n):
            if pick[r] < len(cols):
                x[r, cols[int(pick[r])]] = 1.0
    return x


def test_an_ensemble_is_exported_fused_with_the_same_outputs(tmp_path: Path) -> None:
    net = EnsembleNet([_layout_net(s) for s in range(3)]).eval()
    net.set_calibration([1.3] + [0.9] * len(DELAY_BUCKETS_S), [-0.2] + [0.1] * len(DELAY_BUCKETS_S))
    fused = FusedEnsembleNet(net).eval()
    x = _layout_rows(200, seed=1)
    with torch.no_grad():
        eager = net(x)
        torch.testing.assert_close(fused(x), eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(fused(x[:1]), eager[:1], atol=1e-6, rtol=0)
    path = export_model(net, tmp_path, "fused")
    loaded = _load(path / MODEL_FILE)
    assert loaded.original_name == "FusedEnsembleNet"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), eager, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects input"):
        fused(x[:, :-1])
    # Members that do not share their inputs (another normalization) are exported one by one.
    other = _layout_net(7)
    other.set_normalization(torch.zeros(len(INPUT_LAYOUT)), torch.ones(len(INPUT_LAYOUT)))
    mixed = EnsembleNet([_layout_net(1), other]).eval()
    assert not FusedEnsembleNet.can_fuse(mixed)
    with pytest.raises(ValueError, match="fuses"):
        FusedEnsembleNet(mixed)
    plain = _load(export_model(mixed, tmp_path, "unfused") / MODEL_FILE)
    assert plain.original_name == "EnsembleNet"
    with torch.inference_mode(), torch.no_grad():
        torch.testing.assert_close(plain(x), mixed(x), atol=1e-5, rtol=0)
