"""Hand-written reference program sets for Meta-World v3 tasks, so that the verifier and the dense
reward work (and are tested) without any VLM service.

They read only the state (the frame argument is ignored). Meta-World v3 observation layout (39,):
[0:3] hand xyz, [3] gripper opening, [4:7] first object xyz, [7:11] its quaternion, [11:18] second
object, [18:36] the previous step's [0:18], [36:39] goal xyz (zeros when the goal is hidden).
Thresholds follow each task's own success test in metaworld (evaluate_state):
- drawer-open: success when the handle is within 0.03 of the target, which lies maxDist = 0.2
  along -y from the closed handle, i.e. the handle has moved >= 0.17 along -y;
- button-press-topdown: success when the button is within 0.024 (in z) of the pressed position,
  about 0.09 below the rest position, i.e. the button has gone down by >= ~0.07;
- reach: success when the hand is within 0.05 of the goal (needs the goal in the observation).
Programs remember the first state of the episode in a global (programs are re-instantiated per
episode, see sandbox.py).
"""

from __future__ import annotations

from furl_fast.rewards.code.program_set import ProgramSet

__all__ = ["REFERENCE_PROGRAM_SETS", "reference_program_set"]

_DRAWER_OPEN = ProgramSet(
    task="drawer-open-v3",
    subtasks=(
        "move the gripper to the drawer handle",
        "pull the drawer open",
    ),
    programs=(
        """
import numpy as np

def done(frame, state):
    hand, handle = state[0:3], state[4:7]
    return bool(np.linalg.norm(hand - handle) < 0.04)
""",
        """
start_y = None

def done(frame, state):
    global start_y
    if start_y is None:
        start_y = float(state[5])   # the handle's y when the episode began (drawer closed)
    return bool(start_y - float(state[5]) >= 0.17)
""",
    ),
)

_BUTTON_PRESS_TOPDOWN = ProgramSet(
    task="button-press-topdown-v3",
    subtasks=(
        "move the gripper right above the button",
        "press the button down",
    ),
    programs=(
        """
import numpy as np

def done(frame, state):
    hand, button = state[0:3], state[4:7]
    return bool(np.linalg.norm(hand[:2] - button[:2]) < 0.02 and hand[2] > button[2])
""",
        """
start_z = None

def done(frame, state):
    global start_z
    if start_z is None:
        start_z = float(state[6])   # the button's height at rest
    return bool(start_z - float(state[6]) >= 0.07)
""",
    ),
)

_REACH = ProgramSet(
    task="reach-v3",
    subtasks=(
        "move the gripper halfway to the goal",
        "move the gripper to the goal",
    ),
    programs=(
        """
import numpy as np

start = None

def done(frame, state):
    global start
    d = float(np.linalg.norm(state[0:3] - state[36:39]))
    if start is None:
        start = d
    return d <= 0.5 * start
""",
        """
import numpy as np

def done(frame, state):
    return bool(np.linalg.norm(state[0:3] - state[36:39]) <= 0.05)
""",
    ),
)

REFERENCE_PROGRAM_SETS: dict[str, ProgramSet] = {
    ps.task: ps for ps in (_DRAWER_OPEN, _BUTTON_PRESS_TOPDOWN, _REACH)
}


def reference_program_set(task: str) -> ProgramSet:
    """The reference set for a Meta-World task name ('drawer-open-v3' or 'drawer-open')."""
    key = task if task.endswith("-v3") else f"{task}-v3"
    if key not in REFERENCE_PROGRAM_SETS:
        raise KeyError(
            f"no reference program set for {task!r}; available: {sorted(REFERENCE_PROGRAM_SETS)}"
        )
    return REFERENCE_PROGRAM_SETS[key]
