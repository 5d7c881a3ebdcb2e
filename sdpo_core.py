"""Reference name of :mod:`sdpo.core`: the SDPO math (hindsight context, scorer, losses)."""

from sdpo.core import *  # noqa: F401,F403
