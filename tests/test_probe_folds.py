"""The probe's pick among heads and layers is judged on enough held-out images to mean something:
below ``MIN_JUDGED`` images in one split, k-fold cross-validation judges every train image once and
the reported heads are refit on all of train."""

import numpy as np
import pytest
import torch

from vitpipe.config import ConfigError
from vitpipe.downstream.probe import (MIN_JUDGED, ProbeSettings, fit_sweep, fold_count, held_out_splits,
                                      probe_sets, train_heads)

SETTINGS = ProbeSettings(lrs=(0.003, 1.0), weight_decays=(0.0, 1e-2), epochs=3, batch_size=32)


def data(n=400, dim=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    features = rng.normal(size=(classes, dim))[labels] + rng.normal(size=(n, dim)) * 1.5
    return features.astype(np.float32), labels


def test_auto_folds_follow_the_held_out_size():
    auto = ProbeSettings()
    assert fold_count(6000, auto) == 3  # the demo: one split would hold 600 images
    assert fold_count(int(MIN_JUDGED / auto.val_fraction), auto) == 1  # full Fashion-MNIST: 6,000 held out
    assert fold_count(60000, auto) == 1
    assert fold_count(60000, ProbeSettings(folds=3)) == 3 and fold_count(100, ProbeSettings(folds=1)) == 1
    # more folds than images: 100 folds of 60 trained 40 sweeps that judged nothing and reported "100 folds"
    assert fold_count(60, ProbeSettings(folds=100)) == 60
    assert all(len(val) == 1 for _, val in held_out_splits(60, ProbeSettings(folds=100)))


@pytest.mark.parametrize("bad", [dict(folds=-1), dict(val_fraction=0.0), dict(val_fraction=1.0)])
def test_bad_probe_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=r"--folds must be >= 0 .*; got folds"):
        ProbeSettings(**bad)


def test_folds_are_disjoint_and_cover_every_image_once():
    splits = held_out_splits(103, ProbeSettings(folds=4))
    held = np.concatenate([val for _, val in splits])
    assert sorted(held.tolist()) == list(range(103))
    for fit, val in splits:
        assert not set(fit) & set(val) and len(fit) + len(val) == 103
    assert max(len(v) for _, v in splits) - min(len(v) for _, v in splits) <= 1


def test_k_fold_pick_sums_every_folds_counts_and_the_heads_are_refit_on_all():
    x, y = data()
    settings = ProbeSettings(**{**SETTINGS.__dict__, "folds": 4})
    grid = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    right = np.zeros(len(grid))
    for fit, val in held_out_splits(len(x), settings):  # what each fold's heads get right, by hand
        heads = train_heads(x[fit], y[fit], 4, [g[0] for g in grid], [g[1] for g in grid], 3, 32, settings.seed)
        with torch.no_grad():
            right += (heads(torch.from_numpy(x[val]))[0].argmax(-1).numpy() == y[val]).sum(-1)
    sweep = fit_sweep(x, y, 4, settings)
    assert (sweep.folds, sweep.judged) == (4, len(x))
    assert sweep.scores[0] == pytest.approx((right / len(x)).tolist(), abs=1e-12)
    assert sweep.best[0] == int(np.argmax(right))  # first of a tie, as np.argmax
    assert len(set(sweep.scores[0])) > 1  # the grid really differs: the pick is not a tie by default
    refit = train_heads(x, y, 4, [g[0] for g in grid], [g[1] for g in grid], 3, 32, settings.seed)
    with torch.no_grad():
        assert torch.equal(sweep.heads(torch.from_numpy(x)), refit(torch.from_numpy(x)))


def test_one_split_keeps_the_heads_of_its_fit_part():
    x, y = data(seed=3)
    settings = ProbeSettings(**{**SETTINGS.__dict__, "folds": 1})
    sweep = fit_sweep(x, y, 4, settings)
    (fit, val), = held_out_splits(len(x), settings)
    assert len(val) == 40 and (sweep.folds, sweep.judged) == (1, 40)
    grid = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    alone = train_heads(x[fit], y[fit], 4, [g[0] for g in grid], [g[1] for g in grid], 3, 32, settings.seed)
    with torch.no_grad():
        assert torch.equal(sweep.heads(torch.from_numpy(x)), alone(torch.from_numpy(x)))


def test_results_say_what_judged_the_pick():
    x, y = data(n=500, seed=4)
    result = probe_sets([x[:400]], y[:400], [x[400:]], y[400:], ProbeSettings(**{**SETTINGS.__dict__, "folds": 5}))[0]
    assert (result.folds, result.judged) == (5, 400)
    picked = max(result.sweep, key=lambda row: row["val_top1"])
    assert result.val_top1 == picked["val_top1"] and result.top1 == picked["test_top1"]
