"""AnatomyDTLib: the embedded PyTorch library of the AnatomyDT 3D Slicer extension.

Anatomy is a multi-class probability field on the simplex, evolved by the cross-diffusion
reaction–diffusion PDE of Anatomy-DT (Eq. 2) with a differentiable IMEX solver. The library
imports and runs with no Slicer and no Qt.

Main entry points:
    :func:`simulate`                 the solver (tensor in, tensor out)
    :mod:`AnatomyDTLib.state`        labelmaps <-> probability fields, with geometry
    :mod:`AnatomyDTLib.io`           NIfTI / NRRD / .seg.nrrd reading and atomic writing
    :mod:`AnatomyDTLib.plan`         the treatment-plan JSON format
    :mod:`AnatomyDTLib.predict`      forecasting with a chosen model
    :mod:`AnatomyDTLib.cli`          the ``anatomydt`` command

Importing the package does not import torch: the Slicer module reads segment names and plans
before the user has agreed to install PyTorch. ``simulate`` loads the solver on first use.
"""

__version__ = "0.1.0"

from .schema import BRAIN_SCHEMA, DEFAULT_SCHEMA, ClassSchema  # noqa: E402

__all__ = ["simulate", "ClassSchema", "BRAIN_SCHEMA", "DEFAULT_SCHEMA", "__version__"]


def __getattr__(name):
    if name == "simulate":
        from .solver import simulate

        return simulate
    raise AttributeError(f"module 'AnatomyDTLib' has no attribute {name!r}")
