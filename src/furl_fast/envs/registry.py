"""The environment suites by name: one line per suite."""

from __future__ import annotations

from furl_fast.envs.gymnasium_suite import GymnasiumSuite
from furl_fast.envs.metaworld import MetaWorldSuite
from furl_fast.envs.suite import Suite

SUITES: dict[str, Suite] = {
    "metaworld": MetaWorldSuite(),
    "gymnasium": GymnasiumSuite(),
}


def get_suite(name: str) -> Suite:
    """The suite registered as `name`; ValueError listing the known ones otherwise."""
    if name not in SUITES:
        raise ValueError(f"suite {name!r} is unknown; the suites: {', '.join(SUITES)} (--suite).")
    return SUITES[name]
