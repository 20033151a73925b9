"""SDE-DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", the second-order multistep solver of the reverse SDE in data prediction, on Karras
sigmas. Checked against diffusers' `DPMSolverMultistepScheduler` (algorithm_type "sde-dpmsolver++",
solver_order 2, solver_type "midpoint", use_karras_sigmas True). Notation as in dpmpp_2m.py:

    x <- (s' / s) e^-h x + alpha' (1 - e^-2h) (x0 + D1 / 2) + s' sqrt(1 - e^-2h) z,   z ~ N(0, I)
z is one standard_normal draw of the model output's shape per step, the last step included (where its
coefficient is 0), because diffusers draws one there too.
"""
from __future__ import annotations

import numpy as np

from . import fmath
from .dpmpp_2m import DPMPP2MKarras


class DPMPP2MSDEKarras(DPMPP2MKarras):
    name, label = "dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras"
    diffusers_config = {**DPMPP2MKarras.diffusers_config, "algorithm_type": "sde-dpmsolver++"}
    stochastic = True

    def _coefficients(self, alpha_next, s_next, s, h):
        return (s_next / s * fmath.exp(-h), alpha_next * (1 - fmath.exp(-2.0 * h)),
                s_next * np.sqrt(1.0 - fmath.exp(-2 * h)))

    def _noise(self, shape, rng):
        return rng.standard_normal(shape, dtype=np.float32)
