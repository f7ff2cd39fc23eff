"""Meta-World's task names. furl_fast uses the v3 tasks of the current release (metaworld 3.x) under
their plain names ("drawer-open" for "drawer-open-v3"); canonical_task is the one place that maps one
to the other."""

from __future__ import annotations

from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from furl_fast.envs.suite import did_you_mean

_SUFFIX = "-v3"

TASKS: tuple[str, ...] = tuple(sorted(name.removesuffix(_SUFFIX) for name in ALL_V3_ENVIRONMENTS))
"""The 50 Meta-World v3 task names, without the "-v3" suffix."""

MT10_TASKS: tuple[str, ...] = (
    "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
    "button-press-topdown", "peg-insert-side", "window-open", "window-close",
)
"""The ten MT10 tasks FuRL reports on."""

EPISODE_STEPS = 500  # Meta-World's max_path_length; FuRL's episodes only truncate, at this length.


def canonical_task(task: str) -> str:
    """The plain task name ("drawer-open") for a plain or "-v3" name; ValueError naming the closest
    task and listing all 50 otherwise."""
    name = task.removesuffix(_SUFFIX) if isinstance(task, str) else task
    if name not in TASKS:
        raise ValueError(f"task={task!r} is unknown{did_you_mean(name, TASKS)}; the {len(TASKS)} "
                         f"Meta-World tasks (each also as NAME{_SUFFIX}): {', '.join(TASKS)}.")
    return name


def metaworld_name(task: str) -> str:
    """Meta-World's own name of `task` ("drawer-open-v3"), as its env and policy tables key it."""
    return canonical_task(task) + _SUFFIX
