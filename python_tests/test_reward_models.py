"""Reward models against their formulas on fixed embeddings, and the Gymnasium wrappers on Meta-World
with a tiny random-weight encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from furl_fast.rewards.models import (
    DEFAULT_BASELINE_PROMPT,
    BinaryReward,
    CodeRewardModel,
    CosineReward,
    FuRLRewardModel,
    GoalBaselineReward,
    RewardModel,
    make_reward_model,
)
from furl_fast.envs.metaworld import MT10_PROMPTS
from furl_fast.vlm import load_encoder


@pytest.fixture(scope="module")
def encoder(tiny_model, tmp_path_factory):
    """A random-weight open_clip model loaded through the real local-dir: path."""
    return load_encoder(tiny_model, device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def emb(gen, encoder) -> torch.Tensor:
    return torch.randn(37, encoder.embed_dim, generator=gen) * 3


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_cosine_reward_formula(encoder, emb):
    model = CosineReward(encoder, "drawer-open")
    text = encoder.encode_text(MT10_PROMPTS["drawer-open"])[0].double()
    want = unit(emb.double()) @ unit(text)
    torch.testing.assert_close(model.reward_from_embeddings(emb), want.float())
    assert model.reward_from_embeddings(emb).dtype == torch.float32


def explicit_goal_baseline(x, goals, baselines, alpha):
    """The spec's formula with P formed as a D x D matrix (float64)."""
    g = unit(goals.double()).mean(0)
    b = unit(baselines.double()).mean(0)
    d = g - b
    p = alpha * torch.outer(d, d) / d.dot(d) + (1 - alpha) * torch.eye(d.numel(), dtype=d.dtype)
    return 1 - 0.5 * (((unit(x.double()) - g) @ p) ** 2).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_goal_baseline_formula_with_several_prompts(encoder, emb, alpha):
    goals = ["open a drawer", "pull the drawer open"]
    baselines = [DEFAULT_BASELINE_PROMPT, "a robot"]
    model = GoalBaselineReward(encoder, "drawer-open", goal_prompts=goals,
                               baseline_prompts=baselines, alpha=alpha)
    want = explicit_goal_baseline(emb, encoder.encode_text(goals), encoder.encode_text(baselines),
                                  alpha)
    torch.testing.assert_close(model.reward_from_embeddings(emb), want.float(), rtol=1e-5, atol=1e-5)


def test_goal_baseline_alpha_zero_is_affine_in_cosine(encoder, emb):
    gb = GoalBaselineReward(encoder, "reach", alpha=0.0).reward_from_embeddings(emb).double()
    cos = CosineReward(encoder, "reach").reward_from_embeddings(emb).double()
    # One goal prompt: g is a unit vector, so 1 - 0.5 |x - g|^2 = cos(x, g) exactly.
    torch.testing.assert_close(gb, cos, rtol=1e-5, atol=1e-5)
    # Several goal prompts: |g| < 1 and the reward is 0.5 + |g| cos - 0.5 |g|^2, still affine.
    goals = ["reach a goal position", "move the arm to the red ball"]
    gb2 = GoalBaselineReward(encoder, "reach", goal_prompts=goals, alpha=0.0)
    r = gb2.reward_from_embeddings(emb).double()
    g = gb2.goal_emb.double()
    cos_g = unit(emb.double()) @ unit(g)
    torch.testing.assert_close(r, 0.5 + g.norm() * cos_g - 0.5 * g.norm() ** 2, rtol=1e-5, atol=1e-5)
    assert g.norm() < 1 - 1e-3


def test_goal_baseline_bad_alpha(encoder):
    with pytest.raises(ValueError, match="alpha"):
        GoalBaselineReward(encoder, "reach", alpha=1.5)


def softmax_p(encoder, emb, prompts, temperature):
    text = unit(encoder.encode_text(prompts).double())
    return torch.softmax(unit(emb.double()) @ text.T / temperature, dim=-1)[:, 0]


def test_binary_defaults(encoder, emb):
    model = BinaryReward(encoder, "drawer-open", binary=False)
    assert model.temperature == pytest.approx(1 / encoder.logit_scale)
    assert model.threshold == 0.5
    others = [p for task, p in MT10_PROMPTS.items() if task != "drawer-open"]
    assert model.negatives == others and len(others) == 9
    want = softmax_p(encoder, emb, [MT10_PROMPTS["drawer-open"], *others], 1 / encoder.logit_scale)
    torch.testing.assert_close(model.reward_from_embeddings(emb), want.float())


