"""Package-level promises: importable without torch, Slicer or Qt."""

import subprocess
import sys


def test_importing_the_package_and_plan_reading_does_not_import_torch_or_slicer():
    # The Slicer module reads segment names and plans before the user agrees to install PyTorch.
    code = ("import sys, AnatomyDTLib, AnatomyDTLib.plan, AnatomyDTLib.schema; "
            "print(sorted(m for m in ('torch', 'slicer', 'qt', 'vtk') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_simulate_is_available_from_the_package():
    import AnatomyDTLib

    assert callable(AnatomyDTLib.simulate)
    assert AnatomyDTLib.simulate.__module__ == "AnatomyDTLib.solver"
