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
Direct:
    python live_chat.py --model smollm2-135m-instruct --device cpu --adapters_dir runs/live_chat

Deliberate differences from the reference live chat: the update after a follow-up trains on the
previous reply with that follow-up (the reference's async mode used the prompt before the reply as
o); training never delays a reply; adapters are per user, written atomically, and resumed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import sys
from dataclasses import dataclass, fields

import torch

from sdpo.learner.config import OnlineSDPOConfig
from sdpo.live_chat.accounts import Accounts, users_main
from sdpo.live_chat.sessions import Limits, LiveChatError, check_adapters_dir
from sdpo.models.model_loading import DEFAULT_CPU_MODEL, ModelLoadError
from sdpo.utils.env_file import load_project_env

logger = logging.getLogger("live_chat")


@dataclass(frozen=True)
class ChatSettings:
    """Everything about the chat server that is not the learner's config."""

    adapters_dir: str
    host: str
    port: int
    share: bool
    use_vllm: bool
    max_history_messages: int
    wait_for_updates: bool
    signal_vmin: float
    signal_vmax: float
    seed: int
    accounts_file: str | None
    max_message_tokens: int
    max_queued_updates: int
    update_workers: int
    max_resident_adapters: int
    shutdown_timeout_s: float


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    policy = parser.add_argument_group("policy and training (the online loop's flags; CPU defaults)")
    policy.add_argument("--model", default=DEFAULT_CPU_MODEL, help="policy: HF id, local folder or bundled alias")
    policy.add_argument("--lr", type=float, default=1e-4, help="learning rate (constant)")
    policy.add_argument("--use_lora", action="store_true",
        help="accepted for the online loop's command lines; live chat always trains LoRA")
    policy.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    policy.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (scale = alpha / r)")
    policy.add_argument("--loss_mode", default="simple_signal", choices=["simple_signal", "full_distillation"],
        help="SDPO loss")
    policy.add_argument("--distillation_topk", type=int, default=20, help="K of the top-K distillation")
    policy.add_argument("--signal_clip", type=float, default=0.0,
        help="clip the per-token signal to ±this in simple_signal mode (0: off)")
    policy.add_argument("--train_steps_per_example", type=int, default=1, help="gradient steps per follow-up")
    policy.add_argument("--max_new_tokens", type=int, default=96,
        help="reply length budget (also the longest reply trained on)")
    policy.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the replies")
    policy.add_argument("--dtype", default="float32",
        help="compute dtype: float32 on CPU (bf16 autocast is ~10x slower there without AVX512-BF16), bfloat16 on GPU")
    policy.add_argument("--device", default="auto", help="training device: auto, cpu, cuda, cuda:1, ...")
    policy.add_argument("--use_vllm", action="store_true",
        help="generate replies with vLLM, hot-swapping to the user's newest adapter (GPU)")
    policy.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3,
        help="GPU memory share of the vLLM engine")
    policy.add_argument("--seed", type=int, default=42, help="seeds the initial adapter and the sampling")
    chat = parser.add_argument_group("chat server")
    chat.add_argument("--adapters_dir", "--checkpoint_dir", default="./live_chat_adapters",
        help="one adapter folder per user name")
    chat.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the page to the network)")
    chat.add_argument("--port", type=int, default=7860, help="port of the page")
    chat.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    chat.add_argument("--max_history_messages", type=int, default=8,
        help="messages of the chat the model sees (0: all)")
    chat.add_argument("--wait_for_updates", action="store_true",
        help="reply only after the update on the previous reply finished (synchronous)")
    chat.add_argument("--signal_vmin", type=float, default=-5.0, help="signal colour scale minimum (red)")
    chat.add_argument("--signal_vmax", type=float, default=5.0, help="signal colour scale maximum (blue)")
    service = parser.add_argument_group("accounts and limits (several users)")
    service.add_argument("--accounts_file", default=None,
        help="accounts JSON (`python live_chat.py users add NAME --accounts_file F`); required for --share or a "
             "non-local --host. Without it: one local user, no login")
    service.add_argument("--max_message_tokens", type=int, default=512,
        help="longest user message or follow-up, in tokens (shown in the page)")
    service.add_argument("--max_queued_updates", type=int, default=16, help="a user's updates waiting or running")
    service.add_argument("--update_workers", type=int, default=1,
        help="update workers, each with its own copy of the training model; users take turns between them")
    service.add_argument("--max_resident_adapters", type=int, default=8,
        help="with --use_vllm: users' adapters kept loaded in the one vLLM engine (least recently used out)")
    service.add_argument("--shutdown_timeout_s", type=float, default=600.0,
        help="on stop, finish queued updates for at most this long; the rest is kept for the next start")
    return parser


