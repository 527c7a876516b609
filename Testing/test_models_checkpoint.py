"""Weights files of the learned model: round trip, the ForecastModel protocol, damaged and foreign files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AnatomyDTLib.errors import InputError
from AnatomyDTLib.models import AnatomyDTModel, Conditioning, Config, LearnedForecastModel, load_checkpoint, save_checkpoint
from AnatomyDTLib.models.checkpoint import read_checkpoint
from AnatomyDTLib.predict import load_model
from AnatomyDTLib.state import labels_to_field

SMALL = {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1, 2], "film_hidden": 8, "dt_days": 2.0}
NAMES = ["background", "tumour", "region_1", "region_2"]


def trained_like_model(ndim=2, seed=1) -> AnatomyDTModel:
    """A model whose every weight is non-trivial (as after training)."""
    torch.manual_seed(seed)
    model = AnatomyDTModel(Config.from_dict({"model": SMALL}).model, 4, ndim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def baseline(shape=(20, 20)):
    labels = np.full(shape, 2)
    labels[:, shape[1] // 2:] = 3
    labels[(slice(7, 12),) * len(shape)] = 1
    labels[(0,) * len(shape)] = 0
    return labels_to_field(labels, 4)


@pytest.fixture
def weights(tmp_path):
    model = trained_like_model()
    path = save_checkpoint(model, tmp_path / "model.pt", NAMES, info={"epoch": 3})
    return model, path


def test_round_trip_gives_identical_forecasts(weights):
    model, path = weights
    loaded = load_checkpoint(path, device="cpu")
    assert isinstance(loaded, LearnedForecastModel)
    assert loaded.name and loaded.version and loaded.class_names == NAMES
    assert loaded.info["epoch"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    p0 = baseline()
    treatment = {"treated": 1, "dose_gy": 40}
    out = loaded.forecast(p0, spacing=(1.0, 1.0), days=[4.0, 10.0], treatment=treatment)
    assert out.shape == (2, 4, 20, 20)
    with torch.no_grad():
        ref, _ = model(p0[None], spacing=(1.0, 1.0), days=[4.0, 10.0], conditioning=Conditioning.from_static([treatment]))
    assert torch.allclose(out, ref[:, 0], atol=1e-6)
    assert not torch.allclose(out[-1], p0, atol=1e-3)  # the forecast actually evolves the anatomy


def test_predict_load_model_uses_the_checkpoint_loader(weights):
    _, path = weights
    model = load_model(str(path))
    assert isinstance(model, LearnedForecastModel)
    out = model.forecast(baseline(), spacing=(1.0, 1.0), days=[5.0], plan=None)
    assert out.shape == (1, 4, 20, 20)
    assert torch.allclose(out.sum(1), torch.ones(1, 20, 20), atol=1e-5)


def test_checkpoint_stores_config_schema_ndim_and_version(weights):
    _, path = weights
    data = read_checkpoint(path)
    assert data["class_names"] == NAMES and data["spatial_ndim"] == 2
    assert data["model_config"]["cnn_channels"] == 4
    assert data["anatomydt_version"] and data["format_version"] == 1
    assert "time" in data["conditioning_features"]


def test_3d_round_trip(tmp_path):
    model = trained_like_model(ndim=3)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m3.pt", NAMES))
    out = loaded.forecast(baseline((10, 10, 10)), spacing=(1.0, 1.0, 1.0), days=[3.0], plan=None)
    assert out.shape == (1, 4, 10, 10, 10)
    with pytest.raises(InputError, match="3D"):
        loaded.forecast(baseline(), spacing=(1.0, 1.0), days=[3.0])


def test_corrupt_file_is_refused(tmp_path):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(bad)


def test_truncated_file_is_refused(weights, tmp_path):
    _, path = weights
    cut = tmp_path / "cut.pt"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(cut)


def test_foreign_weights_are_refused(tmp_path):
    foreign = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), foreign)
    with pytest.raises(InputError, match="foreign"):
        load_checkpoint(foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InputError, match="not an AnatomyDT"):
        load_checkpoint(tensor)


def test_missing_file_and_mismatched_weights(weights, tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    _, path = weights
    data = torch.load(path, weights_only=True)
    data["model_config"]["cnn_channels"] = 8  # the stored weights no longer fit the described model
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(InputError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
    data = torch.load(path, weights_only=True)
    data["state_dict"]["raw_diffusion"][0] = float("nan")
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="NaN"):
        load_checkpoint(tmp_path / "nan.pt")
    data = torch.load(path, weights_only=True)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(InputError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")


def test_forecast_refuses_wrong_class_count_and_double_treatment(weights):
    _, path = weights
    model = load_checkpoint(path)
    with pytest.raises(InputError, match="classes"):
        model.forecast(torch.ones(3, 20, 20) / 3, spacing=(1.0, 1.0), days=[1.0])
    plan = {"version": 1, "radiotherapy": {"fraction_days": [0.0], "dose_per_fraction_gy": 2.0}}
    with pytest.raises(InputError, match="not both"):
        model.forecast(baseline(), spacing=(1.0, 1.0), days=[1.0], plan=plan, treatment={"dose_gy": 2.0})


def test_3d_brain_model_runs_through_predict_with_a_treatment_plan(tmp_path):
    """A 3D model on the brain schema answers predict() (the CLI / Slicer path) and the plan changes it."""
    from AnatomyDTLib.io import Geometry
    from AnatomyDTLib.predict import predict
    from AnatomyDTLib.schema import BRAIN_SCHEMA
    from AnatomyDTLib.state import AnatomyState

    torch.manual_seed(2)
    model = AnatomyDTModel(Config.from_dict({"model": SMALL}).model, 5, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_checkpoint(model, tmp_path / "brain3d.pt", list(BRAIN_SCHEMA.names))
    labels = np.zeros((12, 12, 12), np.int64)
    labels[2:10, 2:10, 2:10] = 2
    labels[2:10, 2:10, 6:10] = 3
    labels[4:6, 4:6, 2:4] = 4
    labels[5:8, 5:8, 5:8] = 1
    baseline_state = AnatomyState(labels_to_field(labels, 5), Geometry(spacing=(1.0, 1.0, 1.0)), BRAIN_SCHEMA)
    plan = {"version": 1, "radiotherapy": {"start_day": 2, "fractions": 5, "dose_per_fraction_gy": 6.0,
                                           "fractions_per_week": 5},
            "chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": 0.05, "windows": [[2, 12]]}]}
    treated = predict(baseline_state, days=[6.0, 12.0], plan=plan, model=str(path))
    untreated = predict(baseline_state, days=[6.0, 12.0], plan=None, model=str(path))
    assert treated.fields.shape == (2, 5, 12, 12, 12) and treated.model_name == "anatomy-dt-learned"
    assert torch.allclose(treated.fields.sum(1), torch.ones(2, 12, 12, 12), atol=1e-5)
    tumour_treated = float(treated.fields[-1, 1].sum())
    tumour_untreated = float(untreated.fields[-1, 1].sum())
    assert tumour_treated < 0.9 * tumour_untreated  # the plan's LQ and chemotherapy kill act in the solver
