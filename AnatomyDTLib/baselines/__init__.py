"""Baselines of the paper's Table 1 and the benchmark that regenerates Tables 1–2 and §3.3.

Every baseline reads the pre-treatment one-hot label field and the treatment variables
(``treated``, ``dose_gy``, ``interval_days``) and forecasts the post-treatment labels:

=================  ================================================================================
method             what
=================  ================================================================================
``unet``           U-Net, treatment + interval as constant input channels (:mod:`.networks`)
``convlstm``       ConvLSTM unrolled in ~10-day steps up to the interval (:mod:`.networks`)
``neuralode``      latent NeuralODE, torchdiffeq fixed-step RK4 to the interval (:mod:`.networks`)
``fisher-kpp``     tumour-only Fisher–KPP with fitted D, ρ and treatment kill γ (:mod:`.fisher_kpp`)
``cross-diffusion`` the learned Eq. 2 without Growth CNN and with a scalar α: fitted D and χ
                   (:class:`~AnatomyDTLib.models.AnatomyDTModel` with ``growth_cnn: false,
                   spatial_alpha: false``, trained by ``anatomydt evaluate``'s own loop)
=================  ================================================================================

The first four share one training loop (:mod:`.trainer`); all five use the folds and scoring
of ``anatomydt evaluate``. ``anatomydt benchmark`` (:mod:`.benchmark`) runs them next to the full
model, the Table 2 ablations and the sensitivity sweeps. See docs/results.md.
No torch import at package import time.
"""

BASELINES = ("unet", "convlstm", "neuralode", "fisher-kpp", "cross-diffusion")
METHODS = BASELINES + ("anatomy-dt",)
LABELS = {"unet": "U-Net", "convlstm": "ConvLSTM", "neuralode": "NeuralODE", "fisher-kpp": "Fisher-KPP",
          "cross-diffusion": "Cross-diffusion", "anatomy-dt": "Anatomy-DT (ours)", "identity": "identity (no change)"}

__all__ = ["BASELINES", "METHODS", "LABELS"]
