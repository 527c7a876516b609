"""Sub-commands of the ``anatomydt`` CLI, one module each (see :mod:`AnatomyDTLib.cli`)."""
