"""Snapshot and restore everything a finder run may touch, so the user's objects come back exact.

A run trains (weights and BatchNorm statistics move), switches modules to train mode,
moves the model to the run's device, steps an optimizer, draws from every RNG and advances
the loader's shuffling state. `UserState` records all of that before and puts it back after,
bit for bit, whether the run finished, was stopped or raised.
"""
from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["UserState"]


class UserState:
    "Everything of the user's that a run may change; `restore()` puts it back exactly."

    def __init__(self, model: nn.Module, optimizer: Any = None, loader: Any = None):
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.device = _device_of(model)
        # On an accelerator the copies live in host memory, so the run keeps its device memory.
        offload = self.device.type != "cpu"
        self.tensors = {k: _copy(v, offload) for k, v in model.state_dict(keep_vars=True).items()}
        self.grads = [None if p.grad is None else _copy(p.grad, offload) for p in model.parameters()]
        self.training = {m: m.training for m in model.modules()}
        self.opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.rng = _rng_state()
        self.loader_rng = _loader_rng_state(loader)

    def restore(self) -> None:
        model = self.model
        if _device_of(model) != self.device:
            model.to(self.device)
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for k, saved in self.tensors.items():
                current[k].data.copy_(saved)
            for p, g in zip(model.parameters(), self.grads):
                p.grad = None if g is None else g.to(p.device).clone()
        for m, mode in self.training.items():
            m.training = mode
        if self.opt_state is not None:
            self.optimizer.load_state_dict(self.opt_state)
        _set_rng_state(self.rng)
        _set_loader_rng_state(self.loader, self.loader_rng)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _copy(t: torch.Tensor, offload: bool) -> torch.Tensor:
    t = t.detach()
    return t.to("cpu", copy=True) if offload else t.clone()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _loader_rng_state(loader: Any) -> tuple:
    """The private random state a loader advances as it is iterated.

    fastai's DataLoader replaces its `random.Random` every epoch, so the object itself is kept to
    be put back; torch generators (the loader's, its sampler's) are restored in place, each once.
    """
    rng = getattr(loader, "rng", None)
    fastai_rng = (rng, rng.getstate()) if isinstance(rng, random.Random) else None
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    generators = {id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)}
    return fastai_rng, [(g, g.get_state()) for g in generators.values()]


def _set_loader_rng_state(loader: Any, state: tuple) -> None:
    fastai_rng, generators = state
    if fastai_rng is not None:
        loader.rng, rng_state = fastai_rng
        loader.rng.setstate(rng_state)
    for gen, gen_state in generators:
        gen.set_state(gen_state)
