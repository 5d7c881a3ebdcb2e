"""Reference name of :mod:`sdpo.personas.user_simulator`."""

from sdpo.personas.user_simulator import *  # noqa: F401,F403
