"""Tests of the learned model (AnatomyDTLib.models): rollout shapes, gradients, positivity, ablations.

Real torch, real solver, no mocks. Grids are tiny so that every test runs in well under a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AnatomyDTLib.errors import InputError, ParameterError
from AnatomyDTLib.losses import AnatomyDTObjective
from AnatomyDTLib.models import AnatomyDTModel, Conditioning, Config, FEATURE_NAMES, parameter_groups
from AnatomyDTLib.models.physics import cross_diffusion_tendency
from AnatomyDTLib.operators import CrossDiffusionOperator
from AnatomyDTLib.plan import load_plan
from AnatomyDTLib.state import labels_to_field

SMALL = {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1, 2], "film_hidden": 8, "dt_days": 2.0}


def small_config(**model) -> Config:
    return Config.from_dict({"model": {**SMALL, **model}})


def blob_labels(shape, centre, radius, regions=True):
    """Integer labels: background ring, two tissue halves (2, 3) and a tumour disc/ball (1)."""
    grid = np.indices(shape).astype(float)
    mid = (np.array(shape) - 1) / 2.0
    r_body = np.sqrt(sum((g - m) ** 2 for g, m in zip(grid, mid)))
    labels = np.zeros(shape, np.int64)
    body = r_body < 0.45 * min(shape)
    labels[body] = 2
    if regions:
        labels[body & (grid[-1] > mid[-1])] = 3
    r_t = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    labels[body & (r_t <= radius)] = 1
    return labels


def batch_2d(b=2, n=24, k=4):
    fields = [labels_to_field(blob_labels((n, n), (n / 2 - 1 + i, n / 2), 3 + i), k) for i in range(b)]
    return torch.stack(fields)


def perturb_heads(model: AnatomyDTModel, scale=0.05, seed=0):
    """Give the zero-initialised output layers random weights so gradients reach every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (model.alpha_net, model.growth_net):
            if net is None:
                continue
            net.head.weight.copy_(scale * torch.randn(net.head.weight.shape, generator=g))
            last = net.film[-1]
            last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g))


# --------------------------------------------------------------------------------------------
# shapes and the simplex
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_rollout_shapes_and_simplex_2d_3d(ndim):
    k = 4
    shape = (24, 24) if ndim == 2 else (12, 12, 12)
    centre = tuple(s / 2 for s in shape)
    p0 = torch.stack([labels_to_field(blob_labels(shape, centre, 3), k) for _ in range(2)])
    model = AnatomyDTModel(small_config().model, k, ndim)
    perturb_heads(model)
    cond = Conditioning.from_static([{"treated": 0, "dose_gy": 0}, {"treated": 1, "dose_gy": 40}])
    traj, aux = model(p0, spacing=(1.0,) * ndim, days=[3.0, 7.0], conditioning=cond)
    assert traj.shape == (2, 2, k) + shape
    assert aux["alpha"].shape == (2,) + shape
    assert torch.isfinite(traj).all()
    assert float(traj.detach().min()) >= -1e-6
    assert torch.allclose(traj.sum(2), torch.ones_like(traj.sum(2)), atol=1e-5)
    loss = (traj[-1] * torch.linspace(0, 1, k).reshape(1, k, *([1] * ndim))).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_wrong_input_shapes_are_refused():
    model = AnatomyDTModel(small_config().model, 4, 2)
    cond = Conditioning.from_static([{}])
    with pytest.raises(InputError, match="expects"):
        model(torch.ones(1, 3, 8, 8) / 3, spacing=(1, 1), days=[1.0], conditioning=cond)
    with pytest.raises(InputError, match="schedules"):
        model(batch_2d(b=2), spacing=(1, 1), days=[1.0], conditioning=cond)


# --------------------------------------------------------------------------------------------
# gradients through the rollout
# --------------------------------------------------------------------------------------------

