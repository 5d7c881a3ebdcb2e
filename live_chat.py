"""Live chat: teach the policy by talking to it (in a browser or through an OpenAI-compatible API), one LoRA
adapter per account.

Every message a person sends after one of the model's replies is the follow-up o for that reply: one
SDPO update on (x, y, o) with the reply's exact token ids is queued for a worker, while the reply to
the new message is streamed from the newest finished update (the page says which). Each account has its
own adapter under --adapters_dir/users/<id>/; a restart resumes every adapter, step and queued update.

CPU, embedded SmolLM2-135M-Instruct, one local user, no login (open http://127.0.0.1:7860):
    ./scripts/live_chat.sh
Several people (accounts are required for --share or any --host other than 127.0.0.1/localhost):
    python live_chat.py users add alice --accounts_file accounts.json      # asks a password, prints an API key
    python live_chat.py --accounts_file accounts.json --host 0.0.0.0 --update_workers 2
    # then, from any OpenAI client: base_url http://HOST:7860/v1, api_key = the account's key
GPU, the online loop's reference setup (Qwen3-8B; one vLLM engine serves every user's adapter):
    PRESET=gpu ACCOUNTS_FILE=accounts.json ./scripts/live_chat.sh
Direct, or from YAML (any flag below as a key):
    python live_chat.py --model smollm2-135m-instruct --device cpu --adapters_dir runs/live_chat
    python live_chat.py --config live_chat.yaml

Deliberate differences from the reference live chat: the update after a follow-up trains on the
previous reply with that follow-up (the reference's async mode used the prompt before the reply as
o); training never delays a reply; adapters are per user, written atomically, and resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from dataclasses import dataclass, field

import torch

from sdpo.learner.config import OnlineSDPOConfig
from sdpo.live_chat.accounts import Accounts, users_main
from sdpo.live_chat.sessions import Limits, LiveChatError, check_adapters_dir
from sdpo.models.model_loading import DEFAULT_CPU_MODEL, ModelLoadError
from sdpo.utils.command_line import ConfigParser, UsageError
from sdpo.utils.env_file import load_project_env

logger = logging.getLogger("live_chat")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ChatSettings:
    """Everything about the chat server that is not the learner's (``OnlineSDPOConfig``) settings."""

    adapters_dir: str = field(
        default="./live_chat_adapters",
        metadata={"help": "One adapter folder per user name (--checkpoint_dir, the reference's name, sets it too)."},
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 exposes the page to the network)."}
    )
    port: int = field(default=7860, metadata={"help": "Port of the page."})
    share: bool = field(default=False, metadata={"help": "Also open a public Gradio share link."})
    max_history_messages: int = field(default=8, metadata={"help": "Messages of the chat the model sees (0: all)."})
    wait_for_updates: bool = field(
        default=False,
        metadata={"help": "Reply only after the update on the previous reply finished (synchronous)."},
    )
    signal_vmin: float = field(default=-5.0, metadata={"help": "Signal colour scale minimum (red)."})
    signal_vmax: float = field(default=5.0, metadata={"help": "Signal colour scale maximum (blue)."})
    seed: int = field(default=42, metadata={"help": "Seeds the initial adapter and the sampling."})
    accounts_file: str | None = field(
        default=None,
        metadata={
            "help": "Accounts JSON (`python live_chat.py users add NAME --accounts_file F`): a login and an API "
            "key per person. Required for --share or a non-local --host; without it: one local user."
        },
    )
    max_message_tokens: int = field(
        default=512, metadata={"help": "Longest user message or follow-up, in tokens (shown in the page)."}
    )
    max_queued_updates: int = field(default=16, metadata={"help": "A user's updates waiting or running, at most."})
    update_workers: int = field(
        default=1,
        metadata={"help": "Update workers, each with its own copy of the training model; users take turns."},
    )
    max_resident_adapters: int = field(
        default=8,
        metadata={
            "help": "Users' adapters kept loaded in the one reply model (transformers copy or vLLM engine; "
            "least recently used out); also the most adapters in one reply batch."
        },
    )
    reply_batch_size: int = field(
        default=8, metadata={"help": "Replies generated together, each with its own user's adapter (transformers)."}
    )
    shutdown_timeout_s: float = field(
        default=600.0,
        metadata={"help": "On stop, finish queued updates for at most this long; the rest is kept for the next start."},
    )

    def __post_init__(self):
        if self.accounts_file is None and (self.share or self.host not in LOCAL_HOSTS):
            exposed = "--share" if self.share else f"--host {self.host}"
            raise ValueError(
                f"{exposed} serves other people: create accounts (python live_chat.py users add NAME "
                "--accounts_file accounts.json) and pass --accounts_file"
            )
        positive = (
            "max_message_tokens",
            "max_queued_updates",
            "update_workers",
            "max_resident_adapters",
            "reply_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"--shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is not a port number (1-65535)")
        if self.max_history_messages < 0:
            raise ValueError(f"--max_history_messages must be >= 0, got {self.max_history_messages}")
        if not self.signal_vmin < 0 < self.signal_vmax:
            raise ValueError(f"--signal_vmin ({self.signal_vmin}) must be < 0 < --signal_vmax ({self.signal_vmax})")


# The live chat's defaults where they differ from the online loop's: the CPU model, a small LoRA and short replies.
LIVE_CHAT_DEFAULTS = {
    "model_name_or_path": DEFAULT_CPU_MODEL,
    "learning_rate": 1e-4,
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "loss_mode": "simple_signal",
    "max_new_tokens": 96,
    "temperature": 0.7,
    "torch_dtype": "auto",
    "vllm_gpu_memory_utilization": 0.3,
    "checkpoint_every_n_steps": 0,
    "max_checkpoints": 0,
}


def build_parser() -> ConfigParser:
    parser = ConfigParser((OnlineSDPOConfig, ChatSettings), description=__doc__)
    parser.set_defaults(**LIVE_CHAT_DEFAULTS)
    return parser


def resolve(argv=None) -> tuple[OnlineSDPOConfig, ChatSettings, bool, Accounts | None]:
    """Parse and check everything that can be checked before the model loads."""
    config, settings = build_parser().parse(argv)
    if config.checkpoint_dir != OnlineSDPOConfig.checkpoint_dir and settings.adapters_dir == ChatSettings.adapters_dir:
        settings = dataclasses.replace(settings, adapters_dir=config.checkpoint_dir)
    # The chat trains per-user LoRA adapters and serves replies itself (vLLM through the chat's own engine).
    use_vllm = config.use_vllm
    config = dataclasses.replace(config, use_lora=True, use_vllm=False, checkpoint_dir=settings.adapters_dir)
    check_adapters_dir(settings.adapters_dir, config)
    accounts = Accounts.load(settings.accounts_file) if settings.accounts_file is not None else None
    if accounts is not None and not accounts.accounts:
        raise LiveChatError(f"{settings.accounts_file}: no accounts yet; add one with `python live_chat.py users add`")
    return config, settings, use_vllm, accounts


def stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["users"]:
        return users_main(argv[1:])
    load_project_env()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        config, settings, use_vllm, accounts = resolve(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # LiveChatError, AccountsError
        print(f"error: {error}", file=sys.stderr)
        return 1
    from sdpo.learner.updater import OnlineSDPOUpdater
    from sdpo.live_chat.api import Identities
    from sdpo.live_chat.sessions import LiveChatEngine
    from sdpo.live_chat.ui import build_app, launch_app

    torch.manual_seed(settings.seed)
    try:
        updaters = [OnlineSDPOUpdater(config) for _ in range(settings.update_workers)]  # one per worker
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    engine = LiveChatEngine(
        updaters,
        settings.adapters_dir,
        use_vllm=use_vllm,
        max_resident_adapters=settings.max_resident_adapters,
        max_history_messages=settings.max_history_messages,
        wait_for_updates=settings.wait_for_updates,
        limits=Limits(settings.max_message_tokens, settings.max_queued_updates),
        reply_batch_size=settings.reply_batch_size,
    )
    logger.info("adapters in %s: %d user(s)", settings.adapters_dir, len(engine.users()))
    identities = Identities(accounts)
    app = build_app(engine, identities, signal_vmin=settings.signal_vmin, signal_vmax=settings.signal_vmax)
    # SIGTERM stops the server like Ctrl-C does, so the queued updates still finish and are saved.
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    exit_code = 0
    try:
        launch_app(app, engine, identities, host=settings.host, port=settings.port, share=settings.share)
    except KeyboardInterrupt:  # a stop while the server was still starting (once serving, Gradio handles it)
        app.close()
    except OSError as error:  # e.g. the port is taken
        print(f"error: cannot serve on {settings.host}:{settings.port} ({error})", file=sys.stderr)
        exit_code = 1
    finally:
        logger.info(
            "finishing %d queued update(s) before exiting (Ctrl-C again: keep them for the next start)", engine.queued()
        )
        kept = engine.close(settings.shutdown_timeout_s)
        logger.info("stopped; %d queued update(s) kept for the next start", kept)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
