"""Run an entry point with a fault: the process signals itself at its k-th file-system commit point.

    python tests/fault_injection.py K SIGNAL -- eval_online_sdpo.py ARGS...

Commit points are the calls of ``os.fsync``, ``os.replace`` and ``os.rename`` (every atomic write fsyncs its
temp file, then renames it into place; checkpoints are renamed into place), so K walks through the inside of
every write: before the data is durable, between durable and visible, and after. K = 0 injects nothing; the
count of commit points is printed to stderr at exit, so a test can enumerate them. With FAULT_LOG=PATH set, the
first argument of every commit point (a descriptor or a path) is written to PATH, one line each, so a test can
find the commit points of one file.
"""

import atexit
import os
import runpy
import signal
import sys

COMMIT_CALLS = ("fsync", "replace", "rename")


def _described(target) -> str:
    """A path as given; a file descriptor as the path it is open on."""
    if isinstance(target, int):
        try:
            return os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            return f"fd {target}"
    return str(target)


def main() -> None:
    target, signal_name, separator, script, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    target, sent = int(target), getattr(signal, signal_name)
    count = 0
    log = open(os.environ["FAULT_LOG"], "w", buffering=1) if os.environ.get("FAULT_LOG") else None

    def counted(call):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            if log is not None:
                log.write(f"{_described(args[0]) if args else ''}\n")
            if count == target:
                os.kill(os.getpid(), sent)
            return call(*args, **kwargs)

        return wrapper

    for name in COMMIT_CALLS:
        setattr(os, name, counted(getattr(os, name)))
    atexit.register(lambda: print(f"commit points: {count}", file=sys.stderr))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