def resolve(argv=None) -> tuple[OnlineSDPOConfig, ChatSettings, Accounts | None]:
    """Parse and check everything that can be checked before the model loads."""
    args = build_parser().parse_args(argv)
    if args.accounts_file is None and (args.share or args.host not in LOCAL_HOSTS):
        exposed = "--share" if args.share else f"--host {args.host}"
        raise LiveChatError(f"{exposed} serves other people: create accounts (python live_chat.py users add NAME "
                            "--accounts_file accounts.json) and pass --accounts_file")
    accounts = Accounts.load(args.accounts_file) if args.accounts_file is not None else None
    if accounts is not None and not accounts.accounts:
        raise LiveChatError(f"{args.accounts_file}: no accounts yet; add one with `python live_chat.py users add`")
    for name in ("max_message_tokens", "max_queued_updates", "update_workers", "max_resident_adapters"):
        if getattr(args, name) < 1:
            raise LiveChatError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.shutdown_timeout_s >= 0:
        raise LiveChatError(f"--shutdown_timeout_s must be >= 0, got {args.shutdown_timeout_s}")
    if not 0 < args.port < 65536:
        raise LiveChatError(f"--port {args.port} is not a port number (1-65535)")
    if args.max_history_messages < 0:
        raise LiveChatError(f"--max_history_messages must be >= 0, got {args.max_history_messages}")
    if not args.signal_vmin < 0 < args.signal_vmax:
        raise LiveChatError(f"--signal_vmin ({args.signal_vmin}) must be < 0 < --signal_vmax ({args.signal_vmax})")
    config = OnlineSDPOConfig(
        model_name_or_path=args.model,
        learning_rate=args.lr,
        use_lora=True,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        loss_mode=args.loss_mode,
        distillation_topk=args.distillation_topk,
        signal_clip=args.signal_clip,
        train_steps_per_example=args.train_steps_per_example,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        torch_dtype=args.dtype,
        device=args.device,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        checkpoint_dir=args.adapters_dir,
        checkpoint_every_n_steps=0,
        max_checkpoints=0,
    )
    settings = ChatSettings(**{field.name: getattr(args, field.name) for field in fields(ChatSettings)})
    check_adapters_dir(settings.adapters_dir, config)
    return config, settings, accounts


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
        config, settings, accounts = resolve(argv)
    except ValueError as error:  # LiveChatError, AccountsError and OnlineSDPOConfig's checks
        print(f"error: {error}", file=sys.stderr)
        return 1
    from sdpo.learner.updater import OnlineSDPOUpdater
    from sdpo.live_chat.api import Identities
    from sdpo.live_chat.sessions import LiveChatEngine
    from sdpo.live_chat.ui import build_app, launch_app

    torch.manual_seed(settings.seed)
    try:
        # One training model per worker, each with its own config object (saving sets its checkpoint_dir).
        updaters = [OnlineSDPOUpdater(copy.deepcopy(config)) for _ in range(settings.update_workers)]
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    engine = LiveChatEngine(
        updaters,
        settings.adapters_dir,
        use_vllm=settings.use_vllm,
        max_resident_adapters=settings.max_resident_adapters,
        max_history_messages=settings.max_history_messages,
        wait_for_updates=settings.wait_for_updates,
        limits=Limits(settings.max_message_tokens, settings.max_queued_updates),
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
        logger.info("finishing %d queued update(s) before exiting (Ctrl-C again: keep them for the next start)",
                    engine.queued())
        kept = engine.close(settings.shutdown_timeout_s)
        logger.info("stopped; %d queued update(s) kept for the next start", kept)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
