"""Reference name of :mod:`sdpo.learner.config`: the online learner's settings (``OnlineSDPOConfig``)."""

from sdpo.learner.config import *  # noqa: F401,F403
