"""furl_fast.envs suites: the Meta-World wrapper stack against traces recorded from the single-class
env it replaced (same observations, rewards, frames and seeds, bit for bit), the suite registry and
its errors, and the gymnasium suite on CartPole-v1, Humanoid-v5 and a small registered toy env (the
env contract, sparse and dense rewards, the goal image file, vector envs).

Rendering is software (llvmpipe) here: Humanoid renders are slow, so its tests take a few steps."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from furl_fast import ops
from furl_fast.envs import SUITES, get_suite
from furl_fast.envs.metaworld import furl_crop, make_env, make_vector_env
from furl_fast.reference import preprocess_frames as reference_preprocess

METAWORLD, GYM = get_suite("metaworld"), get_suite("gymnasium")


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def trace(env, steps: int, reset_seeds=(None,), seed: int = 0) -> list:
    """Everything an episode hands out, per reset and step: reward, flags, success, info keys and
    digests of the observation, info["state"] and info["vlm_frame"]; uniform random actions."""
    rng = np.random.default_rng(seed)
    out = []
    for reset_seed in reset_seeds:
        obs, info = env.reset(seed=reset_seed)
        out.append(["reset", digest(obs), sorted(info), info["success"], digest(info["state"]),
                    digest(info["vlm_frame"]) if "vlm_frame" in info else None])
        for _ in range(steps):
            obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
            out.append([repr(float(reward)), terminated, truncated, info["success"], digest(obs),
                        sorted(info), digest(info["state"]),
                        digest(info["vlm_frame"]) if "vlm_frame" in info else None])
            if truncated:
                break
    return out


# Recorded with this very trace() from the single-class Meta-World env (sparse reward, action repeat,
# pixels and stack in one class), the reference the wrapper stack must match exactly. Frames come from
# Mesa's llvmpipe, which renders the same bits for the same scene on every run. A trace holds info's
# key set too (the sparse reward's info["env_reward"] included).
GOLDEN = {
    "state_sparse": ({"task": "reach", "seed": 0, "vlm_frames": False}, 12, (None, 3),
                     "537e39899e9006cc", "cf6c98396fd3e834"),
    "state_dense_frames": ({"task": "drawer-open", "seed": 1, "reward": "dense", "frame_size": 64}, 4,
                           (None,), "835dab512924ad03", "9ae7039809905b11"),
    "state_repeat3_truncated": ({"task": "push", "seed": 2, "goal": "random", "reward": "dense",
                                 "vlm_frames": False, "action_repeat": 3, "max_episode_steps": 10}, 6,
                                (None, 7), "46aac4add4a0ca99", "e9dc5f8134fb5ea1"),
    # Re-recorded when the sparse reward came to be summed over the repeated steps: the trace
    # differs from the single-class env's only in its rewards, -2.0 where that one gave -1.0.
    "pixels_sparse_frames": ({"task": "pick-place", "seed": 2, "goal": "random", "obs": "pixels",
                              "frame_size": 64, "pixel_size": 32}, 4, (None, 5),
                             "8eadda194d459c4e", "7085b114d3e5ecca"),
    "pixels_dense_no_frames_truncated": ({"task": "reach", "seed": 0, "obs": "pixels",
                                          "reward": "dense", "vlm_frames": False, "frame_size": 64,
                                          "pixel_size": 24, "frame_stack": 2, "max_episode_steps": 8,
                                          "fast_render": False},
                                         5, (None,), "f093e7eb9093f13e", "e1706daa4fbf3f8c"),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_metaworld_stack_reproduces_the_recorded_env(case, closing):
    kwargs, steps, reset_seeds, want_trace, want_render = GOLDEN[case]
    kwargs = dict(kwargs)
    env = closing(make_env(kwargs.pop("task"), **kwargs))
    got = trace(env, steps, reset_seeds)
    assert digest(np.frombuffer(json.dumps(got).encode(), np.uint8)) == want_trace
    assert digest(env.render()) == want_render  # the last step's frame, without a new render


def test_metaworld_vector_env_and_goal_frame_reproduce_the_recorded_ones():
    envs = make_vector_env("reach", 2, seed=0, goal="random", asynchronous=False, frame_size=32,
                           max_episode_steps=3, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    try:
        obs, info = envs.reset(seed=1)
        rng = np.random.default_rng(0)
        got = [digest(obs["obs"], obs["frame"], info["state"])]
        for _ in range(4):
            obs, reward, _, truncated, info = envs.step(rng.uniform(-1, 1, (2, 4)).astype(np.float32))
            got.append([reward.tolist(), truncated.tolist(),
                        digest(obs["obs"], obs["frame"], info["state"], info["success"])])
            if "final_obs" in info:
                got.append(digest(*[info["final_obs"][i]["obs"] for i in range(2)],
                                  info["final_info"]["state"]))
    finally:
        envs.close()
    assert digest(np.frombuffer(json.dumps(got).encode(), np.uint8)) == "eb41adffc1cc27b1"
    # FuRL's goal image: the scripted expert's first success frame (step 46 for reach, seed 0).
    frame = METAWORLD.goal_frame("reach", seed=0)
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert digest(frame) == "195cfc72e0198821"


# --- the registry and the Meta-World suite ----------------------------------------------------------
def test_registry():
    assert set(SUITES) == {"metaworld", "gymnasium"}
    assert all(get_suite(name).name == name for name in SUITES)
    with pytest.raises(ValueError, match="suite 'dmc' is unknown.*metaworld, gymnasium"):
        get_suite("dmc")


def test_metaworld_suite_answers():
    assert len(METAWORLD.task_names()) == 50
    assert METAWORLD.canonical_task("drawer-open-v3") == "drawer-open" == METAWORLD.short_name("drawer-open")
    with pytest.raises(ValueError, match="task='drawer-opn' is unknown \\(did you mean 'drawer-open'"):
        METAWORLD.canonical_task("drawer-opn")
    assert METAWORLD.prompt("reach-v3") == "reach a goal position"
    assert METAWORLD.prompt("box-close") is None  # outside MT10: the user gives the prompt
    assert METAWORLD.crop is furl_crop and METAWORLD.crop(256, 256) == (32, 32, 192, 192)
    assert METAWORLD.reference_programs("reach").task == "reach-v3"
    assert METAWORLD.reference_programs("drawer-close") is None
    assert METAWORLD.max_episode_steps("reach") == 500
    assert METAWORLD.max_episode_steps("reach", max_episode_steps=10) == 10
    assert METAWORLD.random_goals
    with pytest.raises(ValueError, match="no option 'success_key' .*frame_size, camera"):
        make_env("reach", seed=0, success_key="success")


def test_encoder_takes_the_suite_crop(tiny_model):
    from furl_fast.vlm import load_encoder

    frames = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    furl = load_encoder(tiny_model, device="cpu", crop=METAWORLD.crop)
    assert furl.crop == "furl" and furl.interpolation == "bilinear"  # the same as crop="furl"
    torch.testing.assert_close(furl.encode_frames(frames),
                               load_encoder(tiny_model, device="cpu").encode_frames(frames))
    assert load_encoder(tiny_model, device="cpu", crop=GYM.crop).crop == "clip"

    def top_half(height, width):
        return (0, 0, height // 2, width)

    half = load_encoder(tiny_model, device="cpu", crop=top_half)
    assert half.crop.endswith("top_half") and half.interpolation == "bilinear"
    torch.testing.assert_close(half.preprocess(frames),
                               ops.preprocess_frames(torch.from_numpy(frames), size=half.image_size,
                                                     crop=(0, 0, 128, 256), mean=half.mean,
                                                     std=half.std))
    with pytest.raises(ValueError, match="'crop' must be 'clip', 'furl' or a crop-box function"):
        load_encoder(tiny_model, device="cpu", crop="centre")


# --- the gymnasium suite --------------------------------------------------------------------------
class ToyEnv(gym.Env):
    """Counts its steps; info["is_success"] from step 3 on; 6-step episodes (registered below)."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 0.25 * self.t, False, False, {"is_success": self.t >= 3, "t": self.t}

    def render(self):
        return np.full((5, 7, 3), self.t, np.uint8)

    def _obs(self):
        return np.array([self.t, self.np_random.uniform()], np.float32)


