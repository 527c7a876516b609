"""The class schema: which anatomical classes the probability field has, and in what order.

One :class:`ClassSchema` fixes the channel order of every field, file and model in a run.
The default brain schema has five classes::

    0 background          everything not modelled below (CSF outside the ventricles, skull, air,
                          resection cavity, cleared necrosis)
    1 tumour              all tumour sub-regions merged (necrosis, enhancing, non-enhancing, oedema)
    2 white_matter        white-matter tracts
    3 grey_matter         cortical grey matter
    4 lateral_ventricles  lateral ventricles

The schema also says where tumour probability goes when treatment removes it
(``removed_tumour_class``), so that every treatment keeps each voxel on the simplex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .errors import InputError


@dataclass(frozen=True)
class ClassSchema:
    """Names, display colours and roles of the K classes of an anatomy field.

    Attributes:
        names: class names in channel order; also the segment names written to files.
        colors: RGB colours in [0, 1], one per class (used for segment colours).
        tumour: name of the tumour class (the one that grows and is treated).
        removed_tumour_class: name of the class that receives tumour probability removed by
            surgery, radiotherapy or chemotherapy.
        background: name of the class that fills voxels with no label.
        synonyms: extra lower-case names accepted for each class when reading segment names.
    """

    names: tuple[str, ...]
    colors: tuple[tuple[float, float, float], ...]
    tumour: str
    removed_tumour_class: str
    background: str
    synonyms: dict = field(default_factory=dict, compare=False, hash=False)
    terminology: dict = field(default_factory=dict, compare=False, hash=False)
    """Optional standard coding per class name: a 3D Slicer terminology entry string (see
    :func:`terminology_entry`), written on every segment so that Slicer and DICOM SEG export
    show what each segment is."""

    def __post_init__(self):
        if len(self.names) < 2:
            raise InputError(f"A class schema needs at least 2 classes, got {list(self.names)}.")
        if len(set(self.names)) != len(self.names):
            raise InputError(f"Class names must be unique, got {list(self.names)}.")
        if len(self.colors) != len(self.names):
            raise InputError(
                f"The schema has {len(self.names)} classes but {len(self.colors)} colours; give one colour per class."
            )
        for role in ("tumour", "removed_tumour_class", "background"):
            if getattr(self, role) not in self.names:
                raise InputError(f"Schema role {role}={getattr(self, role)!r} is not one of the classes {list(self.names)}.")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def index(self, name_or_index: str | int) -> int:
        """Channel index of a class given by name (case-insensitive, synonyms allowed) or index."""
        if isinstance(name_or_index, int) and not isinstance(name_or_index, bool):
            if 0 <= name_or_index < self.num_classes:
                return name_or_index
            raise InputError(f"Class index {name_or_index} is outside 0..{self.num_classes - 1} for classes {list(self.names)}.")
        key = str(name_or_index).strip().lower()
        for i, name in enumerate(self.names):
            if key == name.lower() or key in self.synonyms.get(name, ()):
                return i
        raise InputError(f"Unknown class {name_or_index!r}; known classes are {list(self.names)}.")

    @property
    def tumour_index(self) -> int:
        return self.index(self.tumour)

    @property
    def removed_tumour_index(self) -> int:
        return self.index(self.removed_tumour_class)

    @property
    def background_index(self) -> int:
        return self.index(self.background)

    @classmethod
    def generic(cls, num_classes: int, tumour_index: int = 1, sink_index: int = 0) -> "ClassSchema":
        """A schema for K anonymous classes ``class_0 .. class_{K-1}`` (synthetic benchmarks, tests)."""
        if num_classes < 2:
            raise InputError(f"A field needs at least 2 classes, got {num_classes}.")
        for what, idx in (("tumour", tumour_index), ("sink", sink_index)):
            if not 0 <= idx < num_classes:
                raise InputError(f"The {what} class index {idx} is outside 0..{num_classes - 1}.")
        names = tuple(f"class_{k}" for k in range(num_classes))
        palette = _GENERIC_PALETTE
        colors = tuple(palette[k % len(palette)] for k in range(num_classes))
        return cls(names, colors, names[tumour_index], names[sink_index], names[sink_index])


_GENERIC_PALETTE = (
    (0.0, 0.0, 0.0),
    (0.89, 0.10, 0.11),
    (0.22, 0.49, 0.72),
    (0.30, 0.69, 0.29),
    (0.60, 0.31, 0.64),
    (1.00, 0.50, 0.00),
    (0.65, 0.34, 0.16),
    (0.97, 0.51, 0.75),
)

SLICER_CATEGORY_TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_entry(category: tuple[str, str, str], type_: tuple[str, str, str],
                      region: tuple[str, str, str] | None = None) -> str:
    """A 3D Slicer terminology entry string from (scheme, code, meaning) triplets.

    Format (Slicer's ``TerminologyEntry`` segment tag): ``context~category~type~type modifier~
    anatomic context~anatomic region~region modifier``, each code as ``scheme^value^meaning``.
    """
    region_text = "^".join(region) if region else "^^"
    return "~".join([SLICER_CATEGORY_TYPE_CONTEXT, "^".join(category), "^".join(type_), "^^",
                     SLICER_ANATOMIC_CONTEXT, region_text, "^^"])


_ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
_ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
_BRAIN = ("SCT", "12738006", "Brain")

#: SNOMED CT codes of the brain classes (DICOM CID 7140 "Brain Structure for Volumetric
#: Measurement" for the tissues; neoplasm of the brain for the tumour, oedema included).
BRAIN_TERMINOLOGY = {
    "tumour": terminology_entry(_ALTERED_STRUCTURE, ("SCT", "108369006", "Neoplasm"), _BRAIN),
    "white_matter": terminology_entry(_ANATOMICAL_STRUCTURE, ("SCT", "68523003", "Cerebral White Matter")),
    "grey_matter": terminology_entry(_ANATOMICAL_STRUCTURE, ("SCT", "40146001", "Cerebral Gray Matter")),
    "lateral_ventricles": terminology_entry(_ANATOMICAL_STRUCTURE, ("SCT", "66720007", "Lateral Ventricle")),
}

BRAIN_SCHEMA = ClassSchema(
    names=("background", "tumour", "white_matter", "grey_matter", "lateral_ventricles"),
    colors=(
        (0.0, 0.0, 0.0),
        (0.90, 0.16, 0.16),  # red: tumour
        (0.96, 0.93, 0.78),  # cream: white matter
        (0.55, 0.42, 0.32),  # brown-grey: cortex
        (0.35, 0.65, 0.90),  # CSF blue: ventricles
    ),
    tumour="tumour",
    removed_tumour_class="background",
    background="background",
    synonyms={
        "background": ("bg", "none", "unlabeled", "unlabelled", "other", "cavity", "resection cavity"),
        "tumour": ("tumor", "glioma", "neoplasm", "lesion", "tumour core", "tumor core", "whole tumor", "whole tumour"),
        "white_matter": ("white matter", "wm", "white-matter", "white matter tracts", "white-matter tracts", "wmt"),
        "grey_matter": ("grey matter", "gray matter", "gray_matter", "gm", "cortex", "cortical grey matter",
                         "cortical gray matter", "cerebral cortex", "cgm"),
        "lateral_ventricles": ("lateral ventricles", "lateral ventricle", "ventricles", "ventricle", "lv"),
    },
    terminology=BRAIN_TERMINOLOGY,
)

DEFAULT_SCHEMA = BRAIN_SCHEMA


def schema_for(num_classes: int, schema: ClassSchema | None = None, tumour_index: int = 1,
               sink_index: int = 0) -> ClassSchema:
    """The schema to use for a field with ``num_classes`` channels.

    An explicit schema must match the channel count; otherwise the brain schema is used for
    K = 5 and a generic schema for any other K.
    """
    if schema is not None:
        if schema.num_classes != num_classes:
            raise InputError(
                f"The field has {num_classes} channels but the class schema names {schema.num_classes} classes "
                f"({list(schema.names)}); give a schema with one class per channel."
            )
        return schema
    if num_classes == BRAIN_SCHEMA.num_classes and tumour_index == BRAIN_SCHEMA.tumour_index and sink_index == 0:
        return BRAIN_SCHEMA
    return ClassSchema.generic(num_classes, tumour_index, sink_index)


def as_names(items: Sequence[str | int], schema: ClassSchema) -> list[str]:
    """Resolve a list of class names or indices to canonical names."""
    return [schema.names[schema.index(x)] for x in items]
