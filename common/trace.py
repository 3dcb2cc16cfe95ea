"""Why BN helps, measured (--trace-every K): activation percentiles, internal covariate shift and the loss
landscape, every K training steps, computed here once for every framework.

The only framework part is Backend.gradient (the mean loss and the gradient of every trainable parameter at
given parameters on given images, normalisation in train mode, dropout off, no state changed); everything
below is numpy on top of it, with plain SGD steps (w - lr * g, the run's own update). docs/why-bn.md gives
the formulas and what they do and do not show.

At a traced step, before the run takes it, with w the parameters and B the step's batch:

- percentiles: the 15th, 50th and 85th percentiles of each activation's input on a fixed probe batch (the
  BN paper's Figure 1): over all its units pooled, and over the probe images for one fixed unit (channel 0,
  at the centre of the feature map for a convolution; feature 0 of a dense layer).
- ICS (Santurkar et al. 2018): per weight layer i (its weights, bias and the normalisation after it), G_i is
  the gradient of layer i's parameters at w on B, G'_i the same gradient after every earlier layer has taken
  this step's SGD update (layer i and later layers unchanged, same batch); recorded ||G_i - G'_i|| / ||G_i||
  and cos(G_i, G'_i). The first layer has no earlier layer, so none is recorded for it.
- landscape (their Figure 4): along the step's gradient g, at w - lr s g for s in STEP_SCALES: the loss
  variation max - min of the loss over those points and w itself, the gradient predictiveness
  max_s ||g - grad(w - lr s g)||, and the effective beta-smoothness max_s ||g - grad(w - lr s g)|| / ||lr s g||.

Each measure is one more gradient call (1 for the percentiles, 1 for G, one per layer after the first, one
per step scale); the run itself never moves along them, and common.loop keeps their time out of the timed
region.
"""

from __future__ import annotations

import time

import numpy as np

from . import norms
from .norms import NORM_NAMES

PERCENTILES = (15, 50, 85)
STEP_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
POSITION_OF = {bn: pos for pos, bn in NORM_NAMES.items()}  # bn1 -> conv1: a norm's parameters are its layer's


def layer_of(name: str) -> str:
    """The weight layer a canonical parameter belongs to (conv1 ... fc3); a normalisation's, the layer it follows."""
    prefix = name.split(".")[0]
    return POSITION_OF.get(prefix, prefix)


def norm(arrays: dict) -> float:
    """The L2 norm of the concatenated arrays."""
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays.values())))


def moved(params: dict, grads: dict, step: float, names) -> dict:
    """params with the arrays of `names` moved by -step * grads (an SGD step of size `step`); the rest as they are."""
    out = dict(params)
    for n in names:
        out[n] = (np.asarray(params[n], dtype=np.float64) - step * grads[n]).astype(np.asarray(params[n]).dtype)
    return out


