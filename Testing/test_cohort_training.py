"""Training on a brain cohort: one case per patient, every follow-up scored, plans cropped and pooled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AnatomyDTLib.brain.cohort import make_brain_cohort
from AnatomyDTLib.models import Config, load_checkpoint
from AnatomyDTLib.models.data import load_cases, make_batch
from AnatomyDTLib.models.training import train
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.solver import simulate
from AnatomyDTLib.plan import load_plan

REPO = Path(__file__).resolve().parents[1]

TINY_BRAIN = {
    "model": {"dt_days": 10.0, "alpha_channels": 2, "cnn_channels": 2, "cnn_dilations": [1], "film_hidden": 4,
              "correction_rate_per_day": 0.1, "diffusion_init_mm2_per_day": [0.001, 0.1, 0.001, 0.001, 0.001],
              "max_jacobi_iters": 3},
    "loss": {"cl_classes": [2], "skeleton_iters": 2},
    "training": {"epochs": 1, "batch_size": 1, "crop": 32, "val_fraction": 0.5, "patience": 0, "threads": 1,
                 "ema_decay": 0.0},
    "data": {"pool": 2},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("brain") / "cohort"
    make_brain_cohort(out, 2, seed=11, patterns=["surgery_stupp", "none"])
    return out


def test_patients_become_cases_with_all_follow_ups_and_their_plan(cohort):
    cases, info = load_cases(cohort)
    assert info.kind == "brain-cohort" and info.class_names == list(BRAIN_SCHEMA.names) and info.ndim == 3
    manifest = (cohort / "manifest.csv").read_text().splitlines()[1:]
    for case in cases:
        rows = [r.split(",") for r in manifest if r.startswith(case.name + ",")]
        assert [d for d, _ in case.targets()] == [float(r[2]) for r in rows[1:]]
    treated = next(c for c in cases if not c.plan.is_empty())
    assert treated.plan.surgeries and isinstance(treated.plan.surgeries[0].resection_mask, np.ndarray)
    batch = make_batch([treated], info, crop=32, soften_px=0.0, body_mask=True, pool=2)
    assert batch.p0.shape == (1, 5, 16, 16, 16) and batch.spacing == (4.0, 4.0, 4.0)
    assert batch.target.shape[0] == len(treated.targets()) and [b for _, b in batch.pairs] == [0] * len(treated.targets())
    assert batch.plan.surgeries[0].resection_mask.shape == (16, 16, 16)
    assert batch.plan.radiotherapy.dose_map.shape == (16, 16, 16)
    with pytest.raises(Exception, match="batch_size"):
        make_batch(cases, info, crop=32, soften_px=0.0, body_mask=True, pool=2)


def test_training_on_a_cohort_writes_a_model_that_forecasts_on_the_scan_grid(cohort, tmp_path):
    result = train(cohort, Config.from_dict(TINY_BRAIN), tmp_path / "run", device="cpu", progress=False,
                   log=lambda *_: None)
    assert result.epochs_run == 1
    row = result.history[0]
    assert 0.0 <= row["val_dice"] <= 1.0 and 0.0 <= row["val_tumour_dice"] <= 1.0  # one mean per patient
    model = load_checkpoint(result.best_checkpoint)
    assert model.model_spacing == (4.0, 4.0, 4.0) and model.info["data_spacing"] == [2.0, 2.0, 2.0]
    cases, info = load_cases(cohort)
    case = cases[0]
    from AnatomyDTLib.state import labels_to_field

    p0 = labels_to_field(case.labels_t0, 5)
    out = model.forecast(p0, spacing=case.spacing, days=[30.0], plan=case.plan)
    assert out.shape == (1,) + tuple(p0.shape)  # answered on the 2 mm scan grid
    assert torch.allclose(out.sum(1), torch.ones_like(out.sum(1)), atol=1e-5)
    outside = torch.as_tensor(case.labels_t0 == 0)
    assert bool((out[0].argmax(0)[outside] == 0).all())  # trained with the body mask: outside stays outside
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["kind"] == "brain-cohort"


def test_solver_checkpointing_gives_the_same_gradients():
    """checkpoint=True recomputes each step in the backward pass; the gradient must not change."""
    torch.manual_seed(0)
    labels = np.full((10, 10, 10), 2)
    labels[:, :, 5:] = 3
    labels[3:7, 3:7, 3:7] = 1
    from AnatomyDTLib.state import labels_to_field

    p0 = labels_to_field(labels, 5)
    plan = load_plan({"version": 1, "radiotherapy": {"start_day": 2, "total_dose_gy": 10, "fractions": 5}},
                     schema=BRAIN_SCHEMA)
    grads = []
    for use_checkpoint in (False, True):
        d = torch.tensor([0.001, 0.3, 0.01, 0.01, 0.01], requires_grad=True)
        out = simulate(p0, spacing=(2.0, 2.0, 2.0), days=[12.0], dt=3.0, diffusion=d, growth_rate=0.05,
                       carrying_capacity=1.0, tumor_class=1, plan=plan, schema=BRAIN_SCHEMA, jacobi_iters=4,
                       checkpoint=use_checkpoint)
        ramp = torch.linspace(-1.0, 1.0, 10) ** 2  # spread (second moment) grows with diffusion
        (out[:, 1] * ramp).sum().backward()  # depends on where the tumour is, not only on how much
        grads.append(d.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert float(grads[0][1].abs()) > 0 and float(grads[0][2].abs()) > 0


def test_model_solver_checkpoint_gives_the_same_gradients_and_saves_memory():
    """model.solver_checkpoint recomputes each step (transport, cross-diffusion, CNN correction) in
    the backward pass: every parameter's gradient is unchanged, and fewer bytes are kept for it."""
    from AnatomyDTLib.models.config import Config
    from AnatomyDTLib.models.conditioning import Conditioning
    from AnatomyDTLib.models.growth import AnatomyDTModel
    from AnatomyDTLib.state import labels_to_field

    labels = np.full((12, 12, 12), 2)
    labels[:, :, 6:] = 3
    labels[4:8, 4:8, 4:8] = 1
    p0 = labels_to_field(labels, 5)[None].float()
    plan = load_plan({"version": 1, "radiotherapy": {"start_day": 2, "total_dose_gy": 10, "fractions": 5}},
                     schema=BRAIN_SCHEMA)
    grads, saved = [], []
    for use_checkpoint in (False, True):
        cfg = Config.load(REPO / "configs" / "brain.json")
        cfg.model["solver_checkpoint"] = use_checkpoint
        torch.manual_seed(0)
        model = AnatomyDTModel(cfg.model, 5, 3, tumour_index=1, sink_index=0)
        assert model.cross_diffusion() is not None  # the brain model's learned cross-diffusion is in the hook
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            traj, _ = model(p0, spacing=(4.0, 4.0, 4.0), days=[10.0, 20.0],
                            conditioning=Conditioning.from_plans([plan]), plan=plan, schema=BRAIN_SCHEMA)
        ramp = torch.linspace(-1.0, 1.0, 12) ** 2
        (traj[-1, :, 1] * ramp).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        saved.append(sum(sizes))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name
    assert saved[1] < 0.25 * saved[0]  # 0.14 measured; 0.48 with the cross-diffusion outside the checkpoint