TOY = "furl_fast_test/Toy-v0"
if TOY not in gym.registry:
    gym.register(TOY, entry_point=ToyEnv, max_episode_steps=6)


def test_gymnasium_suite_answers():
    assert GYM.task_names() is None and GYM.prompt("CartPole-v1") is None
    assert GYM.crop == "clip" and GYM.reference_programs("CartPole-v1") is None
    assert GYM.canonical_task("CartPole-v1") == "CartPole-v1" == GYM.short_name("CartPole-v1")
    assert GYM.short_name(TOY) == "furl_fast_test-Toy-v0"
    assert GYM.canonical_task("gymnasium.envs.classic_control:CartPole-v1") == \
        "gymnasium.envs.classic_control:CartPole-v1"
    assert GYM.max_episode_steps("CartPole-v1") == 500 and GYM.max_episode_steps("Humanoid-v5") == 1000
    assert not GYM.random_goals


def test_gymnasium_suite_errors(closing, tmp_path):
    with pytest.raises(ValueError,
                       match="task='Cartpole-v1' is unknown to Gymnasium .*Did you mean: `CartPole`"):
        GYM.canonical_task("Cartpole-v1")
    with pytest.raises(ValueError, match="task='NoSuchEnv-v0' is unknown to Gymnasium"):
        GYM.make_env("NoSuchEnv-v0", seed=0)
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        GYM.canonical_task("no_such_module:Thing-v0")
    with pytest.raises(ValueError, match="no goal randomisation"):
        GYM.make_env("CartPole-v1", seed=0, goal="random")
    with pytest.raises(ValueError, match="no option 'frame_size' .*goal_image, success_key"):
        GYM.make_env("CartPole-v1", seed=0, frame_size=64)
    with pytest.raises(ValueError, match="success_key must be a string"):
        GYM.make_env("CartPole-v1", seed=0, success_key=1)
    with pytest.raises(ValueError, match="goal_image must be a file path"):
        GYM.goal_frame("CartPole-v1", seed=0, goal_image=3)
    env = closing(GYM.make_env("CartPole-v1", seed=0, success_key="is_success", vlm_frames=False))
    env.reset()  # a reset info may lack the key: nothing has happened yet
    with pytest.raises(ValueError, match="success_key 'is_success' is not in the info of its steps"):
        env.step(np.array([1.0, -1.0], np.float32))
    gym.register("furl_fast_test/Endless-v0", entry_point=ToyEnv)  # no max_episode_steps
    try:
        with pytest.raises(ValueError, match="registers no episode length"):
            GYM.make_env("furl_fast_test/Endless-v0", seed=0)
    finally:
        del gym.registry["furl_fast_test/Endless-v0"]


