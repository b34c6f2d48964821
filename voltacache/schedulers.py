"""Scheduler names on the command line -> diffusers schedulers built from the model's own config.

Importing this module does not import diffusers: the request type (torch-free) reads the names.
"""

from __future__ import annotations

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: dict, steps: int | None = None):
    """A fresh scheduler (its state is per request) of kind `name` from the model's scheduler config.

    With `steps`, an offset that would push the first timestep past the trained range is lowered:
    SD's "leading" spacing plus steps_offset=1 asks DDIM and PNDM for timestep 1000 of 0..999 at
    1000 steps (an IndexError in diffusers' own pipeline too). Every other step count keeps
    diffusers' schedule exactly.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    config = {**config, **overrides}
    if steps is not None and config.get("timestep_spacing", "leading") == "leading":
        trained = config.get("num_train_timesteps", 1000)
        last = (steps - 1) * (trained // steps) + config.get("steps_offset", 0)
        if last >= trained:
            config["steps_offset"] = max(0, config.get("steps_offset", 0) - (last - trained + 1))
    return getattr(diffusers, cls_name).from_config(config)
