"""A run directory as a sac checkpoint leaves it, without training one (python_tests/ is on
sys.path): config.json and a one-transition replay file; the caller writes state.pt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from furl_fast import ReplayBuffer
from furl_fast.config import Config, config_to_dict
from furl_fast.runs import CHECKPOINT_DIR

REPLAY = "replay-0000000001.bin"


def fake_run_dir(run_dir: Path) -> Path:
    """Writes config.json and checkpoints/REPLAY; returns the checkpoints folder."""
    ckpt = run_dir / CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    cfg = Config(algo="sac", task="reach", device="cpu", run_dir=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    buf = ReplayBuffer(100, (39,), 4)
    buf.start_episode(np.zeros(39, np.float32))
    buf.add(np.ones(39, np.float32), np.zeros(4, np.float32), 0.0, False, False)
    buf.save(ckpt / REPLAY)
    return ckpt
