"""LMS: linear multistep in sigma (Adams-Bashforth with non-uniform steps), order 4, as in Karras et al. 2022's
k-diffusion `sample_lms`. Checked against diffusers' `LMSDiscreteScheduler` (and with use_karras_sigmas for
"LMS Karras").

With d_j = (x - x0) / sigma at the last up-to-4 steps, the step integrates their Lagrange interpolant:
    x <- x + sum_j c_j d_{i-j},
    c_j = integral over [sigma_i, sigma_{i+1}] of prod_{k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) ds
The integral uses the rule scipy's quad settles on for a polynomial, evaluated as diffusers does (see
lms_coefficients), so the coefficients equal diffusers' bit for bit.

One deliberate difference: diffusers picks the order from the step index, so a part-way (img2img) start
applies a 4th-order coefficient to its single derivative. We count the derivatives this run has seen, as
k-diffusion does; whole-schedule runs are identical to diffusers'.
"""
from __future__ import annotations

import numpy as np

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
    """sigmas: (order + 1,) = sigma_{i-order+1} ... sigma_i, sigma_{i+1}. Coefficients for d_i, d_{i-1}, ...

    As diffusers computes them, to the last bit: scipy's quad on a polynomial integrand settles on QUADPACK's
    21-point Gauss-Kronrod rule (exact to degree 31), and diffusers' integrand is evaluated in float32 (torch
    scalars). An exact integral differs from that by float32 noise, which the last steps of an ill-conditioned
    schedule (cosine, sigma_max 20291) amplify past 1e-5."""
    s = sigmas.astype(np.float32)
    nodes, lo, hi = s[:-1][::-1], float(s[-2]), float(s[-1])  # nodes: sigma_i, sigma_{i-1}, ...
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    taus = np.float32(np.concatenate([[centre], centre - half * _XGK[:10], centre + half * _XGK[:10]]))  # (21,)
    coeffs = []
    for j in range(len(nodes)):
        basis = np.ones_like(taus)  # Lagrange basis polynomial of node j, in float32 as diffusers' integrand
        for k in range(len(nodes)):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        coeffs.append(_kronrod21(basis.astype(np.float64)) * half)
    return coeffs


# QUADPACK qk21: Kronrod abscissae on [-1, 1] (descending; the last is the centre) and weights.
_XGK = np.array([0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
                 0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
                 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
                 0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
                 0.294392862701460198131126603103866, 0.148874338981631210884826001129720, 0.0])
_WGK = np.array([0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
                 0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
                 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
                 0.123491976262065851077208626244460, 0.134709217311473325928054001771707,
                 0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
                 0.149445554002916905664936468389821])


def _kronrod21(f: np.ndarray) -> float:
    """f: values at (centre, centre - h x_1..10, centre + h x_1..10); QUADPACK's summation order (Gauss
    abscissae 2, 4, ... first, then 1, 3, ...)."""
    total = _WGK[10] * f[0]
    for j in (*range(1, 10, 2), *range(0, 10, 2)):
        total += _WGK[j] * (f[1 + j] + f[11 + j])
    return float(total)


class LMSKarras(LMS):
    name, label = "lms_karras", "LMS Karras"
    diffusers_config = {"use_karras_sigmas": True}
    karras = True
