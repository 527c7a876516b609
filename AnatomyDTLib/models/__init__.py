"""Learned Anatomy-DT models: Eq. 2 with learnable physics, a growth-rate field and a Growth CNN.

Public API:

* :class:`AnatomyDTModel` — the differentiable model (one rollout per ``forward``);
* :class:`LearnedForecastModel` — a trained model behind the ``ForecastModel`` protocol of
  :mod:`AnatomyDTLib.predict`;
* :func:`load_checkpoint` / :func:`save_checkpoint` — weights files (validated on load);
* :class:`Config` — the JSON training configuration (``configs/*.json``);
* :func:`train` / :func:`cross_validate` — ``anatomydt train`` and ``anatomydt evaluate``.

See ``docs/learning.md``.
"""

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from .conditioning import FEATURE_NAMES, Conditioning
from .config import Config
from .forecast import LearnedForecastModel
from .growth import AnatomyDTModel, parameter_groups, total_variation


def train(*args, **kwargs):
    """See :func:`AnatomyDTLib.models.training.train`."""
    from .training import train as _train

    return _train(*args, **kwargs)


def cross_validate(*args, **kwargs):
    """See :func:`AnatomyDTLib.models.evaluation.cross_validate`."""
    from .evaluation import cross_validate as _cv

    return _cv(*args, **kwargs)


__all__ = ["AnatomyDTModel", "LearnedForecastModel", "Config", "Conditioning", "FEATURE_NAMES", "CHECKPOINT_FORMAT",
           "load_checkpoint", "read_checkpoint", "save_checkpoint", "parameter_groups", "total_variation", "train",
           "cross_validate"]
