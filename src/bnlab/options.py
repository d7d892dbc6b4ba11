"""The string options of bnlab's API as ``Literal`` types, so a type checker catches a typo
(``running_var_correction="unbaised"``) before a run does. Each function also checks its
options at run time and raises ValueError naming the allowed values."""

from __future__ import annotations

from typing import Literal

__all__ = ["VarCorrection", "BatchOfOne", "EMA", "Activation", "ConvertTarget", "Upstream", "Estimator",
           "ProbeMode", "PlotKind", "GhostStatistics", "Whitening", "ActivationSource"]

VarCorrection = Literal["unbiased", "biased"]          # which batch variance the running EMA averages
BatchOfOne = Literal["raise", "use_running_stats"]      # a training batch with one value per channel
EMA = Literal["pytorch", "debiased"]                    # the running-statistics average
Activation = Literal["identity", "relu", "leaky_relu"]  # BatchNormAct2d's fused activations
ConvertTarget = Literal["bnlab", "torch", "sync", "frozen", "renorm", "ghost"]
Upstream = Literal["batch", "population"]               # population_statistics: upstream BN layers
Estimator = Literal["pooled", "algorithm2"]             # population_statistics: the estimator
ProbeMode = Literal["train", "eval"]                    # which semantics a probe measures
PlotKind = Literal["percentiles", "gradients", "ics", "landscape", "hessian"]
GhostStatistics = Literal["batch", "virtual"]           # GhostBatchNorm's running statistics
Whitening = Literal["zca", "pca", "pca_aligned", "pca_stablegrad"]
ActivationSource = Literal["train", "probe"]            # ActivationStats: which batch it reads
