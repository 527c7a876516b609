"""The Table-1 baselines (AnatomyDTLib.baselines): outputs, fitting, treatment input, Fisher–KPP anatomy.

Real data (a tiny generated Voronoi set written to disk and read back), real torch, small grids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from AnatomyDTLib.baselines.fisher_kpp import FisherKPP, refill_tumour
from AnatomyDTLib.baselines.networks import _step_schedule
from AnatomyDTLib.baselines.trainer import (TRAINED_METHODS, BaselineSettings, baseline_loss, build_baseline, fit,
                                            predict_labels)
from AnatomyDTLib.datasets import make_dataset
from AnatomyDTLib.models.data import load_cases, make_batch

NEURAL = ("unet", "convlstm", "neuralode")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "voronoi"
    make_dataset("voronoi", n=4, size=64, seed=5, out_dir=out, options={"interval_days": (25.0, 60.0)})
    return load_cases(out)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**kw) -> BaselineSettings:
    base = dict(epochs=3, crop=32, hidden=4, batch_size=2, step_days=15.0, ode_step_days=20.0, dt_days=5.0, threads=1)
    base.update(kw)
    return BaselineSettings(**base)


def batch_of(cases, info, crop=32):
    return make_batch(cases, info, crop=crop, soften_px=0.0, body_mask=True)


def randomise_heads(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised output layers random weights (an untrained net predicts 'no change')."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(3.0 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_output_is_a_field_on_the_simplex_with_the_input_shape(tiny, method):
    cases, info = tiny
    model = build_baseline(method, info, settings())
    randomise_heads(model)
    batch = batch_of(cases[:3], info)
    with torch.no_grad():
        out = model(batch)
    assert out.shape == batch.p0.shape == (3, len(info.class_names), 32, 32)
    assert torch.isfinite(out).all()
    assert float(out.min()) >= -1e-6
    assert torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5)
    outside = batch.mask < 0.5
    assert torch.equal(out.movedim(1, -1)[outside], batch.p0.movedim(1, -1)[outside])  # the body outline is rigid


@pytest.mark.parametrize("method", NEURAL)
def test_untrained_network_predicts_no_change(tiny, method):
    cases, info = tiny
    model = build_baseline(method, info, settings())
    batch = batch_of(cases[:2], info, crop=0)
    with torch.no_grad():
        labels = model(batch).argmax(1)
    assert torch.equal(labels, batch.p0.argmax(1))


@pytest.mark.parametrize("method", NEURAL)
def test_networks_run_on_3d_data(tmp_path, method):
    make_dataset("voronoi", n=1, size=64, seed=1, out_dir=tmp_path / "v3", ndim=3)
    cases, info = load_cases(tmp_path / "v3")
    model = build_baseline(method, info, settings())
    batch = batch_of(cases, info, crop=16)
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (1, len(info.class_names), 16, 16, 16)
    assert torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5)


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_fitting_reduces_the_loss_on_a_tiny_problem(tiny, method):
    cases, info = tiny
    train = cases[:2]
    lr = 0.05 if method == "fisher-kpp" else 1e-2
    model = build_baseline(method, info, settings(lr=lr, epochs=4 if method == "fisher-kpp" else 6))
    batch = batch_of(train, info)
    with torch.no_grad():
        before = float(baseline_loss(model(batch), batch.target))
    history = fit(model, method, train, [], info, settings(lr=lr, epochs=4 if method == "fisher-kpp" else 6),
                  log=lambda *_: None)
    with torch.no_grad():
        after = float(baseline_loss(model(batch), batch.target))
    assert len(history) == (4 if method == "fisher-kpp" else 6)
    assert after < before - 1e-3, (method, before, after)


def forecasts_before_and_after(tiny, method, change):
    """Forecast of one case, then again after ``change(batch)`` (heads randomised for the networks)."""
    cases, info = tiny
    model = build_baseline(method, info, settings())
    if method != "fisher-kpp":
        randomise_heads(model)
    batch = batch_of(cases[:1], info)
    batch.treatments = [{"treated": 0.0, "dose_gy": 0.0, "interval_days": batch.days[0]}]
    with torch.no_grad():
        before = model(batch)
        change(batch)
        after = model(batch)
    return before, after


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_treatment_input_changes_the_prediction(tiny, method):
    def treat(batch):
        batch.treatments = [{"treated": 1.0, "dose_gy": 60.0, "interval_days": batch.days[0]}]

    untreated, treated = forecasts_before_and_after(tiny, method, treat)
    assert float((untreated - treated).abs().max()) > 1e-4  # float noise is ~1e-7
    if method == "fisher-kpp":  # the dose kills tumour: less of it, never more
        t = tiny[1].tumour_index
        assert float(treated[:, t].sum()) < float(untreated[:, t].sum())


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_forecast_horizon_changes_the_prediction(tiny, method):
    def later(batch):
        batch.days = [batch.days[0] + 40.0]

    early, late = forecasts_before_and_after(tiny, method, later)
    assert float((early - late).abs().max()) > 1e-4


@pytest.mark.parametrize("method", ("convlstm", "neuralode"))
def test_a_forecast_does_not_depend_on_the_rest_of_its_batch(tiny, method):
    cases, info = tiny
    model = build_baseline(method, info, settings())
    randomise_heads(model)
    pair = sorted(cases[:2], key=lambda c: c.interval_days)
    assert pair[0].interval_days != pair[1].interval_days
    with torch.no_grad():
        together = model(batch_of(pair, info))
        alone = model(batch_of(pair[:1], info))
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_step_schedule_ends_on_the_follow_up_day():
    counts, lengths = _step_schedule([30.0, 95.0, 7.0], 10.0)
    assert counts == [3, 10, 1]
    for n, h, d in zip(counts, lengths, [30.0, 95.0, 7.0]):
        assert math.isclose(n * h, d) and h <= 10.0


def test_refill_tumour_takes_the_nearest_tissue_label():
    rng = np.random.default_rng(0)
    labels = rng.integers(2, 5, size=(24, 24))
    labels[:, :3] = 0  # background strip
    labels[8:15, 2:12] = 1  # tumour touching the background
    filled = refill_tumour(labels, tumour=1, background=0)
    tissue = np.argwhere((labels != 1) & (labels != 0))
    for y, x in np.argwhere(labels == 1):
        d = ((tissue - [y, x]) ** 2).sum(1)
        nearest = {int(labels[tuple(p)]) for p in tissue[d == d.min()]}
        assert filled[y, x] in nearest  # ties may go either way
    assert np.array_equal(filled[labels != 1], labels[labels != 1])


def test_fisher_kpp_keeps_the_anatomy_fixed_away_from_the_tumour(tiny):
    cases, info = tiny
    t = info.tumour_index
    model = FisherKPP(len(info.class_names), 2, tumour_index=t, dt_days=5.0, diffusion_init=0.3, growth_init=0.05)
    for case in cases:
        pred = predict_labels(model, case, info)
        involved = (case.labels_t0 == t) | (pred == t)
        far = ndimage.distance_transform_edt(~involved) > 1.0
        assert np.array_equal(pred[far], case.labels_t0[far])
        assert not np.array_equal(pred == t, case.labels_t0 == t)  # the tumour did move
        # where the tumour went it took over; where it left, the nearest tissue came back
        assert set(np.unique(pred[~far])) <= set(np.unique(case.labels_t0))


def test_fisher_kpp_grows_the_untreated_tumour_and_the_dose_shrinks_it(tiny):
    cases, info = tiny
    t = info.tumour_index
    model = FisherKPP(len(info.class_names), 2, tumour_index=t, dt_days=5.0, diffusion_init=0.3, growth_init=0.05,
                      kill_init=0.03)
    case = cases[0]
    batch = batch_of([case], info, crop=0)
    with torch.no_grad():
        batch.treatments = [{"treated": 0.0, "dose_gy": 0.0}]
        grown = int((model(batch)[0].argmax(0) == t).sum())
        batch.treatments = [{"treated": 1.0, "dose_gy": 70.0}]
        treated = int((model(batch)[0].argmax(0) == t).sum())
    n0 = int((case.labels_t0 == t).sum())
    assert grown > n0 and treated < grown