def test_binary_threshold_behaviour(encoder, emb):
    negatives = ["a red ball", "a blue cube"]
    kw = {"negatives": negatives, "temperature": 0.05}
    p = BinaryReward(encoder, "reach", binary=False, **kw).reward_from_embeddings(emb)
    threshold = float(p.median())  # about half the frames on each side, exactly one on it
    r = BinaryReward(encoder, "reach", threshold=threshold, **kw).reward_from_embeddings(emb)
    assert set(r.tolist()) == {0.0, 1.0}
    torch.testing.assert_close(r, (p > threshold).float())
    assert r[p == threshold].eq(0).all()  # strictly greater
    lowest = BinaryReward(encoder, "reach", threshold=0.0, **kw).reward_from_embeddings(emb)
    assert lowest.eq(1).all()  # p > 0 always
    # float32 result against the float64 reference rounded to float32, with float32 tolerances.
    torch.testing.assert_close(p, softmax_p(encoder, emb, ["reach a goal position", *negatives],
                                            0.05).float())


def test_binary_duplicate_negatives_removed(encoder, emb):
    goal = MT10_PROMPTS["reach"]
    model = BinaryReward(encoder, "reach", binary=False,
                         negatives=["a red ball", "a blue cube", "a red ball", goal, "a blue cube"])
    assert model.negatives == ["a red ball", "a blue cube"]
    want = softmax_p(encoder, emb, [goal, "a red ball", "a blue cube"], model.temperature)
    torch.testing.assert_close(model.reward_from_embeddings(emb), want.float())
    with pytest.raises(ValueError, match="negative"):
        BinaryReward(encoder, "reach", negatives=[goal, goal])


def test_furl_adapter_matches_heads(encoder, emb):
    model = make_reward_model("furl", encoder, "reach")
    assert isinstance(model, FuRLRewardModel)
    torch.testing.assert_close(model.reward_from_embeddings(emb), model.furl.reward(emb))


def test_factory_and_validation(encoder, emb):
    for name, cls in [("cosine", CosineReward), ("goal_baseline", GoalBaselineReward),
                      ("binary", BinaryReward)]:
        model = make_reward_model(name, encoder, "reach")
        assert isinstance(model, cls) and isinstance(model, RewardModel) and model.name == name
        assert model.reward_from_embeddings(emb).shape == (emb.shape[0],)
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward_model("nope", encoder, "reach")
    with pytest.raises(ValueError, match="width"):
        CosineReward(encoder, "reach").reward_from_embeddings(emb[:, :5])
    with pytest.raises(ValueError, match="no built-in prompt"):
        CosineReward(encoder, "box-close")
    assert CosineReward(encoder, "box-close", prompt="close the box").prompt == "close the box"


def test_frames_call_equals_embedding_path(encoder, gen):
    frames = torch.randint(0, 256, (3, 48, 48, 3), generator=gen, dtype=torch.uint8)
    model = BinaryReward(encoder, "reach", binary=False)
    torch.testing.assert_close(model(frames.numpy()),
                               model.reward_from_embeddings(encoder.encode_frames(frames)))


# --- wrappers on Meta-World -----------------------------------------------------------------------
def test_wrapper_passes_env_checker(encoder, closing):
    from gymnasium.utils.env_checker import check_env

    from furl_fast.envs import make_env
    from furl_fast.rewards import VLMRewardWrapper

    env = closing(VLMRewardWrapper(make_env("reach", seed=0, frame_size=64),
                                   CosineReward(encoder, "reach")))
    check_env(env, skip_render_check=False)


@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("vlm_frames", [True, False])
def test_wrapper_reward(encoder, closing, mode, vlm_frames):
    from furl_fast.envs import make_env
    from furl_fast.rewards import VLMRewardWrapper

    model = CosineReward(encoder, "reach")
    env = closing(VLMRewardWrapper(make_env("reach", seed=0, frame_size=64, vlm_frames=vlm_frames),
                                   model, mode=mode, scale=2.5))
    env.reset()
    for _ in range(3):
        _, reward, _, _, info = env.step(env.action_space.sample())
        frame = env.unwrapped.render()  # the frame of this step (cached, not re-rendered)
        vlm = float(model(frame[None])[0])
        assert info["vlm_reward"] == pytest.approx(vlm, abs=1e-6)
        assert info["task_reward"] == -1.0
        want = 2.5 * vlm + (info["task_reward"] if mode == "add" else 0.0)
        assert reward == pytest.approx(want, abs=1e-5)