def test_gymnasium_contract_success_rewards_truncation(closing):
    """The toy env: success from its info key, sparse = success - 1, dense = its own reward summed
    over the repeats, truncation after its 6 registered steps (3 agent steps at action repeat 2)."""
    action = np.zeros(4, np.float32)
    sparse = closing(GYM.make_env(TOY, seed=0, success_key="is_success", action_repeat=2))
    obs, info = sparse.reset()
    assert info["success"] is False and np.array_equal(info["state"], obs)
    assert info["vlm_frame"].shape == (5, 7, 3) and info["vlm_frame"].dtype == np.uint8
    steps = [sparse.step(action) for _ in range(3)]
    # success from the 3rd simulator step on; the sparse reward is summed over the two repeats
    assert [s[1] for s in steps] == [-2.0, 0.0, 0.0]
    assert [s[4]["success"] for s in steps] == [False, True, True]
    assert [s[3] for s in steps] == [False, False, True] and not any(s[2] for s in steps)
    assert [s[4]["t"] for s in steps] == [2, 4, 6]  # the last repeat's info
    assert all(np.array_equal(s[4]["state"], s[0]) for s in steps)
    assert np.all(steps[-1][4]["vlm_frame"] == 6) and sparse.render() is steps[-1][4]["vlm_frame"]

    dense = closing(GYM.make_env(TOY, seed=0, reward="dense", action_repeat=2))
    dense.reset()
    assert [dense.step(action)[1] for _ in range(3)] == [0.25 + 0.5, 0.75 + 1.0, 1.25 + 1.5]
    none = closing(GYM.make_env(TOY, seed=0, action_repeat=2))  # sparse without a success key
    none.reset()
    step = none.step(action)
    assert step[1] == 0.0 and step[4]["success"] is False  # the VLM reward alone

    # The first reset without a seed uses make_env's seed; reset(seed=...) re-seeds.
    first = [closing(GYM.make_env(TOY, seed=s, vlm_frames=False)).reset()[0][1] for s in (3, 3, 4)]
    assert first[0] == first[1] != first[2]


