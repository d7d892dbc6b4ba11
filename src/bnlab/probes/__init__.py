"""Probes: measure training dynamics on any torch.nn.Module without perturbing it.

GradientFlow, ActivationStats, ICS (Santurkar Def. 2.1), Landscape (Santurkar §3.1) and
HessianTopEig, driven by a Monitor from any training loop; records are tidy
(step, layer, metric, value) rows. See bnlab.probes.monitor for the contract.
"""

from .activations import ActivationStats
from .base import Evaluator, Probe, register_activation, simulate_optimizer_step
from .gradient_flow import GradientFlow
from .hessian import HessianTopEig
from .ics import ICS
from .landscape import Landscape
from .monitor import Monitor
from .plot import plot

__all__ = ["Monitor", "Probe", "GradientFlow", "ActivationStats", "ICS", "Landscape",
           "HessianTopEig", "plot", "Evaluator", "simulate_optimizer_step", "register_activation"]