def test_gradient_reaches_cnn_alpha_field_diffusion_and_repulsion():
    k = 4
    p0 = batch_2d(b=2, k=k)
    target = torch.stack([labels_to_field(blob_labels((24, 24), (11, 12), 6), k)] * 2)
    model = AnatomyDTModel(small_config().model, k, 2)
    perturb_heads(model)
    cond = Conditioning.from_static([{"treated": 0}, {"treated": 1, "dose_gy": 30}])
    traj, _ = model(p0, spacing=(1.0, 1.0), days=[12.0], conditioning=cond)
    loss, _ = AnatomyDTObjective(cl_classes=[1], iters=3)(traj[-1], target)
    loss.backward()
    groups = parameter_groups(model)
    assert set(groups) == {"physics", "alpha", "growth_cnn"}
    named = dict(model.named_parameters())
    for part in ("physics", "alpha", "growth_cnn"):
        assert groups[part], part
        for name in groups[part]:
            g = named[name].grad
            assert g is not None, name
            assert torch.isfinite(g).all(), name
    # every part, including the first convolution of both CNNs, gets a non-zero gradient
    for name in ("raw_diffusion", "raw_repulsion", "alpha_net.convs.0.weight", "alpha_net.head.weight",
                 "growth_net.convs.0.weight", "growth_net.head.weight", "growth_net.film.0.weight"):
        assert float(named[name].grad.abs().sum()) > 0, name


def test_cross_diffusion_gradients_stay_finite_over_long_rollouts():
    """Far-field tails make denormal outflow demands; the model's limiter keeps the gradients finite."""
    k = 4
    model = AnatomyDTModel(small_config(repulsion_init_mm2_per_day=0.2, dt_days=4.0, correction_rate_per_day=0.2).model, k, 2)
    cond = Conditioning.from_static([{}, {}])
    traj, _ = model(batch_2d(b=2, k=k), spacing=(1.0, 1.0), days=[80.0], conditioning=cond)
    ((traj[-1] - batch_2d(b=2, k=k)) ** 2).mean().backward()
    assert torch.isfinite(model.raw_repulsion.grad).all()
    assert torch.isfinite(model.raw_diffusion.grad).all()


def test_cross_diffusion_tendency_matches_library_operator_forward():
    torch.manual_seed(0)
    p = torch.softmax(3 * torch.randn(2, 4, 16, 16, dtype=torch.float64), dim=1)
    chi = -torch.rand(4, 4, dtype=torch.float64) * (1 - torch.eye(4, dtype=torch.float64))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    mask[..., :3, :] = 0
    for dt in (0.1, 50.0):  # below and far above the CFL limit (limiter active)
        ours = cross_diffusion_tendency(p, chi, (1.0, 0.5), dt, mask)
        ref = CrossDiffusionOperator(chi, (1.0, 0.5), mask).tendency(p, dt)
        assert torch.allclose(ours, ref, atol=1e-12), dt
        assert abs(float(ours.sum())) < 1e-10  # conservative
        assert float((p + dt * ours).min()) >= -1e-12  # positivity for any step


# --------------------------------------------------------------------------------------------
# positivity of the physics and the zero-sum correction
# --------------------------------------------------------------------------------------------

def test_diffusion_and_repulsion_stay_positive_whatever_the_raw_values():
    model = AnatomyDTModel(small_config().model, 4, 2)
    with torch.no_grad():
        model.raw_diffusion.copy_(torch.tensor([-30.0, -5.0, 0.0, 8.0]))
        model.raw_repulsion.copy_(torch.linspace(-40, 10, 16).reshape(4, 4))
    d, r, chi = model.diffusion(), model.repulsion(), model.cross_diffusion()
    assert bool((d > 0).all())
    assert bool((r >= 0).all()) and bool((torch.diagonal(r) == 0).all())
    assert bool((chi <= 0).all()), "chi = -r: every learned interaction is a repulsion"
    # a huge gradient step towards negative values keeps them positive
    opt = torch.optim.SGD(model.parameters(), lr=1e4)
    (model.diffusion().sum() + model.repulsion().sum()).backward()
    opt.step()
    assert bool((model.diffusion() > 0).all()) and bool((model.repulsion() >= 0).all())


