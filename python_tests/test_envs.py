"""furl_fast.envs.metaworld: Meta-World factory, sparse reward, truncation, scenes, upright frames, experts, vector
envs. Rendering is software (llvmpipe) here, so frames are only rendered where a test needs them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from furl_fast.envs.metaworld import (
    MT10_TASKS,
    TASKS,
    Rollout,
    expert_policy,
    expert_rollout,
    make_env,
    make_vector_env,
    random_rollout,
)
from furl_fast.envs.metaworld import canonical_task as resolve_task
from furl_fast.reference import preprocess_frames as reference_preprocess


def test_task_names():
    assert len(TASKS) == 50 and set(MT10_TASKS) <= set(TASKS)
    assert resolve_task("drawer-open-v3") == "drawer-open" == resolve_task("drawer-open")
    with pytest.raises(ValueError, match="task='drawer-opn' is unknown .did you mean 'drawer-open'"):
        make_env("drawer-opn", seed=0)


def test_bad_arguments(closing):
    with pytest.raises(ValueError, match="'goal'"):
        make_env("reach", seed=0, goal="moving")
    with pytest.raises(ValueError, match="'obs'"):
        make_env("reach", seed=0, obs="rgb")
    env = closing(make_env("reach", seed=0, vlm_frames=False))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4, np.float32))
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([0, np.nan, 0, 0], np.float32))


@pytest.mark.parametrize("obs", ["state", "pixels"])
def test_gymnasium_env_checker(obs, closing):
    from gymnasium.utils.env_checker import check_env

    env = closing(make_env("drawer-open", seed=0, obs=obs))
    check_env(env, skip_render_check=False)
    assert env.observation_space.dtype == (np.float32 if obs == "state" else np.uint8)


@pytest.mark.parametrize("action_repeat", [1, 2])
def test_dense_reward_is_meta_worlds_shaped_reward_summed_over_repeats(action_repeat, closing):
    """reward="dense" (the oracle) hands the critic Meta-World's own reward: the raw env's reward,
    summed over the repeated simulator steps; success is whether any of the repeats succeeded."""
    env = closing(make_env("reach", seed=0, vlm_frames=False, reward="dense",
                           action_repeat=action_repeat))
    twin = closing(make_env("reach", seed=0, vlm_frames=False, action_repeat=1))
    policy = expert_policy(env)
    state, _ = env.reset()
    twin.reset()
    rewards, raw_sums = [], []
    for _ in range(60):
        action = policy(state)
        state, reward, _, _, info = env.step(action)
        raw_sum, twin_success = 0.0, False
        for _ in range(action_repeat):
            _, _, _, _, twin_info = twin.step(action)
            twin_success = twin_success or twin_info["success"]
            raw_sum += float(twin.unwrapped._raw.compute_reward(np.clip(action, -1, 1),
                                                                twin.unwrapped._raw._get_obs())[0])
        assert info["success"] == twin_success
        rewards.append(reward)
        raw_sums.append(raw_sum)
    np.testing.assert_allclose(rewards, raw_sums, rtol=1e-6)
    assert min(rewards) > 0 and len(set(rewards)) > 10  # shaped: positive and varying, not -1/0
    with pytest.raises(ValueError, match="'reward' must be 'sparse' or 'dense'"):
        make_env("reach", seed=0, reward="shaped")


def test_sparse_reward_matches_success_and_truncates_at_500(closing):
    env = closing(make_env("reach", seed=0, vlm_frames=False))
    policy = expert_policy(env)
    state, info = env.reset()
    assert info["success"] is False
    rewards, successes = [], []
    for t in range(500):
        action = policy(state) if t < 250 else env.action_space.sample()  # success, then not
        state, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        successes.append(info["success"])
        assert terminated is False
        assert truncated is (t == 499), f"truncated={truncated} at step {t + 1}"
    rewards, successes = np.array(rewards), np.array(successes)
    assert set(np.unique(rewards)) <= {-1.0, 0.0}
    np.testing.assert_array_equal(rewards, successes.astype(float) - 1.0)
    assert successes.any() and not successes.all()  # both reward values really occur
    with pytest.raises(RuntimeError, match="truncated"):
        env.step(env.action_space.sample())
    env.reset()
    env.step(env.action_space.sample())  # a reset starts a fresh 500-step episode


def test_sparse_reward_is_summed_over_repeats_and_success_is_any_repeat(closing):
    """Under action repeat the sparse reward, like the dense one (and like DrQ-v2's action repeat),
    is the sum over the simulator steps: -2, -1 or 0 at repeat 2; success is whether any of them
    succeeded. Checked against the same env without repeat."""
    env = closing(make_env("reach", seed=0, vlm_frames=False, action_repeat=2))
    twin = closing(make_env("reach", seed=0, vlm_frames=False, action_repeat=1))
    policy = expert_policy(env)
    state, _ = env.reset()
    twin.reset()
    rng = np.random.default_rng(0)
    rewards = []
    for t in range(250):
        action = policy(state) if t < 120 else rng.uniform(-1, 1, 4).astype(np.float32)
        state, reward, _, _, info = env.step(action)
        twin_rewards, twin_successes = [], []
        for _ in range(2):
            _, twin_reward, _, _, twin_info = twin.step(action)
            twin_rewards.append(twin_reward)
            twin_successes.append(twin_info["success"])
        assert reward == sum(twin_rewards) == sum(float(s) - 1.0 for s in twin_successes)
        assert info["success"] is any(twin_successes)
        rewards.append(reward)
    assert {-2.0, 0.0} <= set(rewards) <= {-2.0, -1.0, 0.0}


def test_fixed_goal_scene_repeats_random_goal_scene_changes(closing):
    env = closing(make_env("pick-place", seed=3, vlm_frames=False))
    first, _ = env.reset()
    goal = env.goal_position
    for _ in range(20):
        env.step(env.action_space.sample())
    again, _ = env.reset(seed=123)  # re-seeding does not move a fixed scene
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(goal, env.goal_position)
    assert np.all(first[-3:] == 0), "fixed goal: the goal must be hidden from the state"
    same_seed = closing(make_env("pick-place", seed=3, vlm_frames=False)).reset()[0]
    np.testing.assert_array_equal(first, same_seed)
    other_seed = closing(make_env("pick-place", seed=4, vlm_frames=False)).reset()[0]
    assert not np.allclose(first[4:7], other_seed[4:7]), "another seed must give another object position"

    env = closing(make_env("pick-place", seed=3, goal="random", vlm_frames=False))
    states = [env.reset()[0] for _ in range(3)]
    goals = np.stack([s[-3:] for s in states])
    assert np.all(np.abs(goals).sum(axis=1) > 0), "random goal: the goal must be in the state"
    assert len({tuple(g) for g in goals}) == 3, "random goal: every reset draws a new goal"
    assert len({tuple(s[4:7]) for s in states}) == 3, "random goal: every reset moves the object"
    np.testing.assert_array_equal(env.reset(seed=7)[0], env.reset(seed=7)[0])


def test_frames_upright_and_identical_for_fixed_scene(closing):
    env = closing(make_env("drawer-open", seed=0))
    _, info = env.reset()
    frame = info["vlm_frame"]
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert env.render() is frame  # render() hands back this step's frame, no second render
    # The wooden table top is in the lower half of the upright corner2 view (rows ~110-230); an
    # unflipped MuJoCo frame puts it in the upper half.
    f = frame.astype(int)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    wood_rows = np.nonzero((r - g > 25) & (g - b > 10) & (r < 200) & (g > 40))[0]
    assert wood_rows.size > 2000, "expected the table in view"
    assert (wood_rows >= 128).mean() > 0.9, f"table centroid row {wood_rows.mean():.0f}: frame upside down?"
    env.step(np.array([1, 0, 0, 0], np.float32))
    assert not np.array_equal(env.render(), frame), "the frame must follow the arm"
    _, info = env.reset()
    np.testing.assert_array_equal(info["vlm_frame"], frame)


def test_info_state_holds_the_goal_a_fixed_goal_observation_hides(closing):
    env = closing(make_env("reach", seed=0, vlm_frames=False))
    obs, info = env.reset()
    np.testing.assert_array_equal(obs[-3:], 0.0)
    np.testing.assert_allclose(info["state"][-3:], env.goal_position, rtol=1e-6)
    assert np.any(info["state"][-3:] != 0.0)
    np.testing.assert_array_equal(info["state"][:-3], obs[:-3])
    obs, _, _, _, info = env.step(env.action_space.sample())
    np.testing.assert_allclose(info["state"][-3:], env.goal_position, rtol=1e-6)
    np.testing.assert_array_equal(info["state"][:-3], obs[:-3])


def test_pixel_observations_action_repeat_and_stack(closing):
    env = closing(make_env("reach", seed=0, obs="pixels", max_episode_steps=10))
    assert env.action_repeat == 2
    obs, info = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert np.array_equal(obs[:3], obs[6:]), "reset fills the stack with the first frame"
    # The 84x84 view is the antialiased bilinear resize of this step's VLM frame (1 LSB: rounding).
    expected = reference_preprocess(torch.from_numpy(info["vlm_frame"])[None], size=84,
                                    mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)[0]
    assert (expected - torch.from_numpy(obs[6:]).float()).abs().max() <= 1.0
    assert info["state"].shape == (39,)
    for t in range(5):
        prev = obs
        obs, reward, _, truncated, info = env.step(np.array([1, 0, 0, 0], np.float32))
        np.testing.assert_array_equal(obs[:6], prev[3:])  # oldest frame dropped
        assert reward in (-2.0, -1.0, 0.0) and (reward > -2.0) == info["success"]
        assert truncated is (t == 4)  # 10 simulator steps = 5 agent steps at action repeat 2
    assert env.elapsed_steps == 10
    assert not np.array_equal(obs[:3], obs[6:]), "the arm moved, so the stacked frames differ"


@pytest.mark.parametrize("task", MT10_TASKS)
def test_scripted_expert_succeeds(task):
    for seed in (0, 1):
        rollout = expert_rollout(task, seed, render=False, stop_on_success=True)
        assert rollout.successes.any(), f"{task} seed {seed}: the expert never succeeded"
        assert rollout.successes[-1] and rollout.first_success() == len(rollout.successes)


def test_rollout_layout():
    expert = expert_rollout("reach", 0, max_steps=8)
    assert isinstance(expert, Rollout)
    t = len(expert.actions)
    assert expert.states.shape == (t + 1, 39) and expert.states.dtype == np.float32
    assert expert.actions.shape == (t, 4) and expert.actions.dtype == np.float32
    assert expert.frames.shape == (t + 1, 256, 256, 3) and expert.frames.dtype == np.uint8
    assert expert.successes.shape == (t,) and expert.successes.dtype == bool
    assert np.abs(expert.actions).max() <= 1.0
    # Row 0 is the reset state/frame: the same as a fresh env with this seed.
    env = make_env("reach", seed=0)
    try:
        state, info = env.reset()
        np.testing.assert_array_equal(expert.states[0], state)
        np.testing.assert_array_equal(expert.frames[0], info["vlm_frame"])
        # states[t + 1] / frames[t + 1] follow actions[t]: replaying the actions reproduces them.
        for k in range(3):
            state, _, _, _, info = env.step(expert.actions[k])
        np.testing.assert_array_equal(expert.states[3], state)
        np.testing.assert_array_equal(expert.frames[3], info["vlm_frame"])
    finally:
        env.close()
    full = expert_rollout("reach", 0, render=False)
    assert len(full.actions) == 500 and full.frames is None
    np.testing.assert_array_equal(full.states[:9], expert.states)  # the scripted policy is deterministic
    first = full.first_success()
    assert first is not None and full.successes[first - 1] and not full.successes[: first - 1].any()

    rnd = random_rollout("reach", 5, max_steps=30, render=False)
    assert rnd.frames is None and rnd.actions.shape == (30, 4)
    np.testing.assert_array_equal(rnd.actions, random_rollout("reach", 5, max_steps=30, render=False).actions)
    assert not np.array_equal(rnd.actions, random_rollout("reach", 6, max_steps=30, render=False).actions)


def test_vector_env_batches_states_and_frames():
    envs = make_vector_env("drawer-open", 2, seed=0)
    try:
        obs, info = envs.reset(seed=0)
        assert obs["obs"].shape == (2, 39) and obs["frame"].shape == (2, 256, 256, 3)
        assert obs["frame"].dtype == np.uint8
        # Fixed goal: every worker shows the one scene of the seed.
        np.testing.assert_array_equal(obs["obs"][0], obs["obs"][1])
        np.testing.assert_array_equal(obs["frame"][0], obs["frame"][1])
        single = make_env("drawer-open", seed=0)
        try:
            np.testing.assert_array_equal(single.reset()[1]["vlm_frame"], obs["frame"][0])
        finally:
            single.close()
        actions = np.array([[1, 0, 0, 0], [-1, 0, 0, 0]], np.float32)
        obs, reward, _, _, info = envs.step(actions)
        assert reward.shape == (2,) and set(reward) <= {-1.0, 0.0}
        assert info["success"].shape == (2,) and info["success"].dtype == bool
        assert not np.array_equal(obs["frame"][0], obs["frame"][1]), "each worker renders its own arm"
    finally:
        envs.close()

    envs = make_vector_env("reach", 2, seed=0, goal="random", obs="pixels", vlm_frames=False)
    try:
        obs, info = envs.reset(seed=0)
        assert obs.shape == (2, 9, 84, 84) and obs.dtype == np.uint8
        goals = info["state"][:, -3:]
        assert info["state"].shape == (2, 39) and not np.array_equal(goals[0], goals[1])
    finally:
        envs.close()


def test_vector_env_refuses_fork_after_rendering(closing):
    env = closing(make_env("reach", seed=0))
    env.reset()  # this process now holds a GL context
    with pytest.raises(RuntimeError, match="forkserver"):
        make_vector_env("reach", 2, seed=0, context="fork")


def test_torch_compile_stack_imports_after_a_rendered_frame():
    """Mesa's llvmpipe puts its libLLVM in the global symbol scope with the first frame; triton
    (imported by torch._dynamo, hence by torchvision and open_clip) loaded after that used to
    segfault in its LLVM's static initialisers. A fresh interpreter, in the order a user writes."""
    script = (
        "from furl_fast.envs import make_env\n"
        "env = make_env('reach', seed=0)\n"
        "env.reset()\n"
        "import torch._dynamo, open_clip\n"
        "_, _, _, _, info = env.step(env.action_space.sample())\n"
        "print(info['vlm_frame'].shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "(256, 256, 3)"


def test_gymnasium_ids_pass_the_env_checker(closing):
    """furl_fast/<task> for all 50 tasks; through its spec the checker also builds the env again
    for each render mode and checks close()."""
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    assert {f"furl_fast/{t}" for t in TASKS} <= set(gym.registry)
    env = closing(gym.make("furl_fast/drawer-open"))
    assert env.spec.id == "furl_fast/drawer-open" and env.unwrapped.task == "drawer-open"
    check_env(env.unwrapped)
    pixels = closing(gym.make("furl_fast/reach", seed=3, goal="random", obs="pixels", pixel_size=32,
                              render_mode="rgb_array"))
    assert pixels.observation_space.shape == (9, 32, 32) and pixels.unwrapped.goal == "random"
    pixels.reset(seed=1)
    assert pixels.render().shape == (256, 256, 3)
    with pytest.raises(ValueError, match="render_mode must be 'rgb_array'"):
        gym.make("furl_fast/reach", render_mode="human")


@pytest.mark.parametrize("task", ["drawer-open", "pick-place", "stick-pull"])  # 1, 1 and 2 objects
def test_state_bounds_are_finite_where_meta_world_bounds_them(task, closing):
    env = closing(make_env(task, seed=0, goal="random", vlm_frames=False))
    low, high = env.observation_space.low, env.observation_space.high
    objects = len(env.unwrapped._raw._get_pos_objects()) // 3
    for half in (0, 18):
        for k in range(objects):
            assert np.isinf(low[half + 4 + 7 * k : half + 7 + 7 * k]).all()  # xyz: unbounded
            assert (low[half + 7 + 7 * k : half + 11 + 7 * k] == -1).all()  # unit quaternion
            assert (high[half + 7 + 7 * k : half + 11 + 7 * k] == 1).all()
        assert (low[half + 4 + 7 * objects : half + 18] == 0).all()  # empty object slots
        assert (high[half + 4 + 7 * objects : half + 18] == 0).all()
    assert np.isfinite(low[36:]).all() and np.isfinite(high[36:]).all()  # the goal
    raw = env.unwrapped._raw  # Meta-World's own states (not clipped by furl_fast) stay inside
    raw.reset()
    rng = np.random.default_rng(0)
    for _ in range(40):
        state = raw.step(rng.uniform(-1, 1, 4))[0].astype(np.float32)
        assert env.observation_space.contains(state)
