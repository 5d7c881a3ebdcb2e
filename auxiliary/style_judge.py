"""Reference name of :mod:`sdpo.personas.style_judge`."""

from sdpo.personas.style_judge import *  # noqa: F401,F403
