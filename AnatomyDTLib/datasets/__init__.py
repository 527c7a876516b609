"""Synthetic paired anatomy datasets (appendix A of the Anatomy-DT paper).

See :mod:`AnatomyDTLib.datasets.synthetic` and ``docs/datasets.md``.
"""

from .synthetic import (
    GENERATOR_VERSION,
    KINDS,
    MANIFEST_COLUMNS,
    TREATMENT_VARIABLES,
    VESSEL_DEFAULTS,
    VORONOI_DEFAULTS,
    case_rng,
    class_names,
    default_options,
    generate_case,
    generate_vessel_case,
    generate_voronoi_case,
    load_dataset,
    make_dataset,
    surviving_fraction,
    tumour_burden_factor,
)

__all__ = [
    "GENERATOR_VERSION",
    "KINDS",
    "MANIFEST_COLUMNS",
    "TREATMENT_VARIABLES",
    "VESSEL_DEFAULTS",
    "VORONOI_DEFAULTS",
    "case_rng",
    "class_names",
    "default_options",
    "generate_case",
    "generate_vessel_case",
    "generate_voronoi_case",
    "load_dataset",
    "make_dataset",
    "surviving_fraction",
    "tumour_burden_factor",
]
