"""A trained agent's policy: loaded from a run directory or from an exported actor file.

    agent = furl_fast.load_agent("runs/sac-reach-s0-20261121-101500")
    action = agent.act(obs)                     # the deterministic policy (evaluation)
    agent.export_actor("reach-actor.pt")        # the actor alone
    policy = furl_fast.load_actor("reach-actor.pt")   # no run directory needed

Only the networks that choose actions are loaded: never the replay buffer, critics or optimisers.
An exported actor of the default networks takes 317 kB (state SAC) or 12 MB (DrQ-v2, its pixel
encoder included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from furl_fast.config import Config, config_from_dict, config_to_dict
from furl_fast.runs import CHECKPOINT_DIR, STATE_FILE, _read_config_json, load_state

__all__ = ["Policy", "load_actor", "load_agent"]

ACTOR_FORMAT = "furl_fast actor 1"
"""The first value of an exported actor file; a file without it is refused."""


class Policy:
    """The actor of a trained agent (config.agent sac or drq), in evaluation mode.

    What act() takes as obs, per agent:
    - sac: the environment's observation, (obs_dim,) or (B, obs_dim) float (Meta-World: 39 values);
    - drq: the stacked pixels the environment wrapper gives, (3 * frame_stack, S, S) or
      (B, 3 * frame_stack, S, S) uint8 channel-first, oldest frame first (S = config.drq.image_size;
      furl_fast.evaluate.make_eval_env(config) makes such an environment).

    config: the run's furl_fast.config.Config. step: the simulator steps it was trained for.
    """

    def __init__(self, config: Config, step: int, state: dict[str, dict[str, torch.Tensor]],
                 device: str | torch.device = "cpu"):
        self.config, self.step, self.device = config, step, torch.device(device)
        try:
            self.modules = _build_modules(config, state)
        except (KeyError, IndexError, RuntimeError, TypeError) as exc:  # names or shapes that differ
            raise ValueError(f"the saved actor does not fit a {config.agent} agent ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}).") from exc
        for module in self.modules.values():
            module.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """obs (see the class docstring), one or a batch -> actions (act_dim,) or (B, act_dim) float32
        in [-1, 1]. deterministic=True: the policy the evaluations run (sac: tanh of the mean; drq:
        the mean); False: sac samples its squashed Gaussian, drq adds its exploration noise at the
        checkpoint's agent step (both from torch's global random generator)."""
        if self.config.agent == "drq":
            from furl_fast.agents.drq import exploration_std

            encoder, actor = self.modules["encoder"], self.modules["actor"]
            x = torch.as_tensor(obs, device=self.device)
            single = x.dim() == 3
            h = encoder(x.unsqueeze(0) if single else x)
            if deterministic:
                action = actor(h)
            else:
                agent_step = self.step // self.config.drq.action_repeat
                action = actor.sample(h, exploration_std(self.config.drq, agent_step), clip=None)
        else:
            from furl_fast.agents.sac import observation_batch

            actor = self.modules["actor"]
            x, single = observation_batch(obs, actor.net[0].in_features, self.device, "Policy.act")
            action = torch.tanh(actor(x)[0]) if deterministic else actor.sample(x)[0]
        action = action.float().cpu().numpy()
        return action[0] if single else action

    def export_actor(self, path: str | os.PathLike) -> Path:
        """Writes the actor alone (state dicts and the run's configuration: tensors and plain values,
        read back with torch.load(weights_only=True)); load_actor(path) makes this Policy again."""
        path = Path(path)
        torch.save({"format": ACTOR_FORMAT, "step": self.step, "config": json.dumps(config_to_dict(self.config)),
                    "state": {name: m.state_dict() for name, m in self.modules.items()}}, path)
        return path


def _build_modules(config: Config, state: dict[str, dict[str, torch.Tensor]]) -> dict[str, nn.Module]:
    """The actor's modules with their weights; their sizes come from the weights themselves."""
    if config.agent == "drq":
        from furl_fast.agents.drq import Actor, PixelEncoder

        channels = state["encoder"]["convs.0.weight"].shape[1]
        size = config.drq.image_size
        encoder = PixelEncoder((channels, size, size),
                               torch.bfloat16 if config.drq.precision == "bf16" else torch.float32)
        act_dim = _last_weight(state["actor"]).shape[0]
        actor = Actor(encoder.repr_dim, act_dim, config.drq.feature_dim, config.drq.hidden_dim)
        encoder.load_state_dict(state["encoder"])
        actor.load_state_dict(state["actor"])
        return {"encoder": encoder, "actor": actor}
    from furl_fast.agents.sac import Actor

    obs_dim = state["actor"]["net.0.weight"].shape[1]
    act_dim = _last_weight(state["actor"]).shape[0] // 2  # the mean and the std of each action
    actor = Actor(obs_dim, act_dim, tuple(config.sac.hidden_dims), config.sac.std_min)
    actor.load_state_dict(state["actor"])
    return {"actor": actor}


def _last_weight(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return [v for k, v in state.items() if k.endswith("weight")][-1]


def run_config(run_dir: Path) -> Config:
    """The configuration of the run in run_dir; ValueError (one line) when it holds no run."""
    if not (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
        raise ValueError(f"{run_dir} is not a run directory with a checkpoint (no "
                         f"{CHECKPOINT_DIR}/{STATE_FILE} in it); give a directory a training run wrote.")
    try:
        return config_from_dict(Config, _read_config_json(run_dir / "config.json"))
    except ValueError as exc:
        raise ValueError(f"{run_dir / 'config.json'}: {exc}") from exc


def load_agent(run_dir: str | os.PathLike, checkpoint: str | int = "latest",
               device: str | torch.device = "cpu") -> Policy:
    """The trained agent of a run directory, from its checkpoint (state.pt; the replay buffer is
    never read). checkpoint: "latest", or the step of the checkpoint on disk (a run keeps its latest
    only). Raises ValueError (one line) for a directory without a run, a damaged checkpoint or
    another step."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    state = load_state(run_dir / CHECKPOINT_DIR / STATE_FILE)
    if str(checkpoint) not in ("latest", str(state["step"])):
        raise ValueError(f"checkpoint {checkpoint}: {run_dir} keeps only its latest checkpoint, so the "
                         f"one step available is {state['step']}; ask for latest or {state['step']}.")
    names = ("encoder", "actor") if config.agent == "drq" else ("actor",)
    agent = state.get("agent")
    if not isinstance(agent, dict) or not all(isinstance(agent.get(n), dict) for n in names):
        raise ValueError(f"{run_dir / CHECKPOINT_DIR / STATE_FILE} holds no {config.agent} agent.")
    return Policy(config, state["step"], {n: agent[n] for n in names}, device)


def load_actor(path: str | os.PathLike, device: str | torch.device = "cpu") -> Policy:
    """The Policy that Policy.export_actor wrote to path; ValueError (one line) for any other file.
    Nothing in the file is run: it is read with torch.load(weights_only=True)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a damaged file, or one that pickles objects)
        raise ValueError(f"{path} cannot be read as an exported actor ({type(exc).__name__}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != ACTOR_FORMAT or \
            not isinstance(payload.get("step"), int) or not isinstance(payload.get("state"), dict) or \
            not isinstance(payload.get("config"), str):
        raise ValueError(f"{path} is not an actor that Policy.export_actor wrote.")
    try:
        config = config_from_dict(Config, json.loads(payload["config"]))
    except ValueError as exc:
        raise ValueError(f"{path}: its configuration: {exc}") from exc
    return Policy(config, payload["step"], payload["state"], device)