def test_cartpole_state_and_pixels(closing):
    env = closing(GYM.make_env("CartPole-v1", seed=0))
    # Discrete(2) is learned as two scores, Box(-1, 1, (2,)); the argmax is the action.
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    obs, info = env.reset()
    assert obs.shape == (4,) and np.array_equal(info["state"], obs) and info["success"] is False
    assert info["vlm_frame"].shape == (400, 600, 3) and info["vlm_frame"].dtype == np.uint8
    twin = closing(gym.make("CartPole-v1"))
    np.testing.assert_array_equal(obs, twin.reset(seed=0)[0])
    rewards, ended = [], False
    for _ in range(200):
        # Always push right (action 1): the pole falls.
        obs, reward, terminated, truncated, info = env.step(np.array([-0.3, 0.2], np.float32))
        np.testing.assert_array_equal(obs, twin.step(1)[0])
        rewards.append(reward)
        assert np.array_equal(info["state"], obs) and info["success"] is False
        if terminated or truncated:
            ended = terminated
            break
    assert ended and set(rewards) == {0.0}  # terminated early, no task reward
    again = closing(GYM.make_env("CartPole-v1", seed=0, vlm_frames=False))
    np.testing.assert_array_equal(again.reset()[0], env.reset(seed=0)[0])

    dense = closing(GYM.make_env("CartPole-v1", seed=0, reward="dense", vlm_frames=False))
    dense.reset()
    assert dense.step(np.array([0.5, 0.1], np.float32))[1] == 1.0  # CartPole's own reward
    with pytest.raises(ValueError, match=r"the action must have shape \(2,\), got \(\)"):
        dense.step(0)

    pixels = closing(GYM.make_env("CartPole-v1", seed=0, obs="pixels", vlm_frames=True))
    obs, info = pixels.reset()
    assert pixels.action_repeat == 2 and obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert info["state"].shape == (4,)
    obs, *_, info = pixels.step(np.array([1.0, 0.0], np.float32))
    # The 84x84 view is the whole 600x400 VLM frame of the same render, resized (1 LSB: rounding).
    expected = reference_preprocess(torch.from_numpy(info["vlm_frame"])[None], size=84,
                                    mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)[0]
    assert (expected - torch.from_numpy(obs[6:]).float()).abs().max() <= 1.0


