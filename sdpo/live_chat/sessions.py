"""Live chat learning: one LoRA adapter per user, an ordered background update queue, and replies
from each user's newest finished update.

A person chats with the policy; every user message that follows an assistant reply is the follow-up
o for that reply: the interaction (x = the messages the reply was generated from, y = its exact token
ids, o) goes to a background worker for one SDPO update (``OnlineSDPOUpdater.train_step``), and the
reply to the new message is generated at once with the newest update that has finished. Updates,
undo, reset and save run through one queue, so they happen in the order they were asked for.

Two copies of the adapter are live: the training model (``OnlineSDPOUpdater``, used only by the
worker) and the reply model (a frozen copy of the policy, or the vLLM engine), which loads a user's
newest finished adapter from disk before answering that user. Training therefore never waits for a
reply, and a reply never waits for training.

On disk (``adapters_dir``):

    live_chat.json             the model and LoRA shape the adapters belong to (checked at start)
    _initial/                  the fresh adapter every new user starts from and reset returns to
    <user>/HEAD.json           {"current": {name, step, fingerprint, last_update}, "previous": ... | null, "next": n}
    <user>/v000004/            an OnlineSDPOUpdater checkpoint (adapter, tokenizer, training_state.pt with
                               the optimizer state and step): loadable with ``OnlineSDPOUpdater(resume_from=...)``
    <user>/saved/step_<n>/     copies kept by "save"
    <user>/failed_updates.jsonl  updates that raised, kept for a retry

A version folder is written complete under a temporary name and renamed (``save_checkpoint``);
HEAD.json is replaced atomically afterwards, so a crash at any point leaves a readable state. One
level of undo is kept per user (the state before the last update or reset).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import queue
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdpo.utils.file_io import iter_jsonl, write_json_atomic, write_jsonl_atomic
from sdpo.models.generation import Generation, SamplingParams, autocast_context, generate, stop_token_ids
from sdpo.learner.updater import TRAINING_STATE_FILE, EmptyResponseError, OnlineSDPOUpdater
from sdpo.core import build_hindsight_messages, pad_contexts_and_completions, score_completions, sdpo_signal

logger = logging.getLogger(__name__)

INITIAL = "_initial"
HEAD_FILE = "HEAD.json"
SHAPE_FILE = "live_chat.json"
FAILED_FILE = "failed_updates.jsonl"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_NAME = re.compile(r"^v\d+$")


class LiveChatError(ValueError):
    """Bad input from the person or the command line; the message says what to do."""


def check_user_name(name: str) -> str:
    """The stripped name, or LiveChatError: names become folder names."""
    name = (name or "").strip()
    if not USER_NAME.match(name):
        raise LiveChatError(
            f"user name {name!r} is not usable: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def adapter_shape(config) -> dict:
    """What must match between a stored adapter and the running policy."""
    return {
        "model": config.model_name_or_path,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_target_modules": sorted(config.lora_target_modules),
    }


def check_adapters_dir(adapters_dir: str | Path, config) -> None:
    """Fail with one line when ``adapters_dir`` holds adapters of another model or LoRA shape.

    Cheap (reads one JSON file), so the command line checks it before loading the model.
    """
    path = Path(adapters_dir) / SHAPE_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LiveChatError(f"{path}: not readable JSON ({error}); restore it or use another --adapters_dir") from error
    wanted = adapter_shape(config)
    differing = [
        f"{key} {stored.get(key)!r} (running {wanted[key]!r})" for key in wanted if stored.get(key) != wanted[key]
    ]
    if differing:
        raise LiveChatError(
            f"{path}: the stored adapters were trained with {', '.join(differing)}; "
            "start with the same --model/--lora_r/--lora_alpha or use another --adapters_dir"
        )


def file_fingerprint(path: Path) -> str:
    """First 8 hex digits of the file's SHA-256: shows in the UI whether the adapter changed."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------------
# Conversations and what the worker reports
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interaction:
    """One (x, y, o): the messages the reply was generated from, the reply's exact ids, the follow-up."""

    context: list[dict]
    response: Generation
    follow_up: str

    def to_dict(self) -> dict:
        return {"context": self.context, "response": asdict(self.response), "follow_up": self.follow_up}

    @classmethod
    def from_dict(cls, row: dict) -> "Interaction":
        return cls(row["context"], Generation(**row["response"]), row["follow_up"])


