"""Host-side launch helpers shared by the Triton ops: tile names for benchmark rows, integer
grid arithmetic, and autotuned launches that skip the autotuner's lookup once it has picked."""
from __future__ import annotations

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host ints, as ``triton.cdiv`` computes it. Since Triton 3.9 that one is a
    ``ConstexprFunction`` (usable inside kernels) and costs ~2 us per host call; the masked CE
    launchers make ~35 such calls per forward and backward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` for ``n >= 1`` (0 for ``n < 1``, as ``triton.next_power_of_2``
    gives for 0), without Triton 3.9's ``ConstexprFunction`` call."""
    return 1 << (n - 1).bit_length() if n >= 1 else 0


def tile_name(c: triton.Config) -> str:
    """``BLOCK_M x BLOCK_N [x BLOCK_K] w<warps> s<stages>`` of a launch configuration."""
    k = c.kwargs
    name = "x".join(str(k[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in k) + f" w{c.num_warps} s{c.num_stages}"
    return name + (" split" if k.get("SPLIT_M") else "") + (" tma" if k.get("TMA") else "")


def _pick_key(tuner, args, kwargs) -> tuple:
    """The autotuner's cache key for these arguments, as ``Autotuner.run`` forms it: the values
    of its ``key`` arguments, then the dtype of every argument that has one (dtype objects here,
    their names there: the same partition)."""
    where = tuner.__dict__.get("_l2v_key_at")
    if where is None:  # positions of the key arguments among the kernel's, once per tuner
        names = tuner.arg_names
        where = tuner._l2v_key_at = [(k, names.index(k) if k in names else None) for k in tuner.keys]
    n = len(args)
    key = [kwargs[k] if k in kwargs else args[i] for k, i in where if k in kwargs or (i is not None and i < n)]
    key.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
    key.extend(v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor))
    return tuple(key)


def launch_tuned(tuner, grid, args, kwargs, prepare=None) -> triton.Config:
    """Launch ``tuner``'s kernel (``tuner[grid](*args, **kwargs)``) and return the config it ran.

    The first launch of each autotuner key goes through the autotuner (which times the configs
    the first time, then reads its cache); later ones launch the kernel directly with the config
    it picked for that key. ``Autotuner.run`` rebuilds a dict of every argument, filters it
    against the argument-name list and forms the key on every call: ~20 us of host time per
    launch for the attention kernels' 44-59 arguments, three launches per layer and step (a
    small model's training step is host-bound). Configs with a ``pre_hook`` (which must run before
    every launch) always go through the autotuner, as do single-config tuners (it skips its
    lookup for those itself). ``grid`` is a tuple, or a callable of the config's kwargs (the tile
    sizes) as the autotuner's grid callables are here. ``tuner.best_config`` is set either way.
    ``prepare(config)``, where given, does what the configs' pre_hooks do (they must then only
    adjust arguments to the config): such configs are remembered too, and it runs before each
    direct launch.
    """
    if len(tuner.configs) <= 1:
        tuner[grid](*args, **kwargs)
        return tuner.best_config
    picks = tuner.__dict__.get("_l2v_picks")
    if picks is None:
        picks = tuner._l2v_picks = {}
    key = _pick_key(tuner, args, kwargs)
    hit = picks.get(key)
    if hit is not None:
        cfg, cfg_kwargs = hit
        if prepare is not None:
            prepare(cfg)
        tuner.fn[grid(cfg.kwargs) if callable(grid) else grid](*args, **kwargs, **cfg_kwargs)
        tuner.best_config = cfg
        return cfg
    tuner[grid](*args, **kwargs)
    cfg = tuner.best_config
    if cfg.pre_hook is None or prepare is not None:
        picks[key] = (cfg, cfg.all_kwargs())
    return cfg