def test_humanoid_state_and_pixels(closing):
    """A few steps only: every Humanoid frame is a MuJoCo render in software."""
    env = closing(GYM.make_env("Humanoid-v5", seed=0, reward="dense"))
    twin = closing(gym.make("Humanoid-v5"))  # the plain env, same seed and actions
    obs, info = env.reset()
    # float64 MuJoCo observations come as float32, the agents' dtype.
    assert obs.dtype == np.float32 and env.observation_space.dtype == np.float32
    np.testing.assert_array_equal(obs, twin.reset(seed=0)[0].astype(np.float32))
    assert obs.shape == (348,) and np.array_equal(info["state"], obs)
    assert info["vlm_frame"].shape == (256, 256, 3) and info["vlm_frame"].dtype == np.uint8
    actions = np.random.default_rng(0).uniform(-0.4, 0.4, (2, 17)).astype(np.float32)
    for action in actions:
        obs, reward, _, truncated, info = env.step(action)
        assert reward == twin.step(action)[1] and not truncated and info["success"] is False
    assert env.unwrapped.model.vis.quality.shadowsize == 0  # fast_render

    pixels = closing(GYM.make_env("Humanoid-v5", seed=0, obs="pixels", vlm_frames=False,
                                  pixel_size=32))
    obs, info = pixels.reset()
    assert obs.shape == (9, 32, 32) and obs.dtype == np.uint8 and info["state"].shape == (348,)
    assert "vlm_frame" not in info
    obs, reward, *_ = pixels.step(actions[0])
    assert obs.shape == (9, 32, 32) and reward == 0.0  # sparse without a success key
    assert not np.array_equal(obs[:3], obs[6:]), "the body moved, so the stacked frames differ"


def test_goal_image_file(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "goal.png", rgb)
    iio.imwrite(tmp_path / "rgba.png", np.dstack([rgb, np.full((20, 30), 255, np.uint8)]))
    iio.imwrite(tmp_path / "grey.png", rgb[..., 0])
    for name, want in (("goal.png", rgb), ("rgba.png", rgb), ("grey.png", np.dstack([rgb[..., 0]] * 3))):
        frame = GYM.goal_frame("CartPole-v1", seed=0, goal_image=tmp_path / name)
        assert frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, want)
    with pytest.raises(ValueError, match=r"set its goal_image option \(--gym.goal-image FILE\)"):
        GYM.goal_frame("CartPole-v1", seed=0)
    with pytest.raises(ValueError, match="cannot read an image there"):
        GYM.goal_frame("CartPole-v1", seed=0, goal_image=str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read an image there"):
        GYM.goal_frame("CartPole-v1", seed=0, goal_image=tmp_path / "text.png")
    iio.imwrite(tmp_path / "deep.png", rgb[..., 0].astype(np.uint16) * 256)  # 16-bit grey
    with pytest.raises(ValueError, match="expected an 8-bit RGB image"):
        GYM.goal_frame("CartPole-v1", seed=0, goal_image=tmp_path / "deep.png")


def test_gymnasium_vector_envs():
    envs = GYM.make_vector_env(TOY, 2, seed=0, asynchronous=False, success_key="is_success")
    try:
        obs, info = envs.reset()
        assert obs["obs"].shape == (2, 2) and obs["frame"].shape == (2, 5, 7, 3)
        assert obs["obs"][0, 1] != obs["obs"][1, 1], "worker i is seeded with seed + i"
        np.testing.assert_array_equal(info["state"], obs["obs"])
        for _ in range(3):
            obs, reward, _, _, info = envs.step(np.zeros((2, 4), np.float32))
        assert reward.tolist() == [0.0, 0.0] and info["success"].tolist() == [True, True]
    finally:
        envs.close()

    envs = GYM.make_vector_env("CartPole-v1", 2, seed=0)  # worker processes: frames in shared memory
    try:
        obs, info = envs.reset(seed=0)
        assert obs["obs"].shape == (2, 4) and obs["frame"].shape == (2, 400, 600, 3)
        assert obs["frame"].dtype == np.uint8 and not np.array_equal(obs["obs"][0], obs["obs"][1])
        obs, reward, _, _, info = envs.step(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
        assert reward.tolist() == [0.0, 0.0] and info["success"].dtype == bool
        np.testing.assert_array_equal(info["state"], obs["obs"])
    finally:
        envs.close()