@dataclass
class Conversation:
    """One browser session's chat with one user's adapter.

    Attributes:
        user: whose adapter answers and learns.
        messages: the whole chat (what the model sees, capped by ``max_history_messages``).
        awaiting_follow_up: the last reply and its context, until the next user message arrives.
        reply_steps: for each assistant message, the adapter step it was generated with.
    """

    user: str
    messages: list[dict] = field(default_factory=list)
    awaiting_follow_up: tuple[list[dict], Generation] | None = None
    reply_steps: list[int] = field(default_factory=list)


@dataclass
class UpdateReport:
    """A finished update, as the signal panel shows it."""

    step: int
    loss: float
    signal_mean: float
    follow_up: str
    tokens: list[str]
    signal: list[float]
    train_time_s: float


@dataclass
class UserStatus:
    """A snapshot of one user's adapter for the UI."""

    user: str
    step: int
    fingerprint: str
    queued: int
    can_undo: bool
    last_update: UpdateReport | None
    failed: list[dict]
    notice: str


@dataclass
class _UserRecord:
    head: dict
    failed: list[dict]
    queued: int = 0
    notice: str = ""


@dataclass
class Job:
    """One queued piece of work for a user; ``done`` is set when it has finished (or failed)."""

    kind: str  # update | undo | reset | save | retry
    user: str
    interaction: Interaction | None = None
    done: threading.Event = field(default_factory=threading.Event)


# --------------------------------------------------------------------------------------------------
# Reply models
# --------------------------------------------------------------------------------------------------


class TransformersReplies:
    """Replies from a frozen copy of the training model that loads the asked-for adapter folder."""

    def __init__(self, updater: OnlineSDPOUpdater):
        self.model = copy.deepcopy(updater.model).eval().requires_grad_(False)
        self.tokenizer = updater.tokenizer
        self.autocast_dtype = updater.autocast_dtype
        self.loaded: Path | None = None

    def generate(self, adapter: Path, context: list[int], sampling: SamplingParams) -> Generation:
        from peft import load_peft_weights, set_peft_model_state_dict

        if adapter != self.loaded:
            set_peft_model_state_dict(self.model, load_peft_weights(str(adapter), device="cpu"))
            self.loaded = adapter
        return generate(self.model, self.tokenizer, [context], sampling, autocast_dtype=self.autocast_dtype)[0]


class VLLMReplies:
    """Replies from a vLLM engine that hot-swaps to the asked-for adapter folder."""

    def __init__(self, engine, stop_ids: list[int]):
        self.engine = engine
        self.stop_ids = stop_ids

    def generate(self, adapter: Path, context: list[int], sampling: SamplingParams) -> Generation:
        if adapter != self.engine.adapter_path:
            self.engine.load_adapter(adapter)
        return self.engine.generate([context], sampling, self.stop_ids)[0]


def build_vllm_replies(updater: OnlineSDPOUpdater) -> VLLMReplies:
    from sdpo.models.vllm_engines import VLLMPolicyEngine

    engine = VLLMPolicyEngine.from_config(updater.config, updater.tokenizer)
    return VLLMReplies(engine, stop_token_ids(updater.model, updater.tokenizer))


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    generation: Generation
    step: int  # adapter step the reply was generated with