def test_vector_wrapper_batches_and_autoresets(encoder, closing):
    from furl_fast.envs import make_vector_env
    from furl_fast.rewards import VLMRewardVectorWrapper

    model = CosineReward(encoder, "reach")
    venv = closing(VLMRewardVectorWrapper(
        make_vector_env("reach", 2, seed=0, goal="random", asynchronous=False, frame_size=64,
                        max_episode_steps=2), model, mode="replace"))
    obs, _ = venv.reset(seed=1)
    for t in range(4):  # steps 0, 1 play; step 2 is the autoreset step (reward 0); step 3 plays
        obs, reward, _, truncated, info = venv.step(venv.action_space.sample())
        frames = obs["frame"]
        want = np.array([float(model(f[None])[0]) for f in frames], dtype=np.float32)
        if t == 2:
            want[:] = 0.0
        np.testing.assert_allclose(reward, want, atol=1e-5)
        np.testing.assert_allclose(info["vlm_reward"], want, atol=1e-5)
        assert truncated.tolist() == [t == 1] * 2


def test_code_reward_model_through_wrapper(closing):
    from furl_fast.envs import expert_policy, make_env
    from furl_fast.rewards import VLMRewardWrapper

    model = make_reward_model("code", None, "reach")
    assert isinstance(model, CodeRewardModel) and model.needs_states and model.stateful
    try:
        base = make_env("reach", seed=0, goal="random", frame_size=32)  # the programs read the goal
        env = closing(VLMRewardWrapper(base, model, mode="replace"))
        policy = expert_policy(base)
        obs, _ = env.reset()
        rewards = []
        for _ in range(80):  # the expert reaches the goal in ~50 steps
            obs, reward, _, _, _ = env.step(policy(obs))
            rewards.append(reward)
        assert rewards[0] < 1.0 and rewards[-1] == 1.0
        assert np.all(np.diff(rewards) >= 0)  # progress only goes forward within an episode
        env.reset()  # a new episode starts from zero progress
        _, reward, _, _, _ = env.step(np.zeros(4, dtype=np.float32))
        assert reward < 1.0
        with pytest.raises(ValueError, match="states"):
            model(np.zeros((1, 8, 8, 3), np.uint8))
    finally:
        model.close()


class StepCounter(RewardModel):
    """A stateful stand-in: reward = frames scored in this environment's episode so far (the reset
    frame counts as the first), with the state as given."""

    name = "counter"
    stateful = needs_states = True

    def __init__(self, num_envs: int) -> None:
        super().__init__(None)
        self.num_envs = num_envs
        self.count = np.zeros(num_envs)
        self.states_seen: list[np.ndarray] = []

    def reset(self, env_ids=None) -> None:
        self.count[slice(None) if env_ids is None else np.asarray(env_ids, dtype=int)] = 0

    def __call__(self, frames, states=None):
        assert frames.shape[0] == self.num_envs and states.shape == (self.num_envs, 39)
        self.states_seen.append(states)
        self.count += 1
        return torch.as_tensor(self.count, dtype=torch.float32)


def test_vector_wrapper_resets_stateful_models_per_episode(closing):
    from furl_fast.envs import make_vector_env
    from furl_fast.rewards import VLMRewardVectorWrapper

    model = StepCounter(2)
    venv = closing(VLMRewardVectorWrapper(
        make_vector_env("reach", 2, seed=0, asynchronous=False, frame_size=32, max_episode_steps=3),
        model, mode="replace"))
    obs, info = venv.reset(seed=0)
    np.testing.assert_array_equal(model.count, [1, 1])  # the reset frame was shown
    # The model gets info["state"]: the observation with the goal the fixed-goal observation hides.
    np.testing.assert_array_equal(model.states_seen[0], info["state"])
    np.testing.assert_array_equal(model.states_seen[0][:, :-3], obs["obs"][:, :-3])
    assert np.all(obs["obs"][:, -3:] == 0) and np.any(model.states_seen[0][:, -3:] != 0)
    rewards = [venv.step(venv.action_space.sample())[1].tolist() for _ in range(5)]
    # Steps 0-2 play (2nd, 3rd, 4th frame of the episode); step 3 is the autoreset step (reward 0,
    # the model restarted on the reset frame); step 4 is the new episode's second frame.
    assert rewards == [[2, 2], [3, 3], [4, 4], [0, 0], [2, 2]]
    with pytest.raises(ValueError, match="episode states"):
        VLMRewardVectorWrapper(venv.env, StepCounter(3))


