"""Reference name of :mod:`sdpo.learner.updater`: the online SDPO learner (``OnlineSDPOUpdater``)."""

from sdpo.learner.updater import *  # noqa: F401,F403
