"""LMS: linear multistep in sigma (Adams-Bashforth with non-uniform steps), order 4, as in Karras et al. 2022's
k-diffusion `sample_lms`. Checked against diffusers' `LMSDiscreteScheduler` (and with use_karras_sigmas for
"LMS Karras").

With d_j = (x - x0) / sigma at the last up-to-4 steps, the step integrates their Lagrange interpolant:
    x <- x + sum_j c_j d_{i-j},
    c_j = integral over [sigma_i, sigma_{i+1}] of prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) ds
diffusers integrates with scipy's quad; the integrand is a polynomial, so we integrate it exactly.

One deliberate difference: diffusers picks the order from the step index, so a part-way (img2img) start
applies a 4th-order coefficient to its single derivative. We count the derivatives this run has seen, as
k-diffusion does; whole-schedule runs are identical to diffusers'.
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from .euler import Euler, predict_x0

MAX_ORDER = 4


class LMS(Euler):
    name, label, diffusers_class = "lms", "LMS", "LMSDiscreteScheduler"
    diffusers_config = {"use_karras_sigmas": False}
    ignored_keys = ("rescale_betas_zero_snr",)

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        self.derivatives: list[np.ndarray] = []  # this run's last MAX_ORDER derivatives, newest last

    def step(self, model_output, i, x, rng):
        sigma = self.sigmas[i]
        x0 = predict_x0(self.config, model_output, x, sigma)
        self.derivatives = [*self.derivatives[-(MAX_ORDER - 1):], (x - x0) / sigma]
        coeffs = lms_coefficients(self.sigmas[i + 1 - len(self.derivatives) : i + 2].astype(np.float64))
        update = sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        return (x + update).astype(np.float32)


def lms_coefficients(sigmas: np.ndarray) -> list[float]:
    """sigmas: (order + 1,) = sigma_{i-order+1} ... sigma_i, sigma_{i+1}. Coefficients for d_i, d_{i-1}, ..."""
    nodes, lo, hi = sigmas[:-1][::-1], sigmas[-2], sigmas[-1]  # nodes: sigma_i, sigma_{i-1}, ...
    coeffs = []
    for j in range(len(nodes)):
        others = np.delete(nodes, j)
        basis = P.polyfromroots(others) / np.prod(nodes[j] - others)  # Lagrange basis polynomial of node j
        integral = P.polyint(basis)
        coeffs.append(float(P.polyval(hi, integral) - P.polyval(lo, integral)))
    return coeffs


class LMSKarras(LMS):
    name, label = "lms_karras", "LMS Karras"
    diffusers_config = {"use_karras_sigmas": True}
    karras = True
