"""Static checks of the 3D Slicer module files (no Slicer, no Qt needed).

* AnatomyDT/AnatomyDT.py compiles;
* every ``SlicerParameterName`` dynamic property in the .ui names a field of the
  ``@parameterNodeWrapper`` class (found by parsing AnatomyDT.py with ast), and each bound widget
  has a type the wrapper can connect to that field's type;
* the "Calibrate on earlier scans" section and the growth-probability map option are bound to
  their parameters, every node selector gets the scene, every ``p.<field>`` the module reads is a
  field of the wrapper, and every ``scene.<function>(...)`` it calls exists in AnatomyDTLib/scene.py
  and takes the keywords it is given (both found by parsing, no Slicer needed);
* every file the CMakeLists.txt files list exists, and every file of the module folder is listed;
* the ExtensionsIndex entry is valid JSON with the fields the catalog schema requires.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "AnatomyDT"
MODULE_PY = MODULE_DIR / "AnatomyDT.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AnatomyDT.ui"
SCENE_PY = ROOT / "AnatomyDTLib" / "scene.py"

# Widget classes the parameterNodeWrapper's GUI connectors bind, per field type.
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _wrapper_fields(source: str) -> dict[str, str]:
    """Field name -> base type name of every class decorated with @parameterNodeWrapper."""
    tree = ast.parse(source)
    fields: dict[str, str] = {}
    found = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = [d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list]
        if "parameterNodeWrapper" not in decorators:
            continue
        found = True
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                fields[stmt.target.id] = _base_type(stmt.annotation)
    assert found, "no @parameterNodeWrapper class in AnatomyDT.py"
    return fields


def _base_type(annotation: ast.expr) -> str:
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        first = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
        return _base_type(first)
    name = annotation.id if isinstance(annotation, ast.Name) else getattr(annotation, "attr", "")
    return "node" if name.startswith("vtkMRML") else name


def _ui_bindings() -> list[tuple[str, str, str]]:
    """(widget class, widget name, SlicerParameterName) for every bound widget of the .ui."""
    bindings = []
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.append((widget.get("class"), widget.get("name"), prop.findtext("string")))
    return bindings


def test_module_compiles():
    py_compile.compile(str(MODULE_PY), doraise=True)


def test_ui_parameter_names_match_the_parameter_node_wrapper():
    fields = _wrapper_fields(MODULE_PY.read_text(encoding="utf-8"))
    bindings = _ui_bindings()
    assert len(bindings) >= 20
    unknown = [(name, param) for _, name, param in bindings if param not in fields]
    assert not unknown, f".ui widgets bound to parameters the wrapper does not have: {unknown}"
    wrong = [(cls, name, param, fields[param]) for cls, name, param in bindings
             if cls not in CONNECTABLE.get(fields[param], set())]
    assert not wrong, f"widgets that cannot represent their parameter's type: {wrong}"
    params = [param for _, _, param in bindings]
    assert len(params) == len(set(params)), "a parameter is bound to two widgets"


def test_ui_widgets_used_by_the_module_exist():
    names = {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
    assert used - names == set()


# widget -> (class, parameter) of the calibration section and the probability-map option.
HISTORY_WIDGETS = {
    "calibrateEnabledCheckBox": ("QCheckBox", "calibrateEnabled"),
    "historySourceComboBox": ("QComboBox", "historySource"),
    "earlierSegmentation1Selector": ("qMRMLNodeComboBox", "earlierSegmentation1"),
    "earlierSegmentation2Selector": ("qMRMLNodeComboBox", "earlierSegmentation2"),
    "earlierSegmentation3Selector": ("qMRMLNodeComboBox", "earlierSegmentation3"),
    "earlierDay1SpinBox": ("QDoubleSpinBox", "earlierDay1"),
    "earlierDay2SpinBox": ("QDoubleSpinBox", "earlierDay2"),
    "earlierDay3SpinBox": ("QDoubleSpinBox", "earlierDay3"),
    "baselineDaySpinBox": ("QDoubleSpinBox", "baselineDay"),
    "historySequenceSelector": ("qMRMLNodeComboBox", "historySequence"),
    "historySequenceDaysLineEdit": ("QLineEdit", "historySequenceDays"),
    "calibrationIterationsSpinBox": ("QSpinBox", "calibrationIterations"),
    "calibrationAlphaComboBox": ("QComboBox", "calibrationAlpha"),
    "calibrationDeathDelaySpinBox": ("QDoubleSpinBox", "calibrationDeathDelay"),
    "calibrationClearanceHalfLifeSpinBox": ("QDoubleSpinBox", "calibrationClearanceHalfLife"),
    "calibrationHypoxiaOERSpinBox": ("QDoubleSpinBox", "calibrationHypoxiaOER"),
    "probabilityMapCheckBox": ("QCheckBox", "probabilityMapEnabled"),
    "probabilityMembersSpinBox": ("QSpinBox", "probabilityMembers"),
}


def _parents(root: ET.Element) -> dict:
    return {child: parent for parent in root.iter() for child in parent}


def test_calibration_section_and_probability_map_option_are_bound():
    root = ET.parse(UI_FILE).getroot()
    bindings = {name: (cls, param) for cls, name, param in _ui_bindings()}
    for name, expected in HISTORY_WIDGETS.items():
        assert bindings.get(name) == expected, name
    parents = _parents(root)
    section = next(w for w in root.iter("widget") if w.get("name") == "calibrationCollapsibleButton")
    assert section.get("class") == "ctkCollapsibleButton"
    assert section.find("property[@name='text']/string").text == "Calibrate on earlier scans"
    inside = {w.get("name") for w in section.iter("widget")}
    assert {n for n in HISTORY_WIDGETS if not n.startswith("probability")} <= inside
    prediction = next(w for w in root.iter("widget") if w.get("name") == "predictionCollapsibleButton")
    assert {"probabilityMapCheckBox", "probabilityMembersSpinBox"} <= {w.get("name") for w in prediction.iter("widget")}
    # The section sits between the treatment and the prediction sections.
    order = [w.get("name") for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"
             and parents.get(parents.get(w)) is root.find("widget/layout")]
    assert order == ["inputsCollapsibleButton", "classesCollapsibleButton", "treatmentCollapsibleButton",
                     "calibrationCollapsibleButton", "predictionCollapsibleButton"]
    # Each form row holds one widget per cell.
    for layout in root.iter("layout"):
        cells = [(item.get("row"), item.get("column")) for item in layout.findall("item") if item.get("row")]
        assert len(cells) == len(set(cells)), f"two widgets in one cell of {layout.get('name')}"
    source = MODULE_PY.read_text(encoding="utf-8")
    assert "calibrationCollapsibleButton" in source  # disabled while running


def test_every_node_selector_gets_the_scene():
    root = ET.parse(UI_FILE).getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors - connected == set()


def test_parameter_fields_read_by_the_module_exist():
    source = MODULE_PY.read_text(encoding="utf-8")
    fields = _wrapper_fields(source)
    used = set(re.findall(r"\bp\.(\w+)", source))
    assert used - set(fields) == set()
    slots = int(re.search(r"EARLIER_SCAN_SLOTS = (\d+)", source).group(1))
    for i in range(1, slots + 1):
        assert {f"earlierSegmentation{i}", f"earlierDay{i}"} <= set(fields)
        assert fields[f"earlierSegmentation{i}"] == "node" and fields[f"earlierDay{i}"] == "float"


def _scene_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(SCENE_PY.read_text(encoding="utf-8"))
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_scene_calls_of_the_module_exist_and_take_their_keywords():
    functions = _scene_functions()
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "scene"]
    names = {c.func.attr for c in calls}
    assert {"predict_into_scene", "calibrate_into_scene", "probability_map_into_scene",
            "history_from_sequence", "remove_outputs"} <= names
    for call in calls:
        assert call.func.attr in functions, f"AnatomyDTLib.scene has no function {call.func.attr}"
        args = functions[call.func.attr].args
        accepted = {a.arg for a in args.args + args.kwonlyargs}
        given = {k.arg for k in call.keywords if k.arg is not None}
        assert given <= accepted, (call.func.attr, given - accepted)
        assert len(call.args) <= len(args.args), call.func.attr
    # The logic methods call the scene entry points of their feature.
    methods = {n.name: ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "scene.calibrate_into_scene(" in methods["runCalibration"]
    assert "scene.probability_map_into_scene(" in methods["runProbabilityMap"]
    assert "scene.predict_into_scene(" in methods["runPrediction"]
    assert "scene.remove_outputs(" in methods["run"]


def _cmake_list(text: str, variable: str, substitutions: dict[str, str]) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    items = match.group(1).split()
    for key, value in substitutions.items():
        items = [i.replace("${" + key + "}", value) for i in items]
    return items


def test_cmake_lists_exactly_the_module_files():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    assert name == "AnatomyDT"
    listed = _cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": name}) + \
        _cmake_list(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": name})
    missing = [f for f in listed if not (MODULE_DIR / f).is_file()]
    assert not missing, f"CMake lists files that do not exist: {missing}"
    on_disk = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt")
    assert sorted(listed) == on_disk
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "ctkMacroCompilePythonScript" in text and "AnatomyDTLib/*.py" in text  # library installed next to it
    assert (ROOT / "AnatomyDTLib" / "__init__.py").is_file()


def test_top_level_cmake_and_extension_index_entry():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(AnatomyDT)" in text
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf"set\(EXTENSION_{key}\s+\"[^\"]+\"\)", text), key
    entry = json.loads((ROOT / "AnatomyDT.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-")
    assert {"category", "scm_url"} <= set(entry)
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier", "enabled"}
    assert entry["build_dependencies"] == ["PyTorch"]


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "AnatomyDT.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_module_never_installs_at_import():
    """pip_install / installTorch are called only inside AnatomyDTLogic.ensureRequirements, after asking."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    installers = {"pip_install", "installTorch"}
    calls_by_function: dict[str, set[str]] = {}

    def visit(node, function="<module>"):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call):
                name = child.func.attr if isinstance(child.func, ast.Attribute) else getattr(child.func, "id", "")
                if name in installers:
                    calls_by_function.setdefault(function, set()).add(name)
            visit(child, function)

    visit(tree)
    assert set(calls_by_function) == {"ensureRequirements"}, calls_by_function
    assert calls_by_function["ensureRequirements"] == installers
    ensure = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "ensureRequirements")
    assert "confirmOkCancelDisplay" in ast.unparse(ensure)
