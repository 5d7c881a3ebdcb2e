"""Reference name of :mod:`sdpo.evaluation.evaluation_helpers`."""

from sdpo.evaluation.evaluation_helpers import *  # noqa: F401,F403
