"""AnatomyDT: predict future brain-tumour anatomy under treatment, in 3D Slicer.

The widget only collects parameters (through a parameterNodeWrapper parameter node) and shows
progress; all scene work is in the qt-free ``AnatomyDTLib.scene`` module, which is tested on a
real MRML scene outside Slicer (``Testing/test_scene.py``).

Nothing is installed at import or in the module constructor. PyTorch (through the PyTorch
extension) and missing Python packages are installed only when the user clicks Apply and agrees.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLSequenceNode

try:  # Slicer >= 5.4
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer
    def _(text):
        return text


def _ensureLibraryImportable():
    """Make ``AnatomyDTLib`` importable: in a built extension it sits next to this module (already on
    sys.path); in a source checkout used through "Additional module paths" it is in the parent folder."""
    if importlib.util.find_spec("AnatomyDTLib") is not None:
        return
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(parent, "AnatomyDTLib")) and parent not in sys.path:
        sys.path.insert(0, parent)


_ensureLibraryImportable()

TORCH_REQUIREMENT = ">=2.1"
# import name -> pip requirement of what AnatomyDTLib needs at run time besides torch.
PYTHON_REQUIREMENTS = {
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "SimpleITK": "SimpleITK>=2.2",
    "numba": "numba>=0.59",  # the fused solver kernel; without it predictions take the (slower) torch path
}
CLASS_IGNORE = "(ignore)"
CLASS_NAMES = ("background", "tumour", "white_matter", "grey_matter", "lateral_ventricles")  # BRAIN_SCHEMA order
EARLIER_SCAN_SLOTS = 3  # earlier-scan rows of the "Calibrate on earlier scans" section


#
# AnatomyDT
#


class AnatomyDT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AnatomyDT")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Sequences"]  # sequence outputs, history sequences (vtkMRMLSequenceNode)
        self.parent.contributors = ["AnatomyDT developers (PLACEHOLDER_ORGANISATION)"]
        self.parent.helpText = _("""
Predicts how a brain-tumour patient's anatomy (tumour, white matter, cortical grey matter, lateral
ventricles) will look days to months after a baseline scan, under a treatment plan (surgery,
radiotherapy, chemotherapy). Select the baseline segmentation and the FLAIR it was drawn on, check
the segment-to-class table, enter the treatment and the horizon, and click Apply. The result is a
new segmentation per time point, a tumour-probability overlay, and a table and chart of volumes.
With earlier scans of the patient, the model can be calibrated on them first, and a
growth-probability map can be made from their tumour volumes.
<b>Research software: not for clinical decisions.</b>
See <a href="PLACEHOLDER_HOMEPAGE_URL/blob/main/docs/slicer.md">the AnatomyDT Slicer guide</a>.
""")
        self.parent.acknowledgementText = _("""
