"""Snapshot and restore everything a finder run may touch, so the user's objects come back exact.

A run trains (weights and BatchNorm statistics move), switches modules to train mode,
moves the model to the run's device, steps an optimizer, draws from every RNG and advances
the loader's shuffling state. `UserState` records all of that before and puts it back after,
bit for bit, whether the run finished, was stopped or raised.

What counts as the user's: every parameter and buffer of the model (non-persistent buffers
included, which `state_dict` leaves out) and of a loss module, every parameter the user's
optimizer steps (a learnable temperature outside the model, say), their gradients, the
optimizer's state, each module's train/eval mode, the global RNGs, and the random generators a
loader and its samplers own (torch, numpy and Python ones). Persistent loader workers the run
started are shut down, so the user's next epoch starts them afresh from the restored RNG.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["UserState", "user_tensors", "rngs_kept"]


def user_tensors(model: nn.Module, loss_func: Any = None, optimizer: Any = None) -> list[Tensor]:
    "The parameters and buffers a run may change, each once: the model's, a loss module's, the optimizer's."
    modules = [model] + ([loss_func] if isinstance(loss_func, nn.Module) else [])
    found: dict[int, Tensor] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            found.setdefault(id(t), t)
    for group in getattr(optimizer, "param_groups", ()):
        for p in group["params"]:
            found.setdefault(id(p), p)
    return list(found.values())


class UserState:
    "Everything of the user's that a run may change; `restore()` puts it back exactly."

    def __init__(self, model: nn.Module, optimizer: Any = None, loader: Any = None, loss_func: Any = None):
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.tensors = user_tensors(model, loss_func, optimizer)
        # On an accelerator the copies live in host memory, so the run keeps its device memory.
        self.saved = [(t.device, _copy(t)) for t in self.tensors]
        self.grads = [None if t.grad is None else _copy(t.grad) for t in self.tensors]
        self.modules = [model] + ([loss_func] if isinstance(loss_func, nn.Module) else [])
        self.training = {m: m.training for root in self.modules for m in root.modules()}
        self.opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.rng = _rng_state()
        self.loader_rngs = _owned_generators(loader)
        self.loader_workers = getattr(loader, "_iterator", None)

    def restore(self) -> None:
        with torch.no_grad():
            for t, (device, saved) in zip(self.tensors, self.saved):
                if t.device != device:  # the run moved it: put it back where it was, same tensor object
                    t.data = saved.to(device, copy=True)
                else:
                    t.copy_(saved)
            for t, g in zip(self.tensors, self.grads):
                t.grad = None if g is None else g.to(t.device, copy=True)
        for m, mode in self.training.items():
            m.training = mode
        if self.opt_state is not None:  # after the tensors: state is cast to each parameter's device
            self.optimizer.load_state_dict(self.opt_state)
        _restore_rngs(self.rng, self.loader_rngs)
        self._drop_run_workers()

    def _drop_run_workers(self) -> None:
        """Shut down persistent workers (`persistent_workers=True`) that the run started.

        Each worker seeds its RNGs once, when it starts, and the run's batches advanced them: left alive, they
        would give the user's first epoch other augmentations than it would have had. Started afresh by the
        user's next epoch, they are seeded from the restored global RNG, as without the run. Workers that were
        running before the run cannot be rewound; they are left as they are.
        """
        workers = getattr(self.loader, "_iterator", None)
        if workers is not None and workers is not self.loader_workers:
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self.loader._iterator = None


def _copy(t: Tensor) -> Tensor:
    t = t.detach()
    return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()


@contextmanager
def rngs_kept(loader: Any = None) -> Iterator[None]:
    """On leaving, the global RNGs and the random generators `loader` owns are as they were on entry, whatever
    the block drew: for work done beside the user's training that must not change what it draws next."""
    rng, owned = _rng_state(), _owned_generators(loader)
    try:
        yield
    finally:
        _restore_rngs(rng, owned)


def _restore_rngs(rng: dict, owned: list[tuple[Any, str, Any, Any]]) -> None:
    "The global RNGs (`_rng_state`) and a loader's own generators (`_owned_generators`) as they were recorded."
    _set_rng_state(rng)
    for owner, name, gen, state in owned:
        setattr(owner, name, gen)  # fastai swaps its Random for a new one every epoch: put the original back
        _set_generator_state(gen, state)


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


_GENERATORS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def _owned_generators(loader: Any) -> list[tuple[Any, str, Any, Any]]:
    """(owner, attribute, generator, state) for each random generator held by the loader or its samplers.

    Iterating a loader advances the private generators of the loader, its sampler and batch sampler
    (a torch Generator, a numpy Generator or RandomState, a Python Random): each is recorded once.
    """
    if loader is None:
        return []
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = [loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]
    seen, out = set(), []
    for owner in {id(o): o for o in owners if o is not None}.values():
        for name, value in list(getattr(owner, "__dict__", {}).items()):
            if isinstance(value, _GENERATORS) and id(value) not in seen:
                seen.add(id(value))
                out.append((owner, name, value, _generator_state(value)))
    return out


def _generator_state(gen: Any) -> Any:
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    if isinstance(gen, np.random.Generator):
        return copy.deepcopy(gen.bit_generator.state)
    return gen.get_state() if isinstance(gen, np.random.RandomState) else gen.getstate()


def _set_generator_state(gen: Any, state: Any) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    elif isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    elif isinstance(gen, np.random.RandomState):
        gen.set_state(state)
    else:
        gen.setstate(state)
