"""Live chat: teach the policy by talking to it in a browser, one LoRA adapter per user.

Every message a person sends after one of the model's replies is the follow-up o for that reply: one
SDPO update on (x, y, o) with the reply's exact token ids runs in the background, while the reply to
the new message is generated with the newest finished update (the page says which). Each user name
selects its own adapter under --adapters_dir; a restart resumes every user's adapter and step.

CPU, embedded SmolLM2-135M-Instruct (the defaults; open http://127.0.0.1:7860):
    ./scripts/live_chat.sh
GPU, the online loop's reference setup (Qwen3-8B, vLLM replies hot-swapping the adapter):
    PRESET=gpu ./scripts/live_chat.sh
Direct:
    python live_chat.py --model smollm2-135m-instruct --device cpu --adapters_dir runs/live_chat

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

from sdpo.utils.command_line import ConfigParser, UsageError
from sdpo.utils.env_file import load_project_env
from sdpo.live_chat.sessions import LiveChatError, check_adapters_dir
from sdpo.models.model_loading import DEFAULT_CPU_MODEL, ModelLoadError
from sdpo.learner.config import OnlineSDPOConfig

logger = logging.getLogger("live_chat")


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
    max_history_messages: int = field(
        default=8, metadata={"help": "Messages of the chat the model sees (0: all)."}
    )
    wait_for_updates: bool = field(
        default=False,
        metadata={"help": "Reply only after the update on the previous reply finished (synchronous)."},
    )
    signal_vmin: float = field(default=-5.0, metadata={"help": "Signal colour scale minimum (red)."})
    signal_vmax: float = field(default=5.0, metadata={"help": "Signal colour scale maximum (blue)."})
    seed: int = field(default=42, metadata={"help": "Seeds the initial adapter and the sampling."})

    def __post_init__(self):
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


def resolve(argv=None) -> tuple[OnlineSDPOConfig, ChatSettings, bool]:
    """Parse and check everything that can be checked before the model loads."""
    config, settings = build_parser().parse(argv)
    if config.checkpoint_dir != OnlineSDPOConfig.checkpoint_dir and settings.adapters_dir == ChatSettings.adapters_dir:
        settings = dataclasses.replace(settings, adapters_dir=config.checkpoint_dir)
    # The chat trains per-user LoRA adapters and serves replies itself (vLLM through the chat's own engine).
    use_vllm = config.use_vllm
    config = dataclasses.replace(config, use_lora=True, use_vllm=False, checkpoint_dir=settings.adapters_dir)
    check_adapters_dir(settings.adapters_dir, config)
    return config, settings, use_vllm


def stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    load_project_env()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        config, settings, use_vllm = resolve(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # LiveChatError
        print(f"error: {error}", file=sys.stderr)
        return 1
    from sdpo.live_chat.sessions import LiveChatEngine
    from sdpo.live_chat.ui import build_app, launch_app
    from sdpo.learner.updater import OnlineSDPOUpdater

    torch.manual_seed(settings.seed)
    try:
        updater = OnlineSDPOUpdater(config)
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    engine = LiveChatEngine(
        updater,
        settings.adapters_dir,
        use_vllm=use_vllm,
        max_history_messages=settings.max_history_messages,
        wait_for_updates=settings.wait_for_updates,
    )
    known = engine.users()
    logger.info("adapters in %s: %s", settings.adapters_dir, ", ".join(known) if known else "none yet")
    app = build_app(engine, signal_vmin=settings.signal_vmin, signal_vmax=settings.signal_vmax)
    # SIGTERM stops the server like Ctrl-C does, so the queued updates still finish and are saved.
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        launch_app(app, host=settings.host, port=settings.port, share=settings.share)
    except KeyboardInterrupt:  # a stop while the server was still starting (once serving, Gradio handles it)
        app.close()
    finally:
        logger.info("finishing %d queued update(s) before exiting", engine.queued())
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