AnatomyDT implements the method of: Bhattacharya, Singh &amp; Prasanna, "Anatomy-DT: a
cross-diffusion digital twin for anatomical evolution". Anatomy is a multi-class probability field
on the simplex, evolved by a cross-diffusion reaction-diffusion PDE with a differentiable IMEX solver.
""")


#
# Parameter node
#


@parameterNodeWrapper
class AnatomyDTParameterNode:
    """Everything the panel shows. Node references are kept with the scene."""

    inputSegmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    classMapJson: str = ""  # {segment ID: class name or "(ignore)"}, edited through the class table
    completeAnatomy: bool = False

    surgeryEnabled: bool = False
    surgeryDay: Annotated[float, WithinRange(0.0, 3650.0)] = 5.0
    surgeryUseSegment: bool = False
    resectionSegmentation: vtkMRMLSegmentationNode
    resectionSegmentID: str = ""
    surgeryExtentPercent: Annotated[float, WithinRange(1.0, 100.0)] = 90.0

    rtEnabled: bool = False
    rtStartDay: Annotated[float, WithinRange(0.0, 3650.0)] = 28.0
    rtTotalDoseGy: Annotated[float, WithinRange(0.1, 120.0)] = 60.0
    rtFractions: Annotated[int, WithinRange(1, 100)] = 30
    rtFractionsPerWeek: Annotated[int, WithinRange(1, 7)] = 5
    rtUseDoseVolume: bool = False
    rtDoseVolume: vtkMRMLScalarVolumeNode

    chemoEnabled: bool = False
    chemoKillRatePerDay: Annotated[float, WithinRange(0.0, 5.0)] = 0.02
    chemoConcurrentStartDay: Annotated[float, WithinRange(0.0, 3650.0)] = 28.0
    chemoConcurrentDays: Annotated[float, WithinRange(0.0, 3650.0)] = 40.0
    chemoAdjuvantStartDay: Annotated[float, WithinRange(0.0, 3650.0)] = 96.0
    chemoAdjuvantCycles: Annotated[int, WithinRange(0, 100)] = 6
    chemoDaysOn: Annotated[float, WithinRange(1.0, 365.0)] = 5.0
    chemoCycleLengthDays: Annotated[float, WithinRange(1.0, 365.0)] = 28.0

    horizonValue: Annotated[float, WithinRange(1.0, 3650.0)] = 90.0
    horizonUnit: Annotated[str, Choice(["days", "weeks"])] = "days"
    intermediateTimePoints: str = ""

    modelChoice: Annotated[str, Choice(["default", "pde-only", "file"])] = "default"
    modelFile: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    replaceOutputs: bool = False
    # Closed surfaces for the 3D views: Slicer's surface smoothing takes ~2 s per time point on a
    # 1 mm brain, more than the forecast (docs/performance.md, "In Slicer")
    createSurfaces: bool = True

    # Earlier scans: calibration and the growth-probability map. Scan and treatment days count on
    # one axis, the plan's; the baseline segmentation is the latest scan, on day baselineDay.
    calibrateEnabled: bool = False
    historySource: Annotated[str, Choice(["segmentations", "sequence"])] = "segmentations"
    earlierSegmentation1: vtkMRMLSegmentationNode
    earlierDay1: Annotated[float, WithinRange(0.0, 3650.0)] = 0.0
    earlierSegmentation2: vtkMRMLSegmentationNode
    earlierDay2: Annotated[float, WithinRange(0.0, 3650.0)] = 0.0
    earlierSegmentation3: vtkMRMLSegmentationNode
    earlierDay3: Annotated[float, WithinRange(0.0, 3650.0)] = 0.0
    baselineDay: Annotated[float, WithinRange(0.0, 3650.0)] = 0.0
    historySequence: vtkMRMLSequenceNode
    historySequenceDays: str = ""  # empty: the sequence's index values (numbers of days)
    calibrationIterations: Annotated[int, WithinRange(0, 500)] = 30
    calibrationAlpha: Annotated[str, Choice(["scalar", "field"])] = "scalar"
    # Delayed death of irradiated cells (days), assumed when the plan gives none (docs/calibration.md).
    calibrationDeathDelay: Annotated[float, WithinRange(0.0, 120.0)] = 14.0
    calibrationClearanceHalfLife: Annotated[float, WithinRange(1.0, 365.0)] = 21.0
    # Hypoxic radioresistance of densely packed tumour (oxygen enhancement ratio), assumed when the
    # plan gives none; 1 = none (the default: it made more held-out forecasts worse than better).
    calibrationHypoxiaOER: Annotated[float, WithinRange(1.0, 4.0)] = 1.0
    # How sure the calibrated forecast is: forecasts over the delayed-death priors (0 = off; 1 is
    # not an ensemble and is refused by the logic).
    calibrationEnsembleMembers: Annotated[int, WithinRange(0, 256)] = 0

    probabilityMapEnabled: bool = False
    probabilityMembers: Annotated[int, WithinRange(1, 200)] = 20


#
# Widget
#


class AnatomyDTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: collects parameters and calls AnatomyDTLogic.run; no scene logic here."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._observedSegmentations = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomyDT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnatomyDTLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.presetNoneButton.connect("clicked(bool)", lambda _checked: self.applyPreset("none"))
        self.ui.presetStuppButton.connect("clicked(bool)", lambda _checked: self.applyPreset("stupp"))
        self.ui.refreshClassesButton.connect("clicked(bool)", self.refreshClassTable)
        self.ui.resectionSegmentComboBox.connect("currentIndexChanged(int)", self.onResectionSegmentChanged)
        self.ui.modelFilePathLineEdit.connect("currentPathChanged(QString)", self.onModelFileChanged)
        self.ui.progressBar.hide()
        self.ui.classTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.classTableWidget.verticalHeader().visible = False

        self._updateCompletionOption()
        self.initializeParameterNode()
        self.logic.startKernelWarmUp()

    def _updateCompletionOption(self):
        available = self.logic.completionAvailable()
        self.ui.completeAnatomyCheckBox.enabled = available
        self.ui.completeAnatomyCheckBox.toolTip = (
            _("Fill missing white matter, grey matter and ventricles from the brain atlas.") if available else
            _("Anatomy completion is not available: AnatomyDTLib.brain.completion is not installed in this "
              "version (or PyTorch is not installed yet). Segment all classes instead."))
        if not available and self._parameterNode is not None and self._parameterNode.completeAnatomy:
            self._parameterNode.completeAnatomy = False

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self._updateCompletionOption()
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputSegmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                self._parameterNode.inputSegmentation = node
        if not self._parameterNode.referenceVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.referenceVolume = node

    def setParameterNode(self, parameterNode: Optional[AnatomyDTParameterNode]):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self.ui.modelFilePathLineEdit.currentPath = self._parameterNode.modelFile
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        self._observeSegmentations([p.inputSegmentation, p.resectionSegmentation])
        if self.ui.classTableWidget.property("segmentationID") != (p.inputSegmentation.GetID()
                                                                    if p.inputSegmentation else ""):
            self.refreshClassTable()
        self._refreshResectionSegments()
        self.ui.surgeryExtentSpinBox.enabled = p.surgeryEnabled and not p.surgeryUseSegment
        self.ui.resectionSegmentationSelector.enabled = p.surgeryEnabled and p.surgeryUseSegment
        self.ui.resectionSegmentComboBox.enabled = p.surgeryEnabled and p.surgeryUseSegment
        self.ui.rtDoseVolumeSelector.enabled = p.rtEnabled and p.rtUseDoseVolume
        self.ui.modelFilePathLineEdit.enabled = p.modelChoice == "file" and not p.calibrateEnabled
        self._updateHistoryWidgets()
        self._updateApplyButton()

    def _updateHistoryWidgets(self):
        """Earlier-scan rows are used by calibration and by the growth-probability map."""
        p = self._parameterNode
        useHistory = p.calibrateEnabled or p.probabilityMapEnabled
        bySequence = p.historySource == "sequence"
        for i in range(1, EARLIER_SCAN_SLOTS + 1):
            getattr(self.ui, f"earlierSegmentation{i}Selector").enabled = useHistory and not bySequence
            getattr(self.ui, f"earlierDay{i}SpinBox").enabled = useHistory and not bySequence
        self.ui.baselineDaySpinBox.enabled = not bySequence
        self.ui.historySequenceSelector.enabled = useHistory and bySequence
        self.ui.historySequenceDaysLineEdit.enabled = useHistory and bySequence
        self.ui.calibrationIterationsSpinBox.enabled = p.calibrateEnabled
        self.ui.calibrationAlphaComboBox.enabled = p.calibrateEnabled
        self.ui.calibrationDeathDelaySpinBox.enabled = p.calibrateEnabled
        self.ui.calibrationClearanceHalfLifeSpinBox.enabled = p.calibrateEnabled
        self.ui.calibrationEnsembleMembersSpinBox.enabled = p.calibrateEnabled
        self.ui.modelComboBox.enabled = not p.calibrateEnabled  # calibration fits its own PDE
        self.ui.deviceComboBox.enabled = not p.calibrateEnabled
        self.ui.probabilityMembersSpinBox.enabled = p.probabilityMapEnabled

    _SEGMENT_EVENTS = ("SegmentAdded", "SegmentRemoved", "SegmentModified")

    def _observeSegmentations(self, nodes):
        """Refresh the tables when segments are added, removed or renamed (not on every paint stroke)."""
        wanted = [n for n in nodes if n is not None]
        if [n.GetID() for n in wanted] == [n.GetID() for n in self._observedSegmentations]:
            return
        for node in self._observedSegmentations:
            for event in self._SEGMENT_EVENTS:
                self.removeObserver(node, getattr(slicer.vtkSegmentation, event), self._onSegmentationModified)
        for node in wanted:
            for event in self._SEGMENT_EVENTS:
                self.addObserver(node, getattr(slicer.vtkSegmentation, event), self._onSegmentationModified)
        self._observedSegmentations = wanted

    def _onSegmentationModified(self, caller=None, event=None):
        if not self._running:
            self.refreshClassTable()
            self._refreshResectionSegments()

    def _updateApplyButton(self):
        if self._running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the prediction; nothing is added to the scene.")
            self.ui.applyButton.enabled = True
            return
        p = self._parameterNode
        ready = bool(p and p.inputSegmentation and p.referenceVolume)
        self.ui.applyButton.text = _("Apply")
        if not ready:
            self.ui.applyButton.toolTip = _("Select the baseline segmentation and the FLAIR volume.")
        elif p.calibrateEnabled:
            self.ui.applyButton.toolTip = _("Calibrate the model on the earlier scans, then forecast from the "
                                            "latest scan to the horizon (and intermediate time points).")
        else:
            self.ui.applyButton.toolTip = _("Predict the anatomy at the horizon (and intermediate time points).")
        if ready and p.probabilityMapEnabled:
            self.ui.applyButton.toolTip += _(" Then make the growth-probability map of the horizon.")
        self.ui.applyButton.enabled = ready

    # -- class table -------------------------------------------------------------------------

    def refreshClassTable(self, *_args):
        """Fill the segment -> class table from segment names and terminology (editable)."""
        p = self._parameterNode
        table = self.ui.classTableWidget
        segmentationNode = p.inputSegmentation if p else None
        table.setProperty("segmentationID", segmentationNode.GetID() if segmentationNode else "")
        table.setRowCount(0)
        if segmentationNode is None:
            self.ui.classStatusLabel.text = ""
            return
        saved = self._savedClassMap()
        rows = self.logic.segmentClasses(segmentationNode, saved)
        table.setRowCount(len(rows))
        for row, (segmentID, name, className, source) in enumerate(rows):
            item = qt.QTableWidgetItem(name)
            item.setData(qt.Qt.UserRole, segmentID)
            item.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, item)
            combo = qt.QComboBox()
            combo.addItems(list(CLASS_NAMES) + [CLASS_IGNORE])
            combo.currentText = className if className else CLASS_IGNORE
            combo.connect("currentIndexChanged(int)", self._onClassChanged)
            table.setCellWidget(row, 1, combo)
            sourceItem = qt.QTableWidgetItem(source)
            sourceItem.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 2, sourceItem)
        self._onClassChanged()

    def _savedClassMap(self):
        p = self._parameterNode
        if p is None or not p.classMapJson:
            return {}
        try:
            saved = json.loads(p.classMapJson)
        except ValueError:
            return {}
        return saved if isinstance(saved, dict) else {}

    def _onClassChanged(self, *_args):
        table = self.ui.classTableWidget
        classMap = {}
        for row in range(table.rowCount):
            segmentID = table.item(row, 0).data(qt.Qt.UserRole)
            classMap[segmentID] = table.cellWidget(row, 1).currentText
        if self._parameterNode is not None:
            text = json.dumps(classMap, sort_keys=True)
            if self._parameterNode.classMapJson != text:
                self._parameterNode.classMapJson = text
        assigned = {c for c in classMap.values() if c != CLASS_IGNORE}
        missing = [c for c in CLASS_NAMES[1:] if c not in assigned]
        unmatched = [table.item(row, 0).text() for row in range(table.rowCount)
                     if table.item(row, 2).text() == "unmatched" and table.cellWidget(row, 1).currentText == CLASS_IGNORE]
        if unmatched:
            self.ui.classStatusLabel.text = _("No class recognised for: ") + ", ".join(unmatched) + _(
                ". Choose their class, or leave them on (ignore).")
        elif "tumour" in missing:
            self.ui.classStatusLabel.text = _("No segment is mapped to 'tumour': a tumour segment is required.")
        elif missing:
            self.ui.classStatusLabel.text = _("Missing classes: ") + ", ".join(missing) + (
                _(" (tick 'Complete missing anatomy' to fill them)") if self.ui.completeAnatomyCheckBox.enabled
                else _(" (they stay background)"))
        else:
            self.ui.classStatusLabel.text = _("All classes are present.")

    # -- treatment ---------------------------------------------------------------------------

    def _refreshResectionSegments(self):
        p = self._parameterNode
        combo = self.ui.resectionSegmentComboBox
        node = p.resectionSegmentation if p else None
        ids = []
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if node is not None:
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segmentID = segmentation.GetNthSegmentID(i)
                combo.addItem(segmentation.GetSegment(segmentID).GetName(), segmentID)
                ids.append(segmentID)
        if p is not None and p.resectionSegmentID in ids:
            combo.currentIndex = ids.index(p.resectionSegmentID)
        combo.blockSignals(wasBlocked)
        if p is not None and ids and p.resectionSegmentID not in ids:
            p.resectionSegmentID = ids[combo.currentIndex if combo.currentIndex >= 0 else 0]

    def onResectionSegmentChanged(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.resectionSegmentID = self.ui.resectionSegmentComboBox.itemData(index) or ""

    def onModelFileChanged(self, path):
        if self._parameterNode is not None:
            self._parameterNode.modelFile = path

    def applyPreset(self, name):
        """Fill the treatment panel from a preset ("none" or "stupp")."""
        for key, value in self.logic.presetParameters(name).items():
            setattr(self._parameterNode, key, value)

    # -- run ---------------------------------------------------------------------------------

    def onApplyButton(self, *_args):
        if self._running:  # the button reads "Cancel" while running
            self._cancelRequested = True
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.logic.ensureRequirements():
            self.ui.statusLabel.text = _("AnatomyDT needs PyTorch and its Python packages; nothing was run.")
            return
        self.logic.startKernelWarmUp()  # just installed: compile in the background, the run waits for it
        self._running, self._cancelRequested = True, False
        self._updateApplyButton()
        self._setInputsEnabled(False)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Calibrating...") if self._parameterNode.calibrateEnabled else _("Predicting...")
        if self.logic.kernelWarmUpPending(self._parameterNode):
            self.ui.statusLabel.text = _("Finishing the one-time compile of the solver (under a minute), then "
                                         "running...")
        try:
            from AnatomyDTLib.errors import AnatomyDTError, Cancelled

            try:
                result = self.logic.run(self._parameterNode, progress=self._onProgress,
                                        cancel=lambda: self._cancelRequested)
            except Cancelled:
                self.ui.statusLabel.text = _("Cancelled: the scene was left as it was.")
                return
            except AnatomyDTError as exc:
                self.ui.statusLabel.text = _("Not run: see the message.")
                slicer.util.errorDisplay(str(exc), windowTitle=_("AnatomyDT"))
                return
            except Exception as exc:  # noqa: BLE001 - show every failure to the user
                logging.error(traceback.format_exc())
                self.ui.statusLabel.text = _("Failed.")
                slicer.util.errorDisplay(_("AnatomyDT failed: ") + str(exc), windowTitle=_("AnatomyDT"),
                                         detailedText=traceback.format_exc())
                return
            self.ui.statusLabel.text = self.logic.summary(result)
            self._showChart(result.get("plot_chart"))
        finally:
            self._running = False
            self.ui.progressBar.hide()
            self._setInputsEnabled(True)
            self._updateApplyButton()

    def _onProgress(self, fraction):
        self.ui.progressBar.value = int(round(100 * fraction))
        slicer.app.processEvents()  # keeps the panel alive; a Cancel click lands in onApplyButton

    def _setInputsEnabled(self, enabled):
        for name in ("inputsCollapsibleButton", "classesCollapsibleButton", "treatmentCollapsibleButton",
                     "calibrationCollapsibleButton", "predictionCollapsibleButton"):
            getattr(self.ui, name).enabled = enabled

    @staticmethod
    def _showChart(chartNode):
        if chartNode is None:
            return
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        except Exception:  # noqa: BLE001 - the chart is a convenience
            logging.info("AnatomyDT: could not show the volume chart in the layout")


#
# Logic (thin: converts panel values and delegates to AnatomyDTLib.scene)
#


class AnatomyDTLogic(ScriptedLoadableModuleLogic):
    """Panel values -> AnatomyDTLib.scene calls. Usable from the Python console without the widget."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.warmUpProcess = None  # the background compile of the solver kernel (startKernelWarmUp)

    def getParameterNode(self):
        return AnatomyDTParameterNode(super().getParameterNode())

    # -- requirements ------------------------------------------------------------------------

    @staticmethod
    def missingPythonRequirements():
        return [req for module, req in PYTHON_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]

    @staticmethod
    def torchInstalled():
        return importlib.util.find_spec("torch") is not None

    def ensureRequirements(self, askUser=True):
        """Install PyTorch (through the PyTorch extension) and missing packages after asking the user.

        Returns True when everything is importable. Never called at import time.
        """
        missing = self.missingPythonRequirements()
        needTorch = not self.torchInstalled()
        if not missing and not needTorch:
            return True
        what = ([f"PyTorch (torch{TORCH_REQUIREMENT}) through the PyTorch extension"] if needTorch else []) + missing
        if askUser and not slicer.util.confirmOkCancelDisplay(
                _("AnatomyDT needs these Python packages, which are not installed yet:\n\n  ") + "\n  ".join(what)
                + _("\n\nDownload and install them now? This can take several minutes."),
                windowTitle=_("AnatomyDT: install requirements")):
            return False
        if needTorch:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("Install the 'PyTorch' extension from the Extensions Manager, restart "
                                           "Slicer, then click Apply again."), windowTitle=_("AnatomyDT"))
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            try:
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            except TypeError:  # older PyTorch extension without version requirements
                torch = torchLogic.installTorch()
            if torch is None:
                return False
        if missing:
            slicer.util.pip_install(" ".join(missing))
        return not self.missingPythonRequirements() and self.torchInstalled()

    @staticmethod
    def completionAvailable():
        """Whether AnatomyDTLib.brain.completion can fill missing classes (False before PyTorch is installed)."""
        try:
            from AnatomyDTLib import scene
        except Exception:  # noqa: BLE001 - torch may be missing before the first Apply
            return False
        return scene.completion_available()

    # -- panel helpers -----------------------------------------------------------------------

    @staticmethod
    def segmentClasses(segmentationNode, classMap=None):
        """Rows ``(segment ID, name, class or None, matched by)`` for the class table."""
        try:
            from AnatomyDTLib import scene
        except ImportError:  # before PyTorch is installed: names only, mapped on Apply
            segmentation = segmentationNode.GetSegmentation()
            return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(),
                     (classMap or {}).get(segmentation.GetNthSegmentID(i)), "install requirements to match")
                    for i in range(segmentation.GetNumberOfSegments())]
        rows = scene.segment_classes(segmentationNode, {k: (None if v == CLASS_IGNORE else v)
                                                        for k, v in (classMap or {}).items()})
        return [(r.segment_id, r.name, r.class_name, r.source) for r in rows]

    @staticmethod
    def presetParameters(name):
        """Parameter-node values of a treatment preset ("none" or "stupp")."""
        from AnatomyDTLib import scene

        preset = {"none": scene.NO_TREATMENT_PRESET, "stupp": scene.STUPP_PRESET}[name]
        keys = {"surgery_enabled": "surgeryEnabled", "rt_enabled": "rtEnabled", "rt_start_day": "rtStartDay",
                "rt_total_dose_gy": "rtTotalDoseGy", "rt_fractions": "rtFractions",
                "rt_fractions_per_week": "rtFractionsPerWeek", "chemo_enabled": "chemoEnabled",
                "chemo_kill_rate_per_day": "chemoKillRatePerDay",
                "chemo_concurrent_start_day": "chemoConcurrentStartDay", "chemo_concurrent_days": "chemoConcurrentDays",
                "chemo_adjuvant_start_day": "chemoAdjuvantStartDay", "chemo_adjuvant_cycles": "chemoAdjuvantCycles",
                "chemo_days_on": "chemoDaysOn", "chemo_cycle_length_days": "chemoCycleLengthDays"}
        values = {keys[k]: v for k, v in preset.items()}
        if name == "stupp":
            values["rtUseDoseVolume"] = False
        return values

    # -- run ---------------------------------------------------------------------------------

    @staticmethod
    def classMap(p):
        """The class table's segment -> class map (None when the table was never edited)."""
        if not p.classMapJson:
            return None
        return {k: (None if v == CLASS_IGNORE else v) for k, v in json.loads(p.classMapJson).items()}

    @staticmethod
    def panelPlan(p):
        """The plan dict of the treatment panel; its days count on the plan's axis."""
        from AnatomyDTLib import scene

        resectionMask = None
        if p.surgeryEnabled and p.surgeryUseSegment:
            resectionMask = scene.resection_mask_from_segment(p.resectionSegmentation, p.resectionSegmentID,
                                                              p.referenceVolume)
        doseMap = None
        if p.rtEnabled and p.rtUseDoseVolume:
            doseMap = scene.dose_array_from_volume(p.rtDoseVolume, p.referenceVolume)
        return scene.panel_plan(
            surgery_enabled=p.surgeryEnabled, surgery_day=p.surgeryDay, resection_mask=resectionMask,
            surgery_extent=None if p.surgeryUseSegment else p.surgeryExtentPercent / 100.0,
            rt_enabled=p.rtEnabled, rt_start_day=p.rtStartDay, rt_total_dose_gy=p.rtTotalDoseGy,
            rt_fractions=p.rtFractions, rt_fractions_per_week=p.rtFractionsPerWeek, dose_map=doseMap,
            chemo_enabled=p.chemoEnabled, chemo_kill_rate_per_day=p.chemoKillRatePerDay,
            chemo_concurrent_start_day=p.chemoConcurrentStartDay, chemo_concurrent_days=p.chemoConcurrentDays,
            chemo_adjuvant_start_day=p.chemoAdjuvantStartDay, chemo_adjuvant_cycles=p.chemoAdjuvantCycles,
            chemo_days_on=p.chemoDaysOn, chemo_cycle_length_days=p.chemoCycleLengthDays)

    @staticmethod
    def parseDays(text):
        """``"0, 30 60"`` -> [0.0, 30.0, 60.0] (commas, semicolons or spaces)."""
        from AnatomyDTLib.errors import InputError

        try:
            return [float(t) for t in re.split(r"[,;\s]+", text.strip()) if t]
        except ValueError:
            raise InputError(f"Scan days must be numbers separated by commas, got {text!r}.") from None

    def history(self, p):
        """The earlier scans of the panel: ``(history, historyDays, baselineDay)``.

        ``history`` is a list of (segmentation node, day) pairs, the earlier scans sorted by day then
        the baseline segmentation on ``baselineDay``, or the history sequence node (its days in
        ``historyDays``, None for its index values; ``baselineDay`` is then its last item's day).
        Days count on the plan's axis.
        """
        from AnatomyDTLib import scene
        from AnatomyDTLib.errors import InputError

        if p.historySource == "sequence":
            if p.historySequence is None:
                raise InputError("Select the sequence that holds the patient's segmentations (one per scan, the "
                                 "last one the scan of the FLAIR), or choose 'segmentations' as the history source.")
            days = self.parseDays(p.historySequenceDays) if p.historySequenceDays.strip() else None
            pairs = scene.history_from_sequence(p.historySequence, days)
            if not pairs:
                raise InputError(f"The sequence '{p.historySequence.GetName()}' is empty.")
            return p.historySequence, days, pairs[-1][1]
        earlier = [(getattr(p, f"earlierSegmentation{i}"), getattr(p, f"earlierDay{i}"))
                   for i in range(1, EARLIER_SCAN_SLOTS + 1) if getattr(p, f"earlierSegmentation{i}") is not None]
        if not earlier:
            raise InputError("Add at least one earlier scan (its segmentation and day) under 'Calibrate on earlier "
                             "scans'.")
        return sorted(earlier, key=lambda pair: pair[1]) + [(p.inputSegmentation, p.baselineDay)], None, \
            p.baselineDay

    def baselineDay(self, p):
        """The baseline segmentation's day on the plan's axis: 'Day of the baseline scan', or with a
        history sequence (when calibration or the map is on) the day of its last item."""
        if p.historySource == "sequence":
            return self.history(p)[2] if (p.calibrateEnabled or p.probabilityMapEnabled) else 0.0
        return float(p.baselineDay)

    @staticmethod
    def planFromBaseline(plan, baselineDay):
        """The plan seen from the baseline scan (its day 0) when the baseline is on ``baselineDay`` > 0."""
        if not baselineDay:
            return plan
        from AnatomyDTLib.calibration import shift_plan
        from AnatomyDTLib.plan import load_plan

        return shift_plan(load_plan(plan), baselineDay)

    def startKernelWarmUp(self):
        """Compile the fused solver kernel in a background process, once per machine, so that the
        first pde-only or calibration forecast does not wait 35-50 s for numba with its progress bar
        standing still (AnatomyDTLib.warmup). Does nothing when the kernel is cached already, or when
        PyTorch or numba are not installed yet. Returns the process, or None."""
        from AnatomyDTLib import warmup

        if self.warmUpProcess is not None and self.warmUpProcess.poll() is None:
            return self.warmUpProcess  # still compiling
        python = shutil.which("PythonSlicer") or sys.executable  # PythonSlicer: Slicer's Python, its environment
        try:
            self.warmUpProcess = warmup.start_background_warm_up(python)
            failed = None if self.warmUpProcess is not None else warmup.failed_background_warm_up()
        except Exception as exc:  # noqa: BLE001 - a convenience must never break the panel; the forecast compiles
            logging.info(f"AnatomyDT: the solver kernel could not be compiled in the background ({exc})")
            self.warmUpProcess, failed = None, None
        if failed is not None:
            logging.warning(f"AnatomyDT: the background compile of the solver kernel started {failed['started']} "
                            f"did not finish (log: {failed['log']}); it is tried again after {failed['retry_after']}. "
                            "Until then the first pde-only forecast or calibration of a session compiles it "
                            "(35-50 s). To see the error now, type in Slicer's Python console: "
                            "from AnatomyDTLib import warmup; print(warmup.warm_up().summary())")
        if self.warmUpProcess is not None:
            logging.info(f"AnatomyDT: compiling the solver kernel in the background (once; log: "
                         f"{warmup.cache_dir() / warmup.LOG_NAME})")
        return self.warmUpProcess

    @staticmethod
    def usesSolverKernel(p):
        """Whether Apply steps the mechanistic solver in the fused kernel: a pde-only forecast, a
        calibration or a growth-probability map (the learned models run on torch)."""
        return p.calibrateEnabled or p.probabilityMapEnabled or p.modelChoice == "pde-only"

    def kernelWarmUpPending(self, p):
        """Whether a run with these parameters would wait for the background warm-up: it uses the
        solver kernel, and the warm-up is still compiling it."""
        process = self.warmUpProcess
        return process is not None and process.poll() is None and self.usesSolverKernel(p)

    def waitForKernelWarmUp(self, p, progress=None, cancel=None):
        """Before a run that uses the solver kernel: let a background warm-up still compiling it
        finish, instead of compiling it a second time in Slicer's process (AnatomyDTLib.warmup).
        ``progress(0)`` is called meanwhile, which keeps the panel responsive."""
        from AnatomyDTLib import warmup

        if not self.kernelWarmUpPending(p):
            return
        logging.info("AnatomyDT: waiting for the one-time compile of the solver kernel to finish")
        warmup.wait_for_background_warm_up(self.warmUpProcess,
                                           keep_alive=None if progress is None else (lambda: progress(0.0)),
                                           cancel=cancel)

    def _checkInputs(self, p):
        from AnatomyDTLib.errors import InputError

        if p.inputSegmentation is None or p.referenceVolume is None:
            raise InputError("Select the baseline segmentation and the FLAIR volume.")

    def run(self, p, progress=None, cancel=None):
        """Apply: the prediction (or, with calibration on, the calibrated forecast), then the
        growth-probability map when it is on. Returns AnatomyDTLib.scene's dict of new nodes (the map's
        nodes under ``"probability_map"`` and ``"probability_report"``). All or nothing: if the map fails
        or is cancelled, the prediction's nodes are removed again."""
        from AnatomyDTLib import scene

        self._checkInputs(p)
        withMap = p.probabilityMapEnabled
        if withMap:
            self.history(p)  # refuse a missing history before the (long) first run
        share = 0.5 if withMap else 1.0

        def firstProgress(fraction):
            if progress is not None:
                progress(share * fraction)

        self.waitForKernelWarmUp(p, progress, cancel)
        if p.calibrateEnabled:
            result = self.runCalibration(p, firstProgress, cancel)
        else:
            result = self.runPrediction(p, firstProgress, cancel)
        if not withMap:
            return result
        try:
            mapResult = self.runProbabilityMap(
                p, None if progress is None else (lambda fraction: progress(share + (1 - share) * fraction)), cancel)
        except BaseException:
            scene.remove_outputs(p.inputSegmentation.GetScene(), result)
            raise
        result = dict(result)
        result["probability_map"], result["probability_report"] = mapResult["probability_map"], mapResult["report"]
        return result

    def runPrediction(self, p, progress=None, cancel=None):
        """Predict from the baseline segmentation with the panel's model (AnatomyDTLib.scene.predict_into_scene)."""
        from AnatomyDTLib import scene
        from AnatomyDTLib.errors import InputError

        self._checkInputs(p)
        plan = self.panelPlan(p)
        days = scene.time_points(p.horizonValue, p.horizonUnit, p.intermediateTimePoints)
        model = p.modelChoice
        if model == "file":
            if not p.modelFile:
                raise InputError("Model 'file' is selected: choose the weights file.")
            model = p.modelFile
        return scene.predict_into_scene(
            p.inputSegmentation.GetScene(), p.inputSegmentation, p.referenceVolume, days=days,
            plan=self.planFromBaseline(plan, self.baselineDay(p)), class_map=self.classMap(p), model=model,
            progress=progress, cancel=cancel, replace=p.replaceOutputs, device=p.device,
            complete_anatomy=p.completeAnatomy, create_surfaces=p.createSurfaces)

    def runCalibration(self, p, progress=None, cancel=None):
        """Calibrate on the earlier scans, then forecast from the latest (AnatomyDTLib.scene.calibrate_into_scene).
        The horizon and intermediate time points count after the latest scan."""
        from AnatomyDTLib import scene
        from AnatomyDTLib.calibration import CalibrationSettings
        from AnatomyDTLib.errors import InputError

        self._checkInputs(p)
        if p.completeAnatomy:
            raise InputError("Anatomy completion is not available with calibration: every scan of the history "
                             "needs its own classes. Untick 'Complete missing anatomy' or segment all classes.")
        history, historyDays, baselineDay = self.history(p)
        days = [baselineDay + d for d in scene.time_points(p.horizonValue, p.horizonUnit, p.intermediateTimePoints)]
        oer = float(p.calibrationHypoxiaOER)
        settings = CalibrationSettings(alpha=p.calibrationAlpha, iterations=int(p.calibrationIterations),
                                       assumed_delayed_death=(float(p.calibrationDeathDelay),
                                                              float(p.calibrationClearanceHalfLife)),
                                       assumed_hypoxia=oer if oer > 1.0 else None)
        return scene.calibrate_into_scene(
            p.referenceVolume.GetScene(), history, p.referenceVolume, days=days, history_days=historyDays,
            plan=self.panelPlan(p), settings=settings, class_map=self.classMap(p), progress=progress,
            cancel=cancel, replace=p.replaceOutputs, ensemble_members=int(p.calibrationEnsembleMembers),
            create_surfaces=p.createSurfaces)

    def runProbabilityMap(self, p, progress=None, cancel=None):
        """Growth-probability map on the last time point from the tumour volumes of the earlier scans and the
        baseline (AnatomyDTLib.scene.probability_map_into_scene)."""
        from AnatomyDTLib import scene

        self._checkInputs(p)
        history, historyDays, baselineDay = self.history(p)
        pairs = history if isinstance(history, list) else scene.history_from_sequence(history, historyDays)
        day = scene.time_points(p.horizonValue, p.horizonUnit, p.intermediateTimePoints)[-1]
        return scene.probability_map_into_scene(
            p.inputSegmentation.GetScene(), p.inputSegmentation, p.referenceVolume, day=day, history=pairs,
            baseline_day=baselineDay, plan=self.panelPlan(p), members=int(p.probabilityMembers),
            class_map=self.classMap(p), progress=progress, cancel=cancel, replace=p.replaceOutputs)

    @staticmethod
    def summary(result):
        """The status line: tumour volume per output day (the first row is the baseline, or the latest
        scan of a calibration), the calibrated fit, and the growth-probability map's burden forecast."""
        table = result["table"].GetTable()
        parts = []
        tumourColumn = next(c for c in range(table.GetNumberOfColumns()) if table.GetColumnName(c) == "tumour")
        for row in range(table.GetNumberOfRows()):
            day = table.GetValue(row, 0).ToDouble()
            volume = table.GetValue(row, tumourColumn).ToDouble()
            label = f"day {day:g}" if row else ("baseline" if day == 0 else f"latest scan (day {day:g})")
            parts.append(f"{label}: {volume:.1f} mL")
        text = _("Tumour volume: ") + "; ".join(parts)
        fitTable = result.get("fit_table")
        if fitTable is not None:
            fit = fitTable.GetTable()
            columns = [fit.GetColumnName(c) for c in range(fit.GetNumberOfColumns())]
            dice = [fit.GetValue(r, columns.index("tumour_dice")).ToDouble() for r in range(fit.GetNumberOfRows())]
            text += _(". Calibrated: tumour Dice on the history ") + ", ".join(f"{d:.2f}" for d in dice)
        band = result.get("volume_band_table")
        if band is not None:
            table = band.GetTable()
            columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
            rows = [[table.GetValue(r, columns.index(n)).ToDouble() for n in ("day", "p5_tumour_ml", "p95_tumour_ml")]
                    for r in range(table.GetNumberOfRows())]
            text += _(". Uncertainty (5-95 % of the members): ") + "; ".join(
                f"day {d:g}: {lo:.1f}-{hi:.1f} mL" for d, lo, hi in rows)
        report = result.get("probability_report")
        if report is not None:
            text += _(". Growth-probability map ") + (report.GetAttribute("AnatomyDT.Summary") or "")
        return text