def test_growth_correction_is_zero_sum_and_zero_at_initialisation():
    k = 4
    p0 = batch_2d(b=2, k=k)
    cond = Conditioning.from_static([{}, {"treated": 1, "dose_gy": 60}])
    model = AnatomyDTModel(small_config(cross_diffusion=False).model, k, 2)
    hook = model._make_hook(p0, cond, None, model._tumour_volume(p0, None, 1.0), (1.0, 1.0))
    p = torch.softmax(3 * torch.randn(2, k, 24, 24), dim=1)
    rate, dt = model.cfg["correction_rate_per_day"], model.cfg["dt_days"]
    with torch.no_grad():
        assert float(hook(p, 5.0).abs().max()) == 0.0  # zero head: the model starts as the pure PDE
        perturb_heads(model, scale=0.5)
        out = hook(p, 5.0)
    assert float(out.abs().max()) > 1e-3
    assert torch.allclose(out.sum(1), torch.zeros_like(out.sum(1)), atol=1e-6)
    step = p + dt * out  # moves at most A·dt between two simplex points: off the simplex by <= ε·A·dt
    assert float(step.min()) >= -1e-3 * rate * dt


# --------------------------------------------------------------------------------------------
# ablation switches
# --------------------------------------------------------------------------------------------

def test_ablation_switches_change_the_parameter_set():
    full = parameter_groups(AnatomyDTModel(small_config().model, 4, 2))
    scalar = parameter_groups(AnatomyDTModel(small_config(spatial_alpha=False).model, 4, 2))
    no_cnn = parameter_groups(AnatomyDTModel(small_config(growth_cnn=False).model, 4, 2))
    fixed = parameter_groups(AnatomyDTModel(small_config(learn_diffusion=False, learn_cross_diffusion=False).model, 4, 2))
    assert any(n.startswith("alpha_net.") for n in full["alpha"])
    assert scalar["alpha"] == ["alpha_head.weight", "alpha_head.bias"]
    assert full["growth_cnn"] and not no_cnn["growth_cnn"]
    assert set(full["physics"]) == {"raw_diffusion", "raw_repulsion"} and fixed["physics"] == []
    count = lambda cfg: sum(p.numel() for p in AnatomyDTModel(cfg.model, 4, 2).parameters())
    assert count(small_config()) > count(small_config(growth_cnn=False)) > count(
        small_config(growth_cnn=False, spatial_alpha=False))


def test_scalar_alpha_is_uniform_and_spatial_alpha_varies():
    k = 4
    p0 = batch_2d(b=1, k=k)
    cond = Conditioning.from_static([{}])
    for spatial in (False, True):
        model = AnatomyDTModel(small_config(spatial_alpha=spatial).model, k, 2)
        perturb_heads(model, scale=0.5)
        _, aux = model(p0, spacing=(1, 1), days=[1.0], conditioning=cond)
        alpha = aux["alpha"]
        assert float(alpha.min()) > 0 and float(alpha.max()) < model.cfg["k_max_per_day"]
        assert (float(alpha.std()) > 1e-6) == spatial


def test_topology_switch_turns_the_atl_off():
    p = torch.softmax(torch.randn(1, 4, 16, 16), 1)
    q = batch_2d(b=1, n=16, k=4)
    on = Config.from_dict({"loss": {"lambda_topo": 1.0, "cl_classes": [1]}})
    off = Config.from_dict({"loss": {"lambda_topo": 0.0, "cl_classes": [1]}})
    from AnatomyDTLib.models.training import objective_from_config

    _, c_on = objective_from_config(on)(p, q)
    _, c_off = objective_from_config(off)(p, q)
    assert c_on["cldice"] > 0 and c_on["overlap"] > 0
    assert c_off["cldice"] == 0 and c_off["overlap"] == 0 and c_off["total"] == pytest.approx(c_off["seg"])


# --------------------------------------------------------------------------------------------
# treatment conditioning
# --------------------------------------------------------------------------------------------

