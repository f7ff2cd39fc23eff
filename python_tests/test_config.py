from __future__ import annotations

import dataclasses

import pytest
import torch
import tyro

from furl_fast.config import PRESETS, Config, FuRLConfig, GymnasiumConfig, SACConfig, VLMConfig
from furl_fast.envs import get_suite


def _replace(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, **kw)


def test_defaults_and_presets_validate():
    for cfg in PRESETS.values():
        cfg.validate()
    cfg = Config()
    cfg.validate(get_suite("metaworld"))
    assert cfg.algo == "furl" and cfg.resolved_rho == 0.05 and cfg.sac.tau == 0.01 and cfg.furl.lag == 10


def test_rho_defaults_per_reward_and_an_explicit_rho_wins():
    assert _replace(Config(), algo="vlm").resolved_rho == 0.05  # cosine
    assert _replace(Config(), algo="vlm", reward="code").resolved_rho == 1.0
    assert _replace(Config(), algo="relay", reward="code", rho=0.2).resolved_rho == 0.2
    assert _replace(Config(), algo="furl", rho=0.0).resolved_rho == 0.0


def test_paper_preset_matches_the_spec():
    paper = PRESETS["paper"]
    assert paper.total_steps == 1_000_000 and paper.resolved_warmup_steps == 10_000
    assert paper.eval_every == 100_000 and paper.batch_size == 256
    assert paper.resolved_buffer_size == 500_000
    assert _replace(paper, algo="sac").resolved_buffer_size == 1_000_000
    assert paper.resolved_eval_episodes == 1
    assert _replace(paper, goal="random").resolved_eval_episodes == 10
    s, f = paper.sac, paper.furl
    assert (s.actor_lr, s.critic_lr, s.alpha_lr, s.gamma, s.init_alpha) == (1e-4, 1e-4, 1e-4, 0.99, 1.0)
    assert s.hidden_dims == (256, 256) and s.target_entropy is None
    assert (f.head_hidden, f.head_out, f.head_lr, f.pair_batch) == (256, 64, 1e-4, 256)
    assert (f.phase_a_gap, f.phase_a_margin, f.phase_b_margin) == (0.25, 0.1, 0.1)
    assert (f.positive_capacity, f.negative_capacity, f.relay_stop_positives) == (20_000, 20_000, 2_500)
    assert f.relay_k_choices == (50, 100, 150, 200) and f.relay_noise_std == 0.2
    # The paper's VLM, LIV, with its default weights (the release's) and channel order (BGR).
    assert (paper.vlm.model, paper.vlm.pretrained, paper.vlm.bgr) == ("liv", None, None)
    assert paper.render_quality == "paper" and PRESETS["laptop"].render_quality == "fast"


def test_paper_preset_runs_liv_unless_another_vlm_is_named():
    from furl_fast.config import config_to_dict
    from furl_fast.train import parse_config

    assert parse_config(["--preset", "paper"]).vlm.model == "liv"
    other = parse_config(["--preset", "paper", "--vlm.model", "ViT-B-32"])
    assert other.vlm.model == "ViT-B-32" and other.total_steps == 1_000_000
    assert config_to_dict(parse_config(["--preset", "paper"]))["vlm"]["model"] == "liv"
    assert parse_config([]).vlm.model == "RN50"  # the laptop preset keeps open_clip's RN50


def test_warmup_is_the_agents_published_one_unless_given():
    """sac: FuRL's 10,000 steps; drq: DrQ-v2's 2,000 agent steps (4,000 simulator steps at action
    repeat 2), under every preset; a --warmup-steps given wins over both."""
    from furl_fast.train import parse_config

    for preset in ("laptop", "paper"):
        assert parse_config(["--preset", preset]).resolved_warmup_steps == 10_000
        assert parse_config(["--preset", preset, "--agent", "drq"]).resolved_warmup_steps == 4_000
        assert parse_config(["--preset", preset, "--agent", "drq", "--drq.action-repeat", "4"]
                            ).resolved_warmup_steps == 8_000
        for agent in ("sac", "drq"):
            given = parse_config(["--preset", preset, "--agent", agent, "--warmup-steps", "10000"])
            assert given.resolved_warmup_steps == 10_000
            given = parse_config(["--preset", preset, "--agent", agent, "--warmup-steps", "300"])
            assert given.resolved_warmup_steps == 300
    with pytest.raises(ValueError, match=r"the warm-up of agent drq \(default 4000 steps\) must be "
                                         r"< --total-steps 3000.*--warmup-steps"):
        Config(agent="drq", total_steps=3000).validate()


def test_relay_per_algo_and_the_no_relay_ablation():
    assert Config(algo="furl").uses_relay and Config(algo="relay").uses_relay
    assert not Config(algo="vlm").uses_relay
    assert not Config(algo="furl", furl=FuRLConfig(relay=False)).uses_relay


