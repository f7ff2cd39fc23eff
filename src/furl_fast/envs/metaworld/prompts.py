"""Task descriptions the VLM embeds as the language goal (FuRL's MT10 table, ../shared/spec/furl.md)."""

from __future__ import annotations

from furl_fast.envs.metaworld.tasks import canonical_task

MT10_PROMPTS: dict[str, str] = {
    "window-open": "push and open a window",
    "window-close": "push and close a window",
    "button-press-topdown": "press a button from the top",
    "door-open": "open a door with a revolving joint",
    "drawer-close": "push and close a drawer",
    "drawer-open": "open a drawer",
    "push": "push the puck to a goal",
    "reach": "reach a goal position",
    "pick-place": "pick and place a puck to a goal",
    "peg-insert-side": "insert a peg sideways",
}
"""FuRL's prompt for each MT10 task, keyed by plain task name."""


def task_prompt(task: str, prompt: str | None = None) -> str:
    """The text goal for `task`: `prompt` when given (any task), else the MT10 table entry.

    task: plain ("drawer-open") or "-v3" name. Tasks outside MT10 need an explicit prompt.
    """
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"task_prompt: 'prompt' must be a non-empty string, got {prompt!r}.")
        return prompt
    name = canonical_task(task)
    if name not in MT10_PROMPTS:
        raise ValueError(
            f"task_prompt: no built-in prompt for task {task!r} (the table covers the MT10 tasks: "
            f"{', '.join(sorted(MT10_PROMPTS))}); give one, e.g. task_prompt({task!r}, "
            "prompt='close the box lid')."
        )
    return MT10_PROMPTS[name]