#
# Test
#


class AnatomyDTTest(ScriptedLoadableModuleTest):
    """End-to-end test inside Slicer: sample case (or a synthetic one) -> logic -> output nodes."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnatomyDT_EndToEnd()
        self.setUp()
        self.test_AnatomyDT_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_AnatomyDT_CalibrationAndProbabilityMap()

    # The bundled sample case (Resources/SampleData), else a small synthetic brain.
    def _loadCase(self):
        import numpy as np

        try:
            from AnatomyDTLib.brain.sample_data import sample_case

            paths = sample_case()
        except Exception:  # noqa: BLE001 - no sample bundled (or an older library): synthetic case
            paths = None
        if paths is not None:
            flair = slicer.util.loadVolume(str(paths["flair"]))
            seg = slicer.util.loadSegmentation(str(paths["segmentation"]))
            return flair, seg
        shape = (14, 18, 16)
        kk, jj, ii = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
        r = np.sqrt((kk / 6.0) ** 2 + (jj / 8.0) ** 2 + (ii / 7.0) ** 2)
        labels = np.zeros(shape, np.uint8)
        labels[r <= 1.0] = 3
        labels[r <= 0.72] = 2
        labels[(np.abs(kk) <= 1) & (np.abs(jj) <= 3) & (np.abs(ii - 2) <= 1)] = 4
        labels[((kk - 1.5) ** 2 + (jj + 2.5) ** 2 + (ii + 2.5) ** 2) <= 5.0] = 1
        flairArray = np.choose(labels, [0.0, 1.1, 0.55, 0.75, 0.08]).astype(np.float32)
        ijkToRas = vtk.vtkMatrix4x4()
        for row, values in enumerate([[-1.2, 0, 0, 40], [0, 1.1, 0, -12], [0, 0, 2, 7.5]]):
            for col, value in enumerate(values):
                ijkToRas.SetElement(row, col, value)
        flair = slicer.util.addVolumeFromArray(flairArray, name="FLAIR")
        flair.SetIJKToRASMatrix(ijkToRas)
        labelNode = slicer.util.addVolumeFromArray(labels, name="labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
        labelNode.SetIJKToRASMatrix(ijkToRas)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Baseline")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(flair)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, seg)
        names = {1: "Tumor", 2: "White matter", 3: "Cortex", 4: "Ventricles"}
        segmentation = seg.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            segment.SetName(names[segment.GetLabelValue()])
        slicer.mrmlScene.RemoveNode(labelNode)
        return flair, seg

    def _parameters(self, flair, seg):
        logic = AnatomyDTLogic()
        p = logic.getParameterNode()
        p.inputSegmentation, p.referenceVolume = seg, flair
        for key, value in logic.presetParameters("stupp").items():
            setattr(p, key, value)
        p.horizonValue, p.horizonUnit, p.intermediateTimePoints = 6.0, "weeks", "3"
        p.modelChoice, p.device = "pde-only", "cpu"
        return logic, p

    def test_AnatomyDT_EndToEnd(self):
        self.delayDisplay("Starting AnatomyDT end-to-end test")
        if not (AnatomyDTLogic.torchInstalled() and not AnatomyDTLogic.missingPythonRequirements()):
            self.delayDisplay("PyTorch or required packages missing: install them (Apply offers it); test skipped")
            return
        flair, seg = self._loadCase()
        logic, p = self._parameters(flair, seg)
        segmentsBefore = [seg.GetSegmentation().GetNthSegmentID(i)
                          for i in range(seg.GetSegmentation().GetNumberOfSegments())]
        fractions = []
        result = logic.run(p, progress=fractions.append, cancel=lambda: False)
        self.assertEqual(len(result["segmentations"]), 2)  # days 21 and 42
        self.assertEqual(result["segmentations"][1].GetName(), f"{seg.GetName()} +42 d")
        for node in result["segmentations"]:
            segmentation = node.GetSegmentation()
            self.assertEqual([segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())],
                             ["tumour", "white_matter", "grey_matter", "lateral_ventricles"])
            self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        self.assertEqual(result["sequence"].GetNumberOfDataNodes(), 2)
        self.assertEqual(result["table"].GetTable().GetNumberOfRows(), 3)
        self.assertAlmostEqual(fractions[-1], 1.0)
        self.assertEqual(segmentsBefore, [seg.GetSegmentation().GetNthSegmentID(i)
                                          for i in range(seg.GetSegmentation().GetNumberOfSegments())])
        self.delayDisplay(logic.summary(result))
        self.delayDisplay("Test passed")

    def test_AnatomyDT_CancelLeavesSceneUnchanged(self):
        if not AnatomyDTLogic.torchInstalled():
            return
        from AnatomyDTLib.errors import Cancelled

        flair, seg = self._loadCase()
        logic, p = self._parameters(flair, seg)
        before = slicer.mrmlScene.GetNumberOfNodes()
        calls = []
        with self.assertRaises(Cancelled):
            logic.run(p, progress=calls.append, cancel=lambda: len(calls) > 3)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Cancel test passed")

    def test_AnatomyDT_CalibrationAndProbabilityMap(self):
        """Calibrate on an earlier scan (a copy of the baseline with a smaller tumour, day 0; the baseline on
        day 30), forecast 2 weeks after the baseline, and make the growth-probability map."""
        if not (AnatomyDTLogic.torchInstalled() and not AnatomyDTLogic.missingPythonRequirements()):
            return
        flair, seg = self._loadCase()
        earlier = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Earlier")
        earlier.GetSegmentation().DeepCopy(seg.GetSegmentation())
        tumour = next(earlier.GetSegmentation().GetNthSegmentID(i)
                      for i in range(earlier.GetSegmentation().GetNumberOfSegments())
                      if earlier.GetSegmentation().GetNthSegment(i).GetName().lower() in ("tumor", "tumour"))
        earlier.CreateBinaryLabelmapRepresentation()
        logic, p = self._parameters(flair, seg)
        for key, value in logic.presetParameters("none").items():
            setattr(p, key, value)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(earlier, tumour, flair)
        import numpy as np
        from scipy import ndimage

        slicer.util.updateSegmentBinaryLabelmapFromArray(ndimage.binary_erosion(mask).astype(np.uint8), earlier,
                                                         tumour, flair)
        p.calibrateEnabled, p.historySource = True, "segmentations"
        p.earlierSegmentation1, p.earlierDay1, p.baselineDay = earlier, 0.0, 30.0
        p.calibrationIterations = 1
        p.probabilityMapEnabled, p.probabilityMembers = True, 2
        p.horizonValue, p.horizonUnit, p.intermediateTimePoints = 2.0, "weeks", ""
        result = logic.run(p, progress=lambda f: None, cancel=lambda: False)
        self.assertEqual(result["segmentations"][0].GetName(), f"{seg.GetName()} calibrated day 44")
        self.assertEqual(result["fit_table"].GetTable().GetNumberOfRows(), 1)
        probability = slicer.util.arrayFromVolume(result["probability_map"])
        self.assertTrue(probability.min() >= 0.0 and probability.max() <= 1.0)
        self.delayDisplay(logic.summary(result))
        self.delayDisplay("Calibration and probability map test passed")