class LiveChatEngine:
    """Per-user adapters, the update worker and the reply model; see the module docstring.

    ``updater`` must train LoRA adapters and must not own a vLLM engine (pass ``use_vllm=True`` here
    instead: the engine then serves replies from vLLM). Call ``close`` to stop the worker.
    """

    def __init__(
        self,
        updater: OnlineSDPOUpdater,
        adapters_dir: str | Path,
        *,
        use_vllm: bool = False,
        max_history_messages: int = 0,
        wait_for_updates: bool = False,
    ):
        cfg = updater.config
        if not cfg.use_lora or updater.vllm_engine is not None:
            raise ValueError("live chat needs an updater with use_lora=True and use_vllm=False (the engine serves)")
        self.updater = updater
        self.root = Path(adapters_dir)
        self.max_history_messages = max_history_messages
        self.wait_for_updates = wait_for_updates
        check_adapters_dir(self.root, cfg)
        self.root.mkdir(parents=True, exist_ok=True)
        self._users: dict[str, _UserRecord] = {}
        self._lock = threading.Lock()  # guards _users and _serving_adapter
        self._serving_lock = threading.Lock()  # one reply at a time on the reply model
        self._serving_adapter: Path | None = None
        self._active: tuple[str, str] | None = None  # (user, version) the training model holds
        self._prepare_initial_adapter()
        self.initial_fingerprint = file_fingerprint(self.root / INITIAL / ADAPTER_WEIGHTS_FILE)
        self._replies = build_vllm_replies(updater) if use_vllm else TransformersReplies(updater)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="live-chat-updates", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ adapters on disk

    def _prepare_initial_adapter(self) -> None:
        """Load the stored initial adapter (same start after a restart) or store this one."""
        if (self.root / INITIAL / TRAINING_STATE_FILE).is_file():
            self._load_into_training_model(self.root / INITIAL)
        else:
            self._save_version(self.root, INITIAL, {})
            write_json_atomic(self.root / SHAPE_FILE, adapter_shape(self.updater.config))

    def _save_version(self, folder: Path, name: str, extra_state: dict) -> Path:
        """The training model's adapter and optimizer state as ``folder/name``, written atomically."""
        return self.updater.save_state(folder / name, extra_state)

    def _load_into_training_model(self, path: Path) -> None:
        """Adapter weights, optimizer state and step of a version folder (RNG states untouched)."""
        self.updater.load_state(path, restore_rng=False)

    def _version_path(self, user: str, entry: dict) -> Path:
        return self.root / INITIAL if entry["name"] == INITIAL else self.root / user / entry["name"]

    def _initial_entry(self) -> dict:
        return {"name": INITIAL, "step": 0, "fingerprint": self.initial_fingerprint, "last_update": None}

    def _record(self, user: str) -> _UserRecord:
        """The user's record, read from disk on first use (caller holds ``_lock``)."""
        if user in self._users:
            return self._users[user]
        folder = self.root / user
        head_path = folder / HEAD_FILE
        if head_path.is_file():
            head = json.loads(head_path.read_text(encoding="utf-8"))
        else:
            head = {"current": self._initial_entry(), "previous": None, "next": 1}
        failed = []
        if (folder / FAILED_FILE).is_file():
            failed = [row for _, row, error in iter_jsonl(folder / FAILED_FILE) if error is None]
        for staging in folder.glob(".*.tmp") if folder.is_dir() else []:
            shutil.rmtree(staging, ignore_errors=True)
        record = _UserRecord(head=head, failed=failed)
        self._users[user] = record
        return record

    def _write_head(self, user: str, head: dict) -> None:
        """Publish a new HEAD (atomically), then drop versions nothing refers to any more."""
        write_json_atomic(self.root / user / HEAD_FILE, head)
        with self._lock:
            self._users[user].head = head
            keep = {entry["name"] for entry in (head["current"], head["previous"]) if entry}
            serving = self._serving_adapter
            for path in (self.root / user).iterdir():
                if VERSION_NAME.match(path.name) and path.name not in keep and path != serving:
                    shutil.rmtree(path, ignore_errors=True)

    def _write_failed(self, user: str) -> None:
        with self._lock:
            rows = list(self._users[user].failed)
        write_jsonl_atomic(self.root / user / FAILED_FILE, rows)

    def _notify(self, user: str, notice: str) -> None:
        with self._lock:
            self._users[user].notice = notice

    # ------------------------------------------------------------------ public API (any thread)

    def users(self) -> list[str]:
        """Users with a stored adapter."""
        return sorted(p.name for p in self.root.iterdir() if (p / HEAD_FILE).is_file() and USER_NAME.match(p.name))

    def status(self, user: str) -> UserStatus:
        user = check_user_name(user)
        with self._lock:
            record = self._record(user)
            current = record.head["current"]
            report = current.get("last_update")
            return UserStatus(
                user=user,
                step=current["step"],
                fingerprint=current["fingerprint"],
                queued=record.queued,
                can_undo=record.head["previous"] is not None,
                last_update=UpdateReport(**report) if report else None,
                failed=list(record.failed),
                notice=record.notice,
            )

    def adapter_path(self, user: str) -> Path:
        """Folder of the user's newest finished adapter."""
        with self._lock:
            return self._version_path(user, self._record(check_user_name(user)).head["current"])

    def conversation_context(self, conversation: Conversation) -> list[dict]:
        """The messages the model sees: the last ``max_history_messages`` (0 = all), from a user turn on."""
        messages = conversation.messages
        if self.max_history_messages:
            messages = messages[-self.max_history_messages :]
            while messages and messages[0]["role"] != "user":
                messages = messages[1:]
        return copy.deepcopy(messages)

    def add_user_message(self, conversation: Conversation, text: str) -> Job | None:
        """Append the person's message; when it follows a reply, queue the update on (x, y, o=text).

        Returns the queued job (None for the first message of a conversation).
        """
        if not text or not text.strip():
            raise LiveChatError("the message is empty: type something first")
        job = None
        if conversation.awaiting_follow_up is not None:
            context, response = conversation.awaiting_follow_up
            job = self.submit_update(conversation.user, Interaction(context, response, text))
            conversation.awaiting_follow_up = None
        conversation.messages.append({"role": "user", "content": text})
        return job

    def answer(self, conversation: Conversation) -> Reply:
        """Generate the reply to the conversation's last user message with the newest finished update."""
        if not conversation.messages or conversation.messages[-1]["role"] != "user":
            raise LiveChatError("there is no user message to answer")
        context = self.conversation_context(conversation)
        reply = self.reply(conversation.user, context)
        conversation.messages.append({"role": "assistant", "content": reply.generation.text})
        conversation.awaiting_follow_up = (context, reply.generation)
        conversation.reply_steps.append(reply.step)
        return reply

    def reply(self, user: str, messages: list[dict]) -> Reply:
        """One sampled reply to ``messages`` from the user's newest finished adapter."""
        user = check_user_name(user)
        context_ids = self.updater.encode_context(messages)
        with self._serving_lock:
            with self._lock:
                current = self._record(user).head["current"]
                adapter = self._version_path(user, current)
                self._serving_adapter = adapter
            generation = self._replies.generate(adapter, context_ids, self.updater.sampling)
        return Reply(generation, current["step"])

    def submit_update(self, user: str, interaction: Interaction) -> Job:
        return self._submit(Job("update", check_user_name(user), interaction))

    def undo(self, user: str) -> Job:
        """Queue: go back to the state before the last update (or reset)."""
        return self._submit(Job("undo", check_user_name(user)))

    def reset(self, user: str) -> Job:
        """Queue: start again from the initial adapter (undo brings the old one back)."""
        return self._submit(Job("reset", check_user_name(user)))

    def save(self, user: str) -> Job:
        """Queue: copy the current adapter to ``<user>/saved/step_<n>``."""
        return self._submit(Job("save", check_user_name(user)))

    def retry_failed(self, user: str) -> Job:
        """Queue the user's failed updates again, oldest first."""
        return self._submit(Job("retry", check_user_name(user)))

    def queued(self) -> int:
        """Jobs of all users not finished yet."""
        with self._lock:
            return sum(record.queued for record in self._users.values())

    def wait_until_idle(self) -> None:
        """Block until every queued job has finished."""
        self._jobs.join()

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    def _submit(self, job: Job) -> Job:
        """Queue ``job``; with ``wait_for_updates`` (and not on the worker itself) wait until it is done."""
        with self._lock:
            self._record(job.user).queued += 1
        self._jobs.put(job)
        if self.wait_for_updates and threading.current_thread() is not self._worker:
            job.done.wait()
        return job

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        handlers = {"update": self._run_update, "undo": self._run_undo, "reset": self._run_reset,
                    "save": self._run_save, "retry": self._run_retry}
        while (job := self._jobs.get()) is not None:
            try:
                handlers[job.kind](job)
            except Exception as error:  # the worker must survive any one job; the job is reported, not lost
                logger.exception("live chat: %s for %s failed", job.kind, job.user)
                self._record_failure(job, error)
            finally:
                with self._lock:
                    self._users[job.user].queued -= 1
                job.done.set()
                self._jobs.task_done()
        self._jobs.task_done()

    def _record_failure(self, job: Job, error: Exception) -> None:
        # The training model may hold a half-applied step: reload the user's state before the next job.
        self._active = None
        self.updater.optimizer.zero_grad(set_to_none=True)
        message = f"{type(error).__name__}: {error}"
        if job.interaction is None:
            self._notify(job.user, f"{job.kind} failed: {message}")
            return
        with self._lock:
            self._users[job.user].failed.append({**job.interaction.to_dict(), "error": message})
            self._users[job.user].notice = f"the update on “{job.interaction.follow_up[:60]}” failed: {message}"
        self._write_failed(job.user)

    def _activate(self, user: str) -> dict:
        """Make the training model hold the user's current version; returns the user's HEAD."""
        with self._lock:
            head = self._record(user).head
        key = (user, head["current"]["name"])
        if self._active != key:
            self._load_into_training_model(self._version_path(user, head["current"]))
            self._active = key
        return head

    @torch.no_grad()
    def follow_up_signal(self, interaction: Interaction) -> tuple[list[str], list[float]]:
        """Token pieces of y and A_t = log π(y_t|x⊕o) − log π(y_t|x) under the training model's weights."""
        updater = self.updater
        ids = updater.completion_ids(interaction.response)
        template = updater.config.hindsight_block_template
        teacher_messages = build_hindsight_messages(interaction.context, interaction.follow_up, template=template)
        contexts = [updater.encode_context(interaction.context), updater.encode_context(teacher_messages)]
        batch = pad_contexts_and_completions(contexts, [ids, ids], updater.tokenizer.pad_token_id)
        with autocast_context(updater.device, updater.autocast_dtype):
            scores = score_completions(updater.model, batch.to(updater.device))
        signal = sdpo_signal(scores.logprobs[:1], scores.logprobs[1:], scores.mask[:1])[0]
        pieces = [updater.tokenizer.decode([token]) for token in ids]
        return pieces, signal.float().cpu().tolist()

    def _run_update(self, job: Job) -> None:
        user, interaction = job.user, job.interaction
        head = self._activate(user)
        try:
            tokens, signal = self.follow_up_signal(interaction)
        except EmptyResponseError as error:
            self._notify(user, f"update skipped: {error}")
            return
        metrics = self.updater.train_step(interaction.context, interaction.response, interaction.follow_up)
        report = UpdateReport(
            step=metrics["step"],
            loss=metrics["loss"],
            signal_mean=metrics["signal_mean"],
            follow_up=interaction.follow_up,
            tokens=tokens,
            signal=signal,
            train_time_s=metrics["train_time_s"],
        )
        self._commit(user, head, asdict(report), interaction)
        self._notify(user, f"update {report.step} finished ({report.train_time_s:.1f} s)")

    def _commit(self, user: str, head: dict, last_update: dict, interaction: Interaction) -> None:
        name = f"v{head['next']:06d}"
        extra_state = {"last_update": last_update, "interaction": interaction.to_dict()}
        path = self._save_version(self.root / user, name, extra_state)
        entry = {
            "name": name,
            "step": self.updater.step,
            "fingerprint": file_fingerprint(path / ADAPTER_WEIGHTS_FILE),
            "last_update": last_update,
        }
        self._write_head(user, {"current": entry, "previous": head["current"], "next": head["next"] + 1})
        self._active = (user, name)

    def _run_undo(self, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        if head["previous"] is None:
            self._notify(job.user, "nothing to undo")
            return
        self._write_head(job.user, {**head, "current": head["previous"], "previous": None})
        self._notify(job.user, f"undone: back to adapter step {head['previous']['step']}")

    def _run_reset(self, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        self._write_head(job.user, {**head, "current": self._initial_entry(), "previous": head["current"]})
        self._notify(job.user, "reset to the initial adapter (undo brings the previous one back)")

    def _run_save(self, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        source = self._version_path(job.user, head["current"])
        target = self.root / job.user / "saved" / f"step_{head['current']['step']}"
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        self._notify(job.user, f"saved to {target}")

    def _run_retry(self, job: Job) -> None:
        with self._lock:
            record = self._record(job.user)
            rows, record.failed = record.failed, []
        self._write_failed(job.user)
        for row in rows:
            self.submit_update(job.user, Interaction.from_dict(row))
        self._notify(job.user, f"{len(rows)} failed update(s) queued again")