def test_resolved_reward_per_algo():
    assert Config(algo="furl").resolved_reward == "furl"
    assert Config(algo="vlm").resolved_reward == "cosine"
    assert Config(algo="relay", reward="binary").resolved_reward == "binary"
    assert Config(algo="sac").resolved_reward is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algo": "ppo"}, "--algo ppo is unknown; use one of sac, vlm, relay, furl"),
        ({"agent": "td3"}, "--agent td3 is unknown"),
        ({"goal": "moving"}, "--goal moving is unknown"),
        ({"rho": -0.1}, "--rho -0.1 must be >= 0"),
        ({"batch_size": 512, "buffer_size": 100}, "lower --batch-size or raise --buffer-size"),
        ({"warmup_steps": 5000, "total_steps": 5000}, "--warmup-steps 5000 must be < --total-steps 5000"),
        ({"device": "tpu"}, "--device tpu is unknown; use auto, cpu, cuda or cuda:N"),
        ({"num_envs": 0}, "--num-envs 0 must be > 0"),
        ({"algo": "vlm", "reward": "furl"}, "use --algo furl"),
        ({"algo": "furl", "reward": "cosine"}, "use --algo vlm or --algo relay"),
        ({"sac": SACConfig(tau=0.0)}, "--sac.tau 0.0 must be in (0, 1]"),
        ({"sac": SACConfig(gamma=1.5)}, "--sac.gamma 1.5 must be in (0, 1]"),
        ({"furl": FuRLConfig(relay_k_choices=())}, "--furl.relay-k-choices (none) must be a non-empty"),
        ({"furl": FuRLConfig(phase_b_margin=-1.0)}, "--furl.phase-b-margin -1.0 must be >= 0"),
        ({"vlm": VLMConfig(precision="fp8")}, "--vlm.precision fp8 is unknown"),
        ({"render_quality": "ultra"}, "--render-quality ultra is unknown; use one of paper, fast"),
        ({"algo": "relay", "furl": FuRLConfig(relay=False)}, "--furl.no-relay is an ablation of FuRL"),
        ({"algo": "vlm", "furl": FuRLConfig(phase_a=False)}, "--furl.no-phase-a is an ablation of FuRL"),
    ],
)
def test_validation_errors_say_what_to_change(changes, message):
    with pytest.raises(ValueError) as err:
        _replace(Config(), **changes).validate()
    assert message in str(err.value)


def test_unknown_task_through_the_suite_and_all_problems_at_once():
    _replace(Config(), task="fly-v3").validate()  # without a suite the task is not checked
    cfg = _replace(Config(), task="fly-v3", rho=-1.0)
    with pytest.raises(ValueError) as err:
        cfg.validate(get_suite("metaworld"))
    text = str(err.value)
    assert "--task fly-v3 is unknown; the 50 Meta-World tasks (each also as NAME-v3): assembly," in text
    assert "--rho -1.0" in text
    with pytest.raises(ValueError, match=r"^invalid configuration: --task drawr-open is unknown "
                                         r"\(did you mean 'drawer-open'\?\); the 50 Meta-World"):
        _replace(Config(), task="drawr-open").validate(get_suite("metaworld"))


def test_suite_checks_goal_randomisation_and_its_options():
    gym_suite = get_suite("gymnasium")
    cfg = _replace(Config(), suite="gymnasium", task="CartPole-v1", goal="random")
    with pytest.raises(ValueError, match="the gymnasium suite has no goal randomisation"):
        cfg.validate(gym_suite)
    _replace(cfg, goal="fixed").validate(gym_suite)
    with pytest.raises(ValueError, match="--gym.\\* options are read only with --suite gymnasium"):
        _replace(Config(), gym=GymnasiumConfig(success_key="is_success")).validate()
    from furl_fast.train import check_config

    with pytest.raises(ValueError, match="suite 'atari' is unknown; the suites: metaworld, gymnasium"):
        check_config(_replace(Config(), suite="atari"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused_by_validate():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"--device {device} but torch sees no usable CUDA"):
            _replace(Config(), device=device).validate()
    Config(device="cpu").validate()


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 3  # type: ignore[misc]


def test_tyro_parses_nested_overrides_on_a_preset():
    cfg = tyro.cli(
        Config,
        default=PRESETS["paper"],
        args=["--algo", "sac", "--seed", "3", "--sac.tau", "0.02", "--vlm.model", "ViT-B-32",
              "--furl.relay-k-choices", "10", "20", "--buffer-size", "5000"],
    )
    assert cfg.algo == "sac" and cfg.seed == 3 and cfg.sac.tau == 0.02 and cfg.vlm.model == "ViT-B-32"
    assert cfg.furl.relay_k_choices == (10, 20) and cfg.buffer_size == 5000
    assert cfg.total_steps == 1_000_000  # untouched fields keep the preset's values


def test_tyro_parses_the_paper_and_ablation_flags():
    cfg = tyro.cli(Config, default=PRESETS["paper"],
                   args=["--vlm.model", "liv", "--vlm.pretrained", "/w/model.pt", "--vlm.bgr", "False",
                         "--furl.no-relay", "--furl.no-phase-a", "--render-quality", "fast"])
    assert (cfg.vlm.model, cfg.vlm.pretrained, cfg.vlm.bgr) == ("liv", "/w/model.pt", False)
    assert not cfg.furl.relay and not cfg.furl.phase_a and cfg.render_quality == "fast"
    cfg.validate()


def test_tyro_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(Config, args=["--help"])
    out = capsys.readouterr().out
    assert "Weight of the VLM reward" in out
    assert "Polyak rate of the target critics" in out