def percentiles(activations: dict) -> dict:
    """position -> {"all": [p15, p50, p85] over every unit, "unit": [...] of one fixed unit over the images}, from
    {position: input of its activation, channels on axis 1}."""
    out = {}
    for pos, h in activations.items():
        h = np.asarray(h, dtype=np.float64)
        unit = h[(slice(None), 0) + tuple(side // 2 for side in h.shape[2:])]
        out[pos] = {
            "all": [float(v) for v in np.percentile(h, PERCENTILES)],
            "unit": [float(v) for v in np.percentile(unit, PERCENTILES)],
        }
    return out


def internal_covariate_shift(gradient, params: dict, grads: dict, lr: float) -> dict:
    """layer -> {"rel_diff": ||G - G'|| / ||G||, "cos": cos(G, G')} for every layer after the first (module
    docstring). gradient(params) -> (loss, grads) on the step's batch; grads: its value at params."""
    layers = list(dict.fromkeys(layer_of(n) for n in grads))
    out = {}
    for i, layer in enumerate(layers[1:], start=1):
        earlier = [n for n in grads if layers.index(layer_of(n)) < i]
        mine = [n for n in grads if layer_of(n) == layer]
        _, after = gradient(moved(params, grads, lr, earlier))
        g = np.concatenate([grads[n].ravel() for n in mine])
        h = np.concatenate([after[n].ravel() for n in mine])
        gn, hn = np.linalg.norm(g), np.linalg.norm(h)
        out[layer] = {
            "rel_diff": float(np.linalg.norm(g - h) / gn) if gn > 0 else None,
            "cos": float(g @ h / (gn * hn)) if gn > 0 and hn > 0 else None,
        }
    return out


def landscape(gradient, params: dict, loss: float, grads: dict, lr: float, scales=STEP_SCALES) -> dict:
    """The loss variation, gradient predictiveness and effective beta-smoothness along -grads (module docstring),
    with the loss at each scale. gradient(params) -> (loss, grads); loss, grads: its value at params."""
    size = norm(grads)
    losses, changes, ratios = [], [], []
    for s in scales:
        there, there_grads = gradient(moved(params, grads, lr * s, list(grads)))
        change = norm({n: grads[n] - there_grads[n] for n in grads})
        losses.append(float(there))
        changes.append(change)
        ratios.append(change / (lr * s * size) if size > 0 else None)
    finite = [r for r in ratios if r is not None]
    return {
        "scales": list(scales),
        "losses": losses,
        "grad_changes": changes,
        "loss_variation": max(losses + [loss]) - min(losses + [loss]),
        "grad_predictiveness": max(changes),
        "beta_smoothness": max(finite) if finite else None,
    }


def measure(backend, params: dict, batch: tuple, probe_images, lr: float, noise=None, clock=time.perf_counter) -> dict:
    """Every measure at one step: params (canonical) before the step, batch = (images, labels) the step trains
    on, probe_images the fixed probe batch, noise the step's noisy-BN draws (None without): every forward
    is the step's, noise included. The record of the step, its own time included."""
    start = clock()
    images, labels = batch

    def gradient(at):
        g = backend.gradient(at, images, labels, noise=noise)
        return g.loss, g.grads

    # the probe batch's labels do not enter the percentiles (a train-mode forward's activations)
    zeros = np.zeros(len(probe_images), dtype=np.int64)
    probe = backend.gradient(params, probe_images, zeros, capture=True, noise=noise)
    loss, grads = gradient(params)
    return {
        "loss": loss,
        "grad_norm": norm(grads),
        "percentiles": percentiles(probe.activations),
        "ics": internal_covariate_shift(gradient, params, grads, lr),
        "landscape": landscape(gradient, params, loss, grads, lr),
        "seconds": clock() - start,
    }


class Tracer:
    """The measures of a run with --trace-every K: at every K-th SGD step of the run (counted from 0 across
    epochs, so the first step is traced), before the step, on its batch. common.loop calls measure() with its
    clock stopped and take() after each epoch, for the epoch record's fields."""

    def __init__(self, backend, config, images, labels, probe_images, clock=time.perf_counter):
        self.backend, self.config, self.clock = backend, config, clock
        self.images, self.labels, self.probe_images = images, labels, probe_images
        self.records = []

    def due(self, epoch: int, steps: int) -> set:
        """The steps of this epoch (0-based, of `steps`) to trace."""
        first = (epoch - 1) * steps
        every = self.config.trace_every
        return {step for step in range(steps) if (first + step) % every == 0}

    def measure(self, epoch: int, step: int, order, noise=None) -> None:
        """Trace step `step` of the epoch's `order` (numpy), with the epoch's noisy-BN draws (common.norms)."""
        index = np.asarray(order[step])
        batch = (self.images[index], self.labels[index])
        params = self.backend.get_params()
        step_noise = norms.noise_at(noise or {}, step)
        record = measure(self.backend, params, batch, self.probe_images, self.config.lr, step_noise, self.clock)
        self.records.append({"step": (epoch - 1) * len(order) + step, "epoch": epoch, **record})

    def take(self) -> dict:
        """{"trace": the records since the last take, "trace_seconds": their total time} for the epoch record."""
        records, self.records = self.records, []
        return {"trace": records, "trace_seconds": sum(r["seconds"] for r in records)}