def test_static_treatment_equals_a_plan_with_the_whole_dose_on_day_0():
    static = Conditioning.from_static([{"treated": 1, "dose_gy": 60, "interval_days": 90}])
    plan = load_plan({"version": 1, "radiotherapy": {"fraction_days": [0.0] * 30, "dose_per_fraction_gy": 2.0}})
    planned = Conditioning.from_plans([plan])
    for t in (0.0, 10.0, 75.0):
        assert torch.allclose(static.features(t), planned.features(t))
    f = static.features(50.0)[0]
    assert f[FEATURE_NAMES.index("cumulative_dose")] == pytest.approx(1.0)
    assert f[FEATURE_NAMES.index("time")] == pytest.approx(0.5)


def test_plan_features_follow_the_schedule():
    plan = load_plan({"version": 1,
                      "surgery": [{"day": 5, "extent": 0.5}],
                      "radiotherapy": {"start_day": 10, "fractions": 10, "dose_per_fraction_gy": 2.0,
                                       "fractions_per_week": 5},
                      "chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": 0.01, "windows": [[10, 20]]}]})
    cond = Conditioning.from_plans([plan, None])
    names = list(FEATURE_NAMES)
    before, during, after = (cond.features(t) for t in (4.0, 12.0, 40.0))
    assert before[0, names.index("surgery_done")] == 0 and during[0, names.index("surgery_done")] == 1
    assert during[0, names.index("days_since_surgery")] == pytest.approx(0.07)
    assert during[0, names.index("chemo_active")] == 1 and after[0, names.index("chemo_active")] == 0
    assert after[0, names.index("chemo_exposure")] == pytest.approx(0.10)
    assert before[0, names.index("cumulative_dose")] == 0
    assert 0 < during[0, names.index("cumulative_dose")] < after[0, names.index("cumulative_dose")]
    assert after[0, names.index("cumulative_dose")] == pytest.approx(20 / 60)
    assert torch.all(after[1, 1:] == 0)  # no plan: untreated


def test_config_validation_names_the_problem():
    with pytest.raises(ParameterError, match="unknown key"):
        Config.from_dict({"model": {"dt_day": 1.0}})
    with pytest.raises(ParameterError, match="overshoot"):
        Config.from_dict({"model": {"dt_days": 10.0, "correction_rate_per_day": 0.2}})
    with pytest.raises(ParameterError, match="unknown section"):
        Config.from_dict({"modle": {}})
    assert Config.from_dict({}).model["spatial_alpha"] is True


def test_every_shipped_configuration_loads():
    """configs/*.json are what the docs' commands use: each must pass validation as shipped."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    assert len(paths) >= 6, paths
    for path in paths:
        Config.load(path)  # raises ParameterError naming the file and key on any drift
    table2 = Config.load(paths[0].parent / "voronoi_table2.json")
    full = Config.load(paths[0].parent / "voronoi.json")
    assert table2.training["epochs"] == 3 and table2.model == full.model and table2.loss == full.loss


# --------------------------------------------------------------------------------------------
# the model can learn
# --------------------------------------------------------------------------------------------

def test_loss_decreases_on_a_tiny_overfit_problem():
    """One case whose tumour grows from r=3 to r=6 in 12 days: 40 Adam steps must cut the loss clearly."""
    torch.manual_seed(0)
    k = 4
    p0 = labels_to_field(blob_labels((24, 24), (11.5, 11.5), 3), k)[None]
    target = labels_to_field(blob_labels((24, 24), (11.5, 11.5), 6), k)[None]
    model = AnatomyDTModel(small_config(dt_days=3.0, correction_rate_per_day=0.3).model, k, 2)
    cond = Conditioning.from_static([{"treated": 0}])
    objective = AnatomyDTObjective(lambda_topo=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        traj, _ = model(p0, spacing=(1, 1), days=[12.0], conditioning=cond)
        loss, _ = objective(traj[-1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.6 * losses[0], losses[::5]


def test_learning_doc_lists_every_configuration_key_with_its_default():
    """docs/learning.md's key tables are generated from the key tables; they must not drift."""
    from pathlib import Path

    from AnatomyDTLib.models.config import config_reference_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "learning.md").read_text()
    assert config_reference_markdown() in doc
