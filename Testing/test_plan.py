"""Tests of AnatomyDTLib.plan: the treatment-plan format, its validation and its expansion."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from AnatomyDTLib.errors import PlanError
from AnatomyDTLib.plan import (
    PLAN_JSON_SCHEMA,
    Chemotherapy,
    Radiotherapy,
    Surgery,
    TreatmentPlan,
    load_plan,
    no_treatment_plan,
    plan_summary,
    stupp_plan,
    validate_plan_dict,
    weekly_fraction_days,
)
from AnatomyDTLib.schema import BRAIN_SCHEMA

DOCS_PLAN = Path(__file__).resolve().parents[1] / "docs" / "plan.md"


def write_plan(tmp_path: Path, plan: dict | str, name: str = "plan.json") -> Path:
    """Write a plan (dict or raw text) to a JSON file and return its path."""
    path = tmp_path / name
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan, indent=2))
    return path


def docs_examples() -> list[dict]:
    """Every ```json block of docs/plan.md, parsed."""
    blocks = re.findall(r"```json\n(.*?)```", DOCS_PLAN.read_text(), flags=re.S)
    return [json.loads(b) for b in blocks]


def rt(**overrides) -> dict:
    """A valid radiotherapy section with overrides (a value of None deletes the key)."""
    d = {"start_day": 28, "fractions": 30, "dose_per_fraction_gy": 2.0}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def problems_of(d: dict, **kw) -> str:
    """The PlanError message for an invalid plan dict."""
    with pytest.raises(PlanError) as info:
        validate_plan_dict(d, **kw)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Stupp protocol, schedules, expansion
# ---------------------------------------------------------------------------------------------

def test_stupp_plan_fractions_and_total_dose():
    plan = stupp_plan(28.0)
    rt_ = plan.radiotherapy
    assert rt_.n_fractions == 30
    assert len(rt_.fraction_days) == 30
    assert math.isclose(rt_.dose_per_fraction_gy * rt_.n_fractions, 60.0)
    assert math.isclose(rt_.total_dose_gy, 60.0)
    # Mon-Fri pattern: 5 consecutive days then a 2-day gap, six weeks.
    assert all((d - 28) % 7 < 5 for d in rt_.fraction_days)
    assert rt_.fraction_days[:6] == (28, 29, 30, 31, 32, 35)
    assert rt_.fraction_days[-1] == 67
    assert math.isclose(rt_.alpha_per_gy, 0.05) and math.isclose(rt_.beta_per_gy2, 0.005)


def test_stupp_plan_chemo_windows():
    concurrent, adjuvant = stupp_plan(28.0).chemotherapy
    assert concurrent.agent == adjuvant.agent == "temozolomide"
    assert concurrent.windows == ((28.0, 68.0),)  # first fraction .. day after the last
    assert adjuvant.windows == tuple((96.0 + 28 * c, 101.0 + 28 * c) for c in range(6))
    assert concurrent.kill_rate_per_day == adjuvant.kill_rate_per_day == 0.02
    assert len(stupp_plan(10.0, include_adjuvant=False).chemotherapy) == 1
    assert stupp_plan(10.0, include_adjuvant=False).chemotherapy[0].windows == ((10.0, 50.0),)


def test_weekly_fraction_days_per_week_variants():
    assert weekly_fraction_days(0, 8, 7) == tuple(float(i) for i in range(8))
    assert weekly_fraction_days(2, 4, 2) == (2, 3, 9, 10)


def test_cycle_form_expansion_from_json_file(tmp_path):
    path = write_plan(tmp_path, {"chemotherapy": [
        {"agent": "temozolomide", "kill_rate_per_day": 0.03, "start_day": 98, "cycles": 3,
         "days_on": 5, "cycle_length_days": 28}]})
    (chemo,) = load_plan(path).chemotherapy
    assert chemo.windows == ((98.0, 103.0), (126.0, 131.0), (154.0, 159.0))
    assert chemo.kill_rate_per_day == 0.03


def test_explicit_fraction_days_and_total_dose(tmp_path):
    path = write_plan(tmp_path, {"radiotherapy": {"fraction_days": [10, 3, 5.5], "total_dose_gy": 15}})
    r = load_plan(path).radiotherapy
    assert r.fraction_days == (3.0, 5.5, 10.0)
    assert r.dose_per_fraction_gy == 5.0 and r.n_fractions == 3


def test_no_treatment_plans_are_empty():
    assert no_treatment_plan().is_empty()
    assert load_plan(None).is_empty()
    assert load_plan({}).is_empty()
    assert load_plan({"version": 1, "surgery": [], "radiotherapy": None}).is_empty()
    assert not stupp_plan().is_empty()
    assert plan_summary(no_treatment_plan()).startswith("No treatment")


# ---------------------------------------------------------------------------------------------
# Breakpoints, kill rates, horizon
# ---------------------------------------------------------------------------------------------

def test_breakpoints_contents_and_ordering():
    plan = load_plan({
        "surgery": [{"day": 5, "extent": 0.9}],
        "radiotherapy": {"fraction_days": [10, 11], "dose_per_fraction_gy": 2,
                         "delayed_death": {"delay_days": 7, "clearance_half_life_days": 30}},
        "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.02, "windows": [[10, 20], [30, 40]]}],
    })
    assert plan.breakpoints(35) == [5.0, 10.0, 11.0, 17.0, 18.0, 20.0, 30.0]
    assert plan.breakpoints(100) == [5.0, 10.0, 11.0, 17.0, 18.0, 20.0, 30.0, 40.0]
    assert plan.breakpoints(30) == [5.0, 10.0, 11.0, 17.0, 18.0, 20.0]  # horizon excluded
    assert no_treatment_plan().breakpoints(100) == []
    stupp = stupp_plan().breakpoints(400)
    assert stupp == sorted(set(stupp)) and 68.0 in stupp and 96.0 in stupp and 101.0 in stupp


def test_chemo_kill_rate_inside_outside_and_summed():
    plan = load_plan({"chemotherapy": [
        {"agent": "a", "kill_rate_per_day": 0.02, "windows": [[10, 20]]},
        {"agent": "b", "kill_rate_per_day": 0.05, "windows": [[15, 25]]},
    ]})
    assert plan.chemo_kill_rate(0, 10) == 0.0
    assert plan.chemo_kill_rate(10, 15) == pytest.approx(0.02)
    assert plan.chemo_kill_rate(15, 20) == pytest.approx(0.07)
    assert plan.chemo_kill_rate(20, 25) == pytest.approx(0.05)
    assert plan.chemo_kill_rate(25, 30) == 0.0
    assert plan.chemo_kill_rate(12, 12) == pytest.approx(0.02)  # zero-length step at a time


def test_chemo_kill_rate_bug_guard():
    plan = load_plan({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.02, "windows": [[10, 20]]}]})
    with pytest.raises(ValueError, match="breakpoints"):
        plan.chemo_kill_rate(5, 15)  # window start inside the step
    with pytest.raises(ValueError, match="breakpoints"):
        plan.chemo_kill_rate(19, 21)  # window end inside the step
    with pytest.raises(ValueError):
        plan.chemo_kill_rate(3, 2)
    assert plan.chemo_kill_rate(10 - 1e-12, 20) == pytest.approx(0.02)  # rounding at an edge is fine


def test_events_after_horizon():
    notes = stupp_plan(28).events_after_horizon(60)
    assert "6 of 30 radiotherapy fractions fall on or after day 60 and are not simulated" in notes
    assert any("cut at day 60" in n for n in notes)
    assert any("6 of 6 temozolomide exposure windows" in n for n in notes)
    assert stupp_plan(28).events_after_horizon(1000) == []
    plan = load_plan({"surgery": [{"day": 90, "extent": 1}]})
    assert any("Surgery on day 90" in n for n in plan.events_after_horizon(60))


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------

_CROSS_FIELD: set[int] = set()


def cross(plan: dict) -> dict:
    """Mark an INVALID plan whose rule JSON Schema cannot express (the schema documents these)."""
    _CROSS_FIELD.add(id(plan))
    return plan


INVALID = [
    # (plan dict, phrases that must appear in the message)
    ({"surgery": [{"day": 5, "extent": 0.5, "extnt": 1}]},
     ["surgery[0].extnt", "unknown key 'extnt'", "allowed keys are: day, resection_mask, extent, removed_to"]),
    ({"treatment": {}}, ["treatment: unknown key 'treatment'", "version, surgery, radiotherapy, chemotherapy"]),
    ({"radiotherapy": rt(delayed_death={"delay_days": 7, "clearance_half_life_days": 30, "x": 1})},
     ["radiotherapy.delayed_death.x: unknown key"]),
    ({"surgery": {"day": 5, "extent": 0.5}}, ["surgery: must be an array", "wrap a single entry"]),
    ({"surgery": [{"day": "five", "extent": 0.5}]}, ["surgery[0].day: must be a number", "string 'five'"]),
    ({"radiotherapy": rt(fractions=True)}, ["radiotherapy.fractions: must be an integer", "boolean"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=-2)}, ["radiotherapy.dose_per_fraction_gy: must be > 0 Gy, got -2"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=0)}, ["radiotherapy.dose_per_fraction_gy: must be > 0 Gy, got 0"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=None, total_dose_gy=-60)}, ["radiotherapy.total_dose_gy: must be > 0 Gy"]),
    ({"surgery": [{"day": -1, "extent": 0.5}]}, ["surgery[0].day: must be >= 0 days, got -1"]),
    ({"radiotherapy": rt(start_day=-3)}, ["radiotherapy.start_day: must be >= 0 days"]),
    ({"radiotherapy": rt(fractions=0)}, ["radiotherapy.fractions: must be >= 1"]),
    ({"radiotherapy": rt(fractions=-5)}, ["radiotherapy.fractions: must be >= 1"]),
    ({"radiotherapy": rt(fractions=2.5)}, ["radiotherapy.fractions: must be an integer, got 2.5"]),
    ({"radiotherapy": rt(total_dose_gy=60)}, ["exactly one of dose_per_fraction_gy and total_dose_gy", "both"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=None)}, ["exactly one of dose_per_fraction_gy and total_dose_gy",
                                                      "neither"]),
    ({"surgery": [{"day": 5, "extent": 0.5, "resection_mask": "m.nii.gz"}]},
     ["surgery[0]: give exactly one of resection_mask", "both"]),
    ({"surgery": [{"day": 5}]}, ["surgery[0]: give exactly one of resection_mask", "neither"]),
    ({"surgery": [{"day": 5, "extent": 1.5}]}, ["surgery[0].extent: must be in (0, 1]", "1.5"]),
    ({"surgery": [{"day": 5, "extent": 0}]}, ["surgery[0].extent: must be in (0, 1]", "got 0"]),
    (cross({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "windows": [[20, 10]]}]}),
     ["chemotherapy[0].windows[0]: start day 20 must be before end day 10"]),
    (cross({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "windows": [[5, 5]]}]}),
     ["start day 5 must be before end day 5"]),
    (cross({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "windows": [[30, 40], [10, 35]]}]}),
     ["chemotherapy[0].windows", "windows[1] = [10, 35) and windows[0] = [30, 40) overlap"]),
    ({"chemotherapy": [{"agent": "a", "kill_rate_per_day": -0.1, "windows": [[1, 2]]}]},
     ["chemotherapy[0].kill_rate_per_day: must be >= 0 /day"]),
    ({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1}]}, ["chemotherapy[0]: give the exposure as windows"]),
    ({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "windows": [[1, 2]], "cycles": 2}]},
     ["not both"]),
    ({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "start_day": 1, "cycles": 2}]},
     ["missing: days_on, cycle_length_days"]),
    (cross({"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0.1, "start_day": 1, "cycles": 2, "days_on": 5,
                              "cycle_length_days": 3}]}), ["cycle_length_days: must be >= days_on (5 days)"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=30, fractions=2)},
     ["dose_per_fraction_gy", "exceeds the plausibility limit of 25 Gy per fraction"]),
    (cross({"radiotherapy": rt(dose_per_fraction_gy=5, fractions=30)}),
     ["5 Gy x 30 fractions = 150 Gy exceeds the plausibility limit of 120 Gy"]),
    ({"radiotherapy": rt(dose_per_fraction_gy=None, total_dose_gy=150)},
     ["total_dose_gy", "plausibility limit of 120 Gy"]),
    (cross({"radiotherapy": rt(dose_per_fraction_gy=None, total_dose_gy=100, fractions=2)}),
     ["50 Gy per fraction exceeds the plausibility limit of 25 Gy"]),
    ({"radiotherapy": rt(alpha_per_gy=3)}, ["radiotherapy.alpha_per_gy", "plausibility limit of 1 /Gy"]),
    ({"radiotherapy": rt(fractions_per_week=8)}, ["fractions_per_week: must be between 1 and 7"]),
    ({"radiotherapy": rt(fractions_per_week=0)}, ["fractions_per_week: must be between 1 and 7"]),
    ({"radiotherapy": rt(fraction_days=[1, 2])}, ["start_day: cannot be combined with fraction_days"]),
    (cross({"radiotherapy": rt(start_day=None, fraction_days=[1, 2, 3])}), ["fractions: is 30 but fraction_days lists 3"]),
    ({"radiotherapy": rt(start_day=None)}, ["radiotherapy.start_day: is required"]),
    ({"radiotherapy": rt(delayed_death={"delay_days": -1, "clearance_half_life_days": 0})},
     ["delayed_death.delay_days: must be >= 0", "clearance_half_life_days: must be > 0"]),
    ({"radiotherapy": rt(alpha_beta_gy=0)}, ["alpha_beta_gy: must be > 0 Gy"]),
    ({"version": 2}, ["version: unsupported plan format version 2", "reads version 1"]),
    (cross({"radiotherapy": rt(start_day=float("nan"))}), ["start_day: must be a finite number"]),
    ([1, 2], ["must be a JSON object"]),
]


@pytest.mark.parametrize("plan, phrases", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_validation_errors(plan, phrases):
    message = problems_of(plan)
    for phrase in phrases:
        assert phrase in message


def test_all_problems_reported_one_per_line():
    with pytest.raises(PlanError) as info:
        validate_plan_dict({
            "surgery": [{"day": -1, "extent": 2}],
            "radiotherapy": rt(dose_per_fraction_gy=-2, colour="red"),
            "chemotherapy": [{"agent": "a", "kill_rate_per_day": -1, "windows": [[5, 1]]}],
        })
    lines = str(info.value).splitlines()
    assert lines[0].startswith("Invalid treatment plan (6 problems)")
    assert len(lines) == 7 and len(info.value.problems) == 6
    assert "  radiotherapy.dose_per_fraction_gy: must be > 0 Gy, got -2" in lines


def test_removed_to_checked_against_schema():
    plan = {"surgery": [{"day": 5, "extent": 0.9, "removed_to": "csf_cavity"}]}
    validate_plan_dict(plan)  # without a schema any name is accepted
    message = problems_of(plan, schema=BRAIN_SCHEMA)
    assert "surgery[0].removed_to: unknown class 'csf_cavity'" in message and "white_matter" in message
    assert "cannot be the tumour class" in problems_of(
        {"surgery": [{"day": 5, "extent": 0.9, "removed_to": "tumour"}]}, schema=BRAIN_SCHEMA)
    ok = load_plan({"surgery": [{"day": 5, "extent": 0.9, "removed_to": "Cavity"}]}, schema=BRAIN_SCHEMA)
    assert ok.surgeries[0].removed_to == "background"  # synonym made canonical
    with pytest.raises(PlanError, match="unknown class"):
        load_plan(TreatmentPlan(surgeries=(Surgery(day=1, extent=0.5, removed_to="nope"),)), schema=BRAIN_SCHEMA)


def test_after_horizon_is_not_an_error():
    plan = load_plan({"radiotherapy": rt(start_day=5000)})
    assert plan.breakpoints(100) == []
    assert "30 of 30 radiotherapy fractions" in plan.events_after_horizon(100)[0]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write_plan(tmp_path, '{\n  "version": 1,\n  "surgery": [\n    {"day": 5 "extent": 0.9}\n  ]\n}\n')
    with pytest.raises(PlanError) as info:
        load_plan(path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message and "column 15" in message


def test_json_comments_and_duplicate_keys(tmp_path):
    with pytest.raises(PlanError, match="comments"):
        load_plan(write_plan(tmp_path, '{"version": 1 // the version\n}', "c.json"))
    with pytest.raises(PlanError, match="'version' appears twice"):
        load_plan(write_plan(tmp_path, '{"version": 1, "version": 1}', "d.json"))


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "nope.json")


def test_error_names_plan_file(tmp_path):
    path = write_plan(tmp_path, {"radiotherapy": rt(dose_per_fraction_gy=-2)})
    with pytest.raises(PlanError, match=re.escape(str(path))):
        load_plan(path)


def test_relative_paths_resolved_against_plan_directory(tmp_path, monkeypatch):
    plan_dir = tmp_path / "patient" / "plans"
    plan_dir.mkdir(parents=True)
    (plan_dir / "cavity.nii.gz").write_bytes(b"placeholder")
    (tmp_path / "patient" / "dose.nrrd").write_bytes(b"placeholder")
    path = write_plan(plan_dir, {"surgery": [{"day": 5, "resection_mask": "cavity.nii.gz"}],
                                 "radiotherapy": rt(dose_map="../dose.nrrd")})
    monkeypatch.chdir(tmp_path)  # must not matter
    plan = load_plan(path)
    assert plan.surgeries[0].resection_mask == str(plan_dir / "cavity.nii.gz")
    assert plan.radiotherapy.dose_map == str(tmp_path / "patient" / "dose.nrrd")


def test_missing_referenced_file_is_an_error(tmp_path):
    path = write_plan(tmp_path, {"surgery": [{"day": 5, "resection_mask": "cavity.nii.gz"}]})
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert "surgery[0].resection_mask: resection mask file not found" in str(info.value)
    assert str(tmp_path / "cavity.nii.gz") in str(info.value)


# ---------------------------------------------------------------------------------------------
# Round trip, arrays, schema, LQ
# ---------------------------------------------------------------------------------------------

def test_to_dict_round_trip(tmp_path):
    (tmp_path / "cavity.nii.gz").write_bytes(b"x")
    original = load_plan(write_plan(tmp_path, {
        "surgery": [{"day": 5, "resection_mask": "cavity.nii.gz", "removed_to": "background"},
                    {"day": 2.5, "extent": 0.4}],
        "radiotherapy": rt(alpha_beta_gy=3.0, alpha_per_gy=0.07,
                           delayed_death={"delay_days": 7, "clearance_half_life_days": 30}),
        "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.03, "start_day": 98, "cycles": 2,
                          "days_on": 5, "cycle_length_days": 28}],
    }))
    for plan in (original, stupp_plan(14.5), no_treatment_plan()):
        d = plan.to_dict()
        text = json.dumps(d)  # JSON-serialisable
        assert load_plan(json.loads(text)) == plan
        assert load_plan(write_plan(tmp_path, text, "rt.json")) == plan


def test_arrays_from_python_and_placeholder():
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    dose = np.full((4, 4, 4), 60.0)
    plan = load_plan({"surgery": [{"day": 5, "resection_mask": mask}],
                      "radiotherapy": rt(dose_map=dose)})
    assert plan.surgeries[0].resection_mask.sum() == 8
    assert not plan.surgeries[0].resection_mask.flags.writeable
    np.testing.assert_allclose(plan.radiotherapy.dose_per_fraction_field(), 2.0)
    d = plan.to_dict()
    assert d["surgery"][0]["resection_mask"] == "<array>" and d["radiotherapy"]["dose_map"] == "<array>"
    with pytest.raises(PlanError, match="placeholder"):
        load_plan(d)
    assert "boolean array" in problems_of({"surgery": [{"day": 5, "resection_mask": mask.astype(int)}]})
    assert "empty" in problems_of({"surgery": [{"day": 5, "resection_mask": np.zeros(3, bool)}]})
    assert "cGy" in problems_of({"radiotherapy": rt(dose_map=dose * 100)})


def test_with_loaded_arrays(tmp_path):
    (tmp_path / "cavity.nii.gz").write_bytes(b"x")
    (tmp_path / "dose.nrrd").write_bytes(b"x")
    plan = load_plan(write_plan(tmp_path, {"surgery": [{"day": 5, "resection_mask": "cavity.nii.gz"}],
                                           "radiotherapy": rt(dose_map="dose.nrrd")}))
    with pytest.raises(ValueError, match="not been loaded"):
        plan.radiotherapy.dose_per_fraction_field()
    images = {"resection_mask": np.pad(np.ones((2, 2, 2), np.uint8), 1), "dose_map": np.full((4, 4, 4), 30.0)}
    calls = []

    def loader(path, kind):
        calls.append((Path(path).name, kind))
        return images[kind]

    loaded = plan.with_loaded_arrays(loader, grid_shape=(4, 4, 4))
    assert sorted(calls) == [("cavity.nii.gz", "resection_mask"), ("dose.nrrd", "dose_map")]
    assert loaded.surgeries[0].resection_mask.dtype == bool
    np.testing.assert_allclose(loaded.radiotherapy.dose_per_fraction_field(), 1.0)
    with pytest.raises(PlanError, match="shape"):
        plan.with_loaded_arrays(loader, grid_shape=(5, 5, 5))


def test_json_schema_accepts_docs_examples_and_matches_loader(tmp_path):
    jsonschema.Draft202012Validator.check_schema(PLAN_JSON_SCHEMA)
    examples = docs_examples()
    assert len(examples) >= 3
    (tmp_path / "cavity.nii.gz").write_bytes(b"x")
    (tmp_path / "dose.nrrd").write_bytes(b"x")
    for i, example in enumerate(examples):
        jsonschema.validate(example, PLAN_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
        load_plan(write_plan(tmp_path, example, f"example{i}.json"))
    assert load_plan(examples[1]) == stupp_plan(28.0)  # the documented Stupp example


def test_json_schema_rejects_unknown_key_and_agrees_on_invalid_plans():
    validator = jsonschema.Draft202012Validator(PLAN_JSON_SCHEMA)
    assert not validator.is_valid({"version": 1, "radiotherapy": rt(dose_gy=2)})
    assert not validator.is_valid({"version": 1, "foo": 1})
    schema_expressible = [p for p, _ in INVALID if isinstance(p, dict) and id(p) not in _CROSS_FIELD]
    assert len(schema_expressible) > 25
    for plan in schema_expressible:
        assert not validator.is_valid(plan), plan
    assert validator.is_valid(stupp_plan().to_dict())


VALID = [
    {},
    {"version": 1, "surgery": None, "radiotherapy": None, "chemotherapy": None},
    {"surgery": [{"day": 0, "extent": 1}, {"day": 3.5, "resection_mask": "/abs/m.nii.gz", "removed_to": "x"}]},
    {"radiotherapy": {"fraction_days": [1, 1, 2], "fractions": 3, "total_dose_gy": 12}},
    {"radiotherapy": {"fraction_days": [4], "dose_per_fraction_gy": 25}},
    {"radiotherapy": rt(fractions_per_week=7, alpha_per_gy=1, alpha_beta_gy=2.5, fractions=30.0)},
    {"chemotherapy": [{"agent": "a", "kill_rate_per_day": 0, "windows": [[0, 1], [1, 2.5]]},
                      {"agent": "b", "kill_rate_per_day": 0.1, "start_day": 0, "cycles": 1, "days_on": 1,
                       "cycle_length_days": 1}]},
]


@pytest.mark.parametrize("plan", VALID, ids=[str(i) for i in range(len(VALID))])
def test_valid_plans_pass_loader_and_json_schema(plan):
    validate_plan_dict(plan)
    jsonschema.validate(plan, PLAN_JSON_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_survival_fraction_is_linear_quadratic():
    r = Radiotherapy(fraction_days=(1.0,), dose_per_fraction_gy=2.0, alpha_per_gy=0.3, beta_per_gy2=0.03)
    for d in (0.0, 2.0, 5.5):
        assert r.survival_fraction(d) == pytest.approx(math.exp(-0.3 * d - 0.03 * d * d), rel=1e-12)
    doses = np.array([[0.0, 1.0], [2.0, 8.0]])
    np.testing.assert_allclose(r.survival_fraction(doses), np.exp(-0.3 * doses - 0.03 * doses ** 2), rtol=1e-12)
    assert isinstance(r.survival_fraction(2.0), float)
    assert r.dose_per_fraction_field() == 2.0


def test_plan_summary():
    text = plan_summary(load_plan({"surgery": [{"day": 5, "extent": 0.9}],
                                   "radiotherapy": rt(),
                                   "chemotherapy": stupp_plan().to_dict()["chemotherapy"]}))
    assert text.startswith("Surgery on day 5 (extent 90%); RT 60.0 Gy in 30 fractions, days 28-67")
    assert "TMZ 0.02/day on days 28-67" in text and "6 windows" in text and "\n" not in text


def test_dataclasses_normalise_and_compare():
    c = Chemotherapy(agent="x", kill_rate_per_day=1, windows=[(5, 6), (1, 2)])
    assert c.windows == ((1.0, 2.0), (5.0, 6.0))
    p = TreatmentPlan(surgeries=[Surgery(day=9, extent=0.5), Surgery(day=2, extent=0.5)], source="a")
    assert [s.day for s in p.surgeries] == [2.0, 9.0]
    assert p == TreatmentPlan(surgeries=(Surgery(day=2, extent=0.5), Surgery(day=9, extent=0.5)), source="b")
    m = np.ones(3, bool)
    assert Surgery(day=1, resection_mask=m) == Surgery(day=1, resection_mask=m.copy())
    assert Surgery(day=1, resection_mask=m) != Surgery(day=1, resection_mask=~m)