# ---- rewards as plugins: built from their config, trained through the same hooks ----------------


def context(encoder, **changes):
    from furl_fast.config import FuRLConfig
    from furl_fast.envs import get_suite
    from furl_fast.rewards import RewardContext

    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    fields = dict(encoder=encoder, task="drawer-open", prompt=None, num_envs=2,
                  device=torch.device("cpu"), seed=0, suite=get_suite("metaworld"),
                  furl=FuRLConfig(head_hidden=8, pair_batch=4),
                  goal_frame=lambda: frame)
    return RewardContext(**{**fields, **changes})


def test_every_registered_reward_has_a_config_of_the_same_name():
    from furl_fast.config import REWARD_CONFIGS
    from furl_fast.rewards import REWARD_MODELS

    assert sorted(c.name for c in REWARD_CONFIGS) == sorted(REWARD_MODELS)


def test_build_reward_passes_each_rewards_own_options(encoder, emb):
    from furl_fast.config import BinaryRewardConfig, GoalBaselineRewardConfig
    from furl_fast.envs import get_suite
    from furl_fast.rewards import build_reward

    binary = build_reward(BinaryRewardConfig(threshold=0.7, negatives=("a cup", "a door"),
                                             temperature=0.5, binary=False), context(encoder))
    assert isinstance(binary, BinaryReward)
    assert (binary.threshold, binary.negatives, binary.temperature, binary.binary) == \
        (0.7, ["a cup", "a door"], 0.5, False)
    torch.testing.assert_close(binary.reward_from_embeddings(emb), binary.probability(emb))
    gb = build_reward(GoalBaselineRewardConfig(alpha=1.0, goal_prompts=("an open drawer",)),
                      context(encoder, prompt="ignored: goal_prompts win"))
    assert (gb.alpha, gb.goal_prompts, gb.baseline_prompts) == \
        (1.0, ["an open drawer"], [DEFAULT_BASELINE_PROMPT])
    from_prompt = build_reward(GoalBaselineRewardConfig(), context(encoder, prompt="open it"))
    assert from_prompt.goal_prompts == ["open it"]
    default = build_reward(BinaryRewardConfig(), context(encoder, prompt=MT10_PROMPTS["drawer-open"]))
    assert default.negatives == [p for p in MT10_PROMPTS.values() if p != MT10_PROMPTS["drawer-open"]]
    with pytest.raises(ValueError, match="--reward.negatives"):
        build_reward(BinaryRewardConfig(), context(encoder, task="CartPole-v1", prompt="a pole",
                                                   suite=get_suite("gymnasium")))


def test_furl_reward_trains_through_the_hooks(encoder, emb):
    from types import SimpleNamespace

    from furl_fast.config import FuRLRewardConfig
    from furl_fast.rewards import build_reward

    model = build_reward(FuRLRewardConfig(), context(encoder))
    assert model.furl.goal_emb is not None  # phase A: the goal frame was encoded
    before = model.reward_from_embeddings(emb)
    assert model.update(SimpleNamespace(next_embedding=emb), log=True)["losses/heads_phase_a"] >= 0
    assert not torch.equal(model.reward_from_embeddings(emb), before)  # the heads moved
    model.end_episode(emb[:12], np.array([False] * 5 + [True] * 7))
    assert model.furl.buffer.positives_added == 12 and model.furl.phase == "B"
    state = model.state_dict()
    fresh = build_reward(FuRLRewardConfig(), context(encoder))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.reward_from_embeddings(emb), model.reward_from_embeddings(emb))


def test_code_reward_stores_progress_and_pays_it(encoder):
    from furl_fast.config import CodeRewardConfig
    from furl_fast.envs import make_env
    from furl_fast.rewards import build_reward

    model = build_reward(CodeRewardConfig(), context(None, task="reach"))
    try:
        assert (model.stored_width, model.stored_dtype) == (1, torch.float32)
        env = make_env("reach", seed=0, vlm_frames=False)
        _, info = env.reset()
        states = np.stack([info["state"], info["state"]])
        model.reset([0, 1])
        stored = model.observe(None if not model.reads_frames else np.zeros((2, 8, 8, 3), np.uint8),
                               states, np.arange(2))
        assert stored.shape == (2, 1) and stored.dtype == torch.float32
        torch.testing.assert_close(model.reward_from_embeddings(stored), stored[:, 0])
        env.close()
    finally:
        model.close()
