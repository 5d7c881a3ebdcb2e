"""Live chat learning: one LoRA adapter per account, per-user update queues drained fairly by a worker
pool, and replies (streamed) from each user's newest finished update.

A person chats with the policy; every user message that follows an assistant reply is the follow-up
o for that reply: the interaction (x = the messages the reply was generated from, y = its exact token
ids, o) is queued for one SDPO update (``OnlineSDPOUpdater.train_step``), and the reply to the new
message is generated at once with the newest update that has finished. A user's updates, undo, reset
and save run in the order they were asked for; users take turns (round robin), so one user's long
queue never stalls another's, and an exception in one user's job is recorded for that user only.

Identity is the caller's business (``sdpo.live_chat.api``: the login session or the API key); the engine
takes the account id and keeps everything of that user under ``users/<id>/``.

Each worker owns a training model (an ``OnlineSDPOUpdater``) and loads the user's current version into
it before a job; one reply model (a frozen copy of the policy, or a vLLM engine serving many adapters)
answers everyone. Training therefore never waits for a reply, and a reply never waits for training.

On disk (``adapters_dir``):

    live_chat.json                  the model and LoRA shape the adapters belong to (checked at start)
    _initial/                       the fresh adapter every new user starts from and reset returns to
    users/<id>/HEAD.json            {"current": {name, step, fingerprint, last_update}, "previous": ..., "next": n}
    users/<id>/v000004/             an OnlineSDPOUpdater checkpoint (adapter, tokenizer, training_state.pt)
    users/<id>/saved/step_<n>/      copies kept by "save"
    users/<id>/updates.jsonl        every applied update: seq, step, follow-up, when queued and applied
    users/<id>/failed_updates.jsonl updates that raised, kept for a retry
    users/<id>/pending_updates.jsonl updates still queued when the server stopped; queued again at start

A version folder is written complete under a temporary name and renamed; HEAD.json is replaced atomically
afterwards, so a crash at any point leaves a readable state. One level of undo is kept per user.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdpo.learner.updater import TRAINING_STATE_FILE, EmptyResponseError, OnlineSDPOUpdater
from sdpo.live_chat.accounts import USER_ID
from sdpo.models.generation import Generation, SamplingParams, generate, stop_token_ids
from sdpo.utils.file_io import iter_jsonl, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)

INITIAL = "_initial"
USERS_DIR = "users"
HEAD_FILE = "HEAD.json"
SHAPE_FILE = "live_chat.json"
FAILED_FILE = "failed_updates.jsonl"
PENDING_FILE = "pending_updates.jsonl"
UPDATES_FILE = "updates.jsonl"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
VERSION_PREFIX = "v"
RECENT_REPLIES = 64  # per user: API replies whose follow-up may still arrive


class LiveChatError(ValueError):
    """Bad input from the person or the command line; the message says what to do."""


def check_user_id(user: str) -> str:
    """``user`` when it is a usable account id (a folder name under ``users/``), else LiveChatError."""
    if not isinstance(user, str) or not USER_ID.match(user):
        raise LiveChatError(f"user id {user!r} is not usable: 1-64 letters, digits, '_', '-', starting alphanumeric")
    return user


def adapter_shape(config) -> dict:
    """What must match between a stored adapter and the running policy."""
    return {
        "model": config.model_name_or_path,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_target_modules": sorted(config.lora_target_modules),
    }


def check_adapters_dir(adapters_dir: str | Path, config) -> None:
    """Fail with one line when ``adapters_dir`` cannot hold this policy's adapters (another model or LoRA
    shape, a file in the way, not writable). Cheap, so the command line checks it before loading the model."""
    root = Path(adapters_dir)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LiveChatError(f"--adapters_dir {root}: {existing} is a file; pick a folder")
    if existing is not None and not _writable(existing):
        raise LiveChatError(f"--adapters_dir {root}: {existing} is not writable; pick another folder")
    path = root / SHAPE_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
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


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def file_fingerprint(path: Path) -> str:
    """First 8 hex digits of the file's SHA-256: shows in the UI whether the adapter changed."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------------
# Conversations and what the workers report
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
    def from_dict(cls, row: dict) -> Interaction:
        return cls(row["context"], Generation(**row["response"]), row["follow_up"])


@dataclass
class Conversation:
    """One browser session's chat with one user's adapter.

    Attributes:
        user: the account id whose adapter answers and learns (set by the server, never by the page).
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
    """A finished update, as the signal panel shows it: ``signal`` is the A_t the update trained on."""

    step: int
    loss: float
    signal_mean: float
    follow_up: str
    tokens: list[str]
    signal: list[float]
    train_time_s: float


@dataclass
class UserStatus:
    """A snapshot of one user's adapter for the UI and the API."""

    user: str
    step: int
    fingerprint: str
    queued: int
    can_undo: bool
    last_update: UpdateReport | None
    failed: list[dict]
    notice: str


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one user from holding the workers or the reply model.

    Attributes:
        max_message_tokens: tokens of one user message (a follow-up is a user message).
        max_queued_updates: a user's jobs waiting or running; more are refused until some finish.
    """

    max_message_tokens: int = 512
    max_queued_updates: int = 16


@dataclass
class Job:
    """One queued piece of work for a user; ``done`` is set when it has finished (or failed)."""

    kind: str  # update | undo | reset | save | retry
    user: str
    interaction: Interaction | None = None
    seq: int = 0  # updates: the user's running number, in the order they were asked for
    queued_at: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _UserRecord:
    head: dict
    failed: list[dict]
    applied: list[dict]
    next_seq: int
    jobs: collections.deque = field(default_factory=collections.deque)
    running: bool = False
    notice: str = ""
    recent_replies: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    @property
    def queued(self) -> int:
        return len(self.jobs) + self.running


# --------------------------------------------------------------------------------------------------
# Reply models
# --------------------------------------------------------------------------------------------------


class TransformersReplies:
    """Replies from a frozen copy of the policy that serves many users' adapters in one batch (PEFT's
    mixed-adapter batches), streamed token by token to each request.

    Requests that arrive while a batch is being generated form the next batch (up to ``max_batch``, with at most
    ``max_resident_adapters`` different adapters). Each version folder is loaded once under its own name and
    kept while it is among the ``max_resident_adapters`` most recently used.
    """

    streams = True

    def __init__(self, updater: OnlineSDPOUpdater, max_resident_adapters: int = 8, max_batch: int = 8):
        self.model = copy.deepcopy(updater.model).eval().requires_grad_(False)
        self.tokenizer = updater.tokenizer
        self.autocast_dtype = updater.autocast_dtype
        self.stop_ids = stop_token_ids(updater.model, updater.tokenizer)
        self.max_resident = max_resident_adapters
        self.max_batch = max_batch
        self._resident: collections.OrderedDict[Path, str] = collections.OrderedDict()  # least recently used first
        self._loaded = 0
        self._pending: list[_PendingReply] = []
        self._ready = threading.Condition()
        self._closed = False
        self._server = threading.Thread(target=self._serve, name="live-chat-replies", daemon=True)
        self._server.start()

    def generate(self, adapter: Path, context: list[int], sampling: SamplingParams, streamer=None) -> Generation:
        request = _PendingReply(adapter, context, sampling, streamer)
        with self._ready:
            if self._closed:
                raise LiveChatError("the server is shutting down; try again when it is back")
            self._pending.append(request)
            self._ready.notify_all()
        request.finished.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._server.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if not self._pending:
                    return
                batch = self._take_batch()
            try:
                for request, generation in zip(batch, self._generate(batch)):
                    request.result = generation
            except Exception as error:  # noqa: BLE001  (raised in every request of the batch)
                for request in batch:
                    request.error = error
            finally:
                for request in batch:
                    request.finished.set()

    def _take_batch(self) -> list[_PendingReply]:
        """The oldest waiting requests that fit one batch (caller holds ``_ready``)."""
        batch, adapters, first = [], set(), self._pending[0]
        for request in list(self._pending):
            fits = request.adapter in adapters or len(adapters) < self.max_resident
            if len(batch) < self.max_batch and fits and request.sampling == first.sampling:
                batch.append(request)
                adapters.add(request.adapter)
                self._pending.remove(request)
        return batch

    def _adapter_name(self, path: Path, needed: set[Path]) -> str:
        """The loaded adapter's name for the folder ``path``, loading it (and evicting one not ``needed``)."""
        if path in self._resident:
            self._resident.move_to_end(path)
            return self._resident[path]
        while len(self._resident) >= self.max_resident:
            evicted = next(p for p in self._resident if p not in needed)
            self.model.delete_adapter(self._resident.pop(evicted))
        self._loaded += 1
        name = f"reply_{self._loaded}"
        self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self._resident[path] = name
        return name

    def _generate(self, batch: list[_PendingReply]) -> list[Generation]:
        batch.sort(key=lambda request: len(request.context))  # little padding; results follow this order
        needed = {request.adapter for request in batch}
        names = [self._adapter_name(request.adapter, needed) for request in batch]
        return generate(
            self.model,
            self.tokenizer,
            [request.context for request in batch],
            batch[0].sampling,
            autocast_dtype=self.autocast_dtype,
            streamer=_RowStreamer([request.streamer for request in batch], self.stop_ids),
            adapter_names=names,
        )


class _RowStreamer:
    """A transformers streamer for a batch: hands each row's tokens to that request's own streamer (if any),
    up to the row's first stop token."""

    def __init__(self, sinks: list, stop_ids: list[int]):
        self.sinks = sinks
        self.stops = set(stop_ids)
        self.done = [sink is None for sink in sinks]
        self.prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # the first call carries the prompts; each sink skips its own
            self.prompt = False
            for row, sink in enumerate(self.sinks):
                if sink is not None:
                    sink.put(value[row : row + 1])
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if not self.done[row]:
                self.sinks[row].put(torch.tensor([token]))
                self.done[row] = token in self.stops

    def end(self) -> None:
        for sink in self.sinks:
            if sink is not None:
                sink.end()


@dataclass
class _PendingReply:
    adapter: Path
    context: list[int]
    sampling: SamplingParams | None = None
    streamer: object = None
    result: Generation | None = None
    error: Exception | None = None
    done: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class VLLMReplies:
    """Replies from one vLLM engine that serves every user's current adapter (multi-LoRA): each version
    folder is its own LoRA, at most ``max_resident_adapters`` on the device and in vLLM's cache.

    Requests that arrive while the engine is busy go together into its next call (one batch, each prompt with
    its own user's adapter), so concurrent users share the engine's batching instead of queueing one by one.
    """

    streams = False

    def __init__(self, updater: OnlineSDPOUpdater, max_resident_adapters: int):
        from sdpo.models.vllm_engines import VLLMPolicyEngine

        self.engine = VLLMPolicyEngine.from_config(
            updater.config,
            updater.tokenizer,
            sleep_between_calls=False,
            max_loras=max_resident_adapters,
            max_cpu_loras=max_resident_adapters,
        )
        self.stop_ids = stop_token_ids(updater.model, updater.tokenizer)
        self._pending: list[_PendingReply] = []
        self._pending_lock = threading.Lock()
        self._engine_lock = threading.Lock()

    def generate(self, adapter: Path, context: list[int], sampling: SamplingParams, streamer=None) -> Generation:
        request = _PendingReply(adapter, context)
        with self._pending_lock:
            self._pending.append(request)
        with self._engine_lock:
            if not request.done:  # nobody took it into their batch: run everything waiting now
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    results = self.engine.generate(
                        [r.context for r in batch], sampling, self.stop_ids, adapters=[r.adapter for r in batch]
                    )
                    for pending, result in zip(batch, results):
                        pending.result = result
                except Exception as error:  # noqa: BLE001  (raised in every request of the batch)
                    for pending in batch:
                        pending.error = error
                finally:
                    for pending in batch:
                        pending.done = True
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        self.engine.close()


@dataclass
class Reply:
    generation: Generation
    step: int  # adapter step the reply was generated with


class ReplyStream:
    """Text pieces of a reply as they are sampled (iterate), then ``reply``: the finished ``Reply``.

    Generation runs on a helper thread; where the reply model cannot stream (vLLM), the whole text comes
    as one piece. The pieces always add up to ``reply.generation.text``.
    """

    def __init__(self, engine: LiveChatEngine, user: str, messages: list[dict]):
        from transformers import TextIteratorStreamer

        self.reply: Reply | None = None
        self._error: BaseException | None = None
        streams = getattr(engine._replies, "streams", False)
        self._streamer = TextIteratorStreamer(engine.updater.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(
            target=self._run, args=(engine, user, messages, streams), name="live-chat-reply", daemon=True
        )
        self._thread.start()

    def _run(self, engine: LiveChatEngine, user: str, messages: list[dict], streams: bool) -> None:
        try:
            self.reply = engine.reply(user, messages, streamer=self._streamer if streams else None)
        except Exception as error:  # noqa: BLE001  (handed to the reading thread, which raises it)
            self._error = error
        finally:
            if not streams or self._error is not None:
                self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        sent = ""
        for piece in self._streamer:
            if piece:
                sent += piece
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error
        text = self.reply.generation.text
        # The streamer decodes up to the stop token; the Generation's text is the authority.
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent) :]


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class LiveChatEngine:
    """Per-user adapters, the update worker pool and the reply model; see the module docstring.

    ``updaters``: one ``OnlineSDPOUpdater`` per worker (LoRA, no vLLM engine of its own); the first also
    tokenizes and seeds the reply model. Replies come from one transformers copy (or, with ``use_vllm``, one
    vLLM engine) serving up to ``max_resident_adapters`` users' adapters at once, in batches (of up to
    ``reply_batch_size`` requests with transformers). Call ``close`` to stop the workers.
    """

    def __init__(
        self,
        updaters: OnlineSDPOUpdater | list[OnlineSDPOUpdater],
        adapters_dir: str | Path,
        *,
        use_vllm: bool = False,
        max_resident_adapters: int = 8,
        max_history_messages: int = 0,
        wait_for_updates: bool = False,
        limits: Limits = Limits(),
        reply_batch_size: int = 8,
    ):
        updaters = [updaters] if isinstance(updaters, OnlineSDPOUpdater) else list(updaters)
        if not updaters:
            raise ValueError("live chat needs at least one updater (one per worker)")
        for updater in updaters:
            if not updater.config.use_lora or updater.vllm_engine is not None:
                raise ValueError("live chat needs updaters with use_lora=True and use_vllm=False (the engine serves)")
        self.updater = updaters[0]
        self.root = Path(adapters_dir)
        self.max_history_messages = max_history_messages
        self.wait_for_updates = wait_for_updates
        self.limits = limits
        check_adapters_dir(self.root, self.updater.config)
        (self.root / USERS_DIR).mkdir(parents=True, exist_ok=True)
        self._users: dict[str, _UserRecord] = {}
        self._lock = threading.Lock()  # guards _users, the round-robin order and _in_use
        self._work_ready = threading.Condition(self._lock)
        self._turns: collections.deque[str] = collections.deque()  # users with a job waiting and none running
        self._in_use: collections.Counter[Path] = collections.Counter()  # adapter folders a reply is reading
        self._stopping = False  # no new jobs accepted
        self._abandon = False  # workers stop after their current job; the rest is persisted
        self._prepare_initial_adapter()
        self.initial_fingerprint = file_fingerprint(self.root / INITIAL / ADAPTER_WEIGHTS_FILE)
        if use_vllm:
            self._replies = VLLMReplies(self.updater, max_resident_adapters)
        else:
            self._replies = TransformersReplies(self.updater, max_resident_adapters, reply_batch_size)
        self._workers = [
            threading.Thread(target=self._work, args=(_Trainer(u),), name=f"live-chat-worker-{i}", daemon=True)
            for i, u in enumerate(updaters)
        ]
        for worker in self._workers:
            worker.start()
        self._requeue_pending()

    # ------------------------------------------------------------------ adapters on disk

    def _prepare_initial_adapter(self) -> None:
        """Store this adapter as the initial one unless one is stored (same start after a restart)."""
        if not (self.root / INITIAL / TRAINING_STATE_FILE).is_file():
            _save_version(self.updater, self.root, INITIAL, {})
            write_json_atomic(self.root / SHAPE_FILE, adapter_shape(self.updater.config))

    def user_folder(self, user: str) -> Path:
        return self.root / USERS_DIR / check_user_id(user)

    def _version_path(self, user: str, entry: dict) -> Path:
        return self.root / INITIAL if entry["name"] == INITIAL else self.user_folder(user) / entry["name"]

    def _initial_entry(self) -> dict:
        return {"name": INITIAL, "step": 0, "fingerprint": self.initial_fingerprint, "last_update": None}

    def _record(self, user: str) -> _UserRecord:
        """The user's record, read from disk on first use (caller holds ``_lock``)."""
        if user in self._users:
            return self._users[user]
        folder = self.user_folder(user)
        head_path = folder / HEAD_FILE
        if head_path.is_file():
            head = json.loads(head_path.read_text(encoding="utf-8"))
        else:
            head = {"current": self._initial_entry(), "previous": None, "next": 1}
        failed, applied = _read_rows(folder / FAILED_FILE), _read_rows(folder / UPDATES_FILE)
        pending = _read_rows(folder / PENDING_FILE)
        next_seq = 1 + max([row["seq"] for row in applied + pending if "seq" in row], default=0)
        for staging in folder.glob(".*.tmp") if folder.is_dir() else []:
            shutil.rmtree(staging, ignore_errors=True)
        record = _UserRecord(head=head, failed=failed, applied=applied, next_seq=next_seq)
        self._users[user] = record
        return record

    def _write_head(self, user: str, head: dict) -> None:
        """Publish a new HEAD (atomically), then drop versions nothing refers to any more."""
        folder = self.user_folder(user)
        write_json_atomic(folder / HEAD_FILE, head)
        with self._lock:
            self._users[user].head = head
            keep = {entry["name"] for entry in (head["current"], head["previous"]) if entry}
            for path in folder.iterdir():
                if _is_version(path.name) and path.name not in keep and self._in_use[path] == 0:
                    shutil.rmtree(path, ignore_errors=True)

    def _write_failed(self, user: str) -> None:
        with self._lock:
            rows = list(self._users[user].failed)
        write_jsonl_atomic(self.user_folder(user) / FAILED_FILE, rows)

    def _notify(self, user: str, notice: str) -> None:
        with self._lock:
            self._record(user).notice = notice

    def _requeue_pending(self) -> None:
        """Queue again the updates a previous run persisted at shutdown, in their order."""
        for pending in sorted((self.root / USERS_DIR).glob(f"*/{PENDING_FILE}")):
            user = pending.parent.name
            if not USER_ID.match(user):
                continue
            rows = _read_rows(pending)
            for row in rows:
                job = Job("update", user, Interaction.from_dict(row), seq=row["seq"], queued_at=row["queued_at"])
                self._enqueue(job, check_limits=False)
            pending.unlink()
            if rows:
                logger.info("queued again %d update(s) of %s left from the last run", len(rows), user)

    # ------------------------------------------------------------------ public API (any thread)

    def users(self) -> list[str]:
        """Account ids with a stored adapter."""
        folder = self.root / USERS_DIR
        return sorted(p.name for p in folder.iterdir() if (p / HEAD_FILE).is_file() and USER_ID.match(p.name))

    def status(self, user: str) -> UserStatus:
        user = check_user_id(user)
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

    def applied_updates(self, user: str) -> list[dict]:
        """The user's applied updates, oldest first: seq, step, follow_up, queued_at, applied_at."""
        with self._lock:
            return list(self._record(check_user_id(user)).applied)

    def adapter_path(self, user: str) -> Path:
        """Folder of the user's newest finished adapter."""
        with self._lock:
            return self._version_path(user, self._record(check_user_id(user)).head["current"])

    def conversation_context(self, conversation: Conversation) -> list[dict]:
        return self.capped_context(conversation.messages)

    def capped_context(self, messages: list[dict]) -> list[dict]:
        """The messages the model sees: the last ``max_history_messages`` (0 = all), from a user turn on."""
        if self.max_history_messages:
            messages = messages[-self.max_history_messages :]
            while messages and messages[0]["role"] != "user":
                messages = messages[1:]
        return copy.deepcopy(messages)

    def check_message(self, text: str) -> str:
        """``text`` if it is a non-empty message within ``limits.max_message_tokens``, else LiveChatError."""
        if not isinstance(text, str) or not text.strip():
            raise LiveChatError("the message is empty: type something first")
        limit = self.limits.max_message_tokens
        # Far more characters than any tokenizer packs into the limit: refused without tokenizing.
        if len(text) > limit * 32:
            raise LiveChatError(
                f"the message has {len(text)} characters, far more than the limit of {limit} tokens: shorten it"
            )
        count = len(self.updater.tokenizer(text, add_special_tokens=False).input_ids)
        if count > limit:
            raise LiveChatError(f"the message has {count} tokens; the limit is {limit}: shorten it")
        return text

    def add_user_message(self, conversation: Conversation, text: str) -> Job | None:
        """Append the person's message; when it follows a reply, queue the update on (x, y, o=text).

        Returns the queued job (None for the first message of a conversation).
        """
        self.check_message(text)
        job = None
        if conversation.awaiting_follow_up is not None:
            context, response = conversation.awaiting_follow_up
            job = self.submit_update(conversation.user, Interaction(context, response, text))
            conversation.awaiting_follow_up = None
        conversation.messages.append({"role": "user", "content": text})
        return job

    def answer(self, conversation: Conversation) -> Reply:
        """Generate the reply to the conversation's last user message with the newest finished update."""
        stream = self.stream_answer(conversation)
        for _ in stream:
            pass
        return stream.reply

    def stream_answer(self, conversation: Conversation) -> ReplyStream:
        """Like ``answer``, streamed: iterate the pieces; the conversation is updated when the stream ends."""
        if not conversation.messages or conversation.messages[-1]["role"] != "user":
            raise LiveChatError("there is no user message to answer")
        context = self.conversation_context(conversation)
        return _ConversationStream(self, conversation, context)

    def reply(self, user: str, messages: list[dict], *, streamer=None) -> Reply:
        """One sampled reply to ``messages`` from the user's newest finished adapter."""
        user = check_user_id(user)
        context_ids = self.updater.encode_context(messages)
        with self._lock:
            current = self._record(user).head["current"]
            adapter = self._version_path(user, current)
            self._in_use[adapter] += 1
        try:
            generation = self._replies.generate(adapter, context_ids, self.updater.sampling, streamer)
        finally:
            with self._lock:
                self._in_use[adapter] -= 1
        return Reply(generation, current["step"])

    # ------------------------------------------------------------------ the API's conversations

    def api_turn(self, user: str, messages: list[dict]) -> ReplyStream:
        """A reply for a client that sends the whole conversation each time (OpenAI chat format).

        When the conversation ends with [one of this user's earlier replies, a new user message], that message
        is the follow-up of the reply: its update is queued exactly once (a repeated request does not queue it
        again). The new reply is remembered for its own follow-up.
        """
        user = check_user_id(user)
        self.check_message(messages[-1]["content"])
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            key = _conversation_key(messages[:-2], messages[-2]["content"])
            with self._lock:
                recent = self._record(user).recent_replies
                earlier = recent.pop(key, None)  # taken, so a repeated request cannot queue it again
            if earlier is not None:
                context, generation = earlier
                try:
                    self.submit_update(user, Interaction(context, generation, messages[-1]["content"]))
                except LiveChatError:  # e.g. the queue is full: the follow-up may be sent again later
                    with self._lock:
                        recent[key] = earlier
                    raise
        context = self.capped_context(messages)
        stream = ReplyStream(self, user, context)
        return _RememberedStream(self, user, messages, context, stream)

    def _remember_reply(self, user: str, messages: list[dict], context: list[dict], generation: Generation) -> None:
        with self._lock:
            recent = self._record(user).recent_replies
            recent[_conversation_key(messages, generation.text)] = (context, generation)
            while len(recent) > RECENT_REPLIES:
                recent.popitem(last=False)

    # ------------------------------------------------------------------ queueing

    def submit_update(self, user: str, interaction: Interaction) -> Job:
        return self._submit(Job("update", check_user_id(user), interaction))

    def undo(self, user: str) -> Job:
        """Queue: go back to the state before the last update (or reset)."""
        return self._submit(Job("undo", check_user_id(user)))

    def reset(self, user: str) -> Job:
        """Queue: start again from the initial adapter (undo brings the old one back)."""
        return self._submit(Job("reset", check_user_id(user)))

    def save(self, user: str) -> Job:
        """Queue: copy the current adapter to ``users/<id>/saved/step_<n>``."""
        return self._submit(Job("save", check_user_id(user)))

    def retry_failed(self, user: str) -> Job:
        """Queue the user's failed updates again, oldest first."""
        return self._submit(Job("retry", check_user_id(user)))

    def delete_user_data(self, user: str) -> Job:
        """Queue (after the user's other jobs): delete everything stored for the user."""
        return self._submit(Job("delete", check_user_id(user)))

    def queued(self) -> int:
        """Jobs of all users not finished yet."""
        with self._lock:
            return sum(record.queued for record in self._users.values())

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued job has finished (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._work_ready:
            while any(record.queued for record in self._users.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._work_ready.wait(left)
        return True

    def close(self, drain_timeout_s: float | None = None) -> int:
        """Stop: finish the queued jobs (all of them, or those done within ``drain_timeout_s``), then stop the
        workers; updates still queued are written to each user's ``pending_updates.jsonl`` and queued again at
        the next start. An interrupt while draining persists the rest at once. Returns how many were persisted
        (0 when already closed)."""
        with self._work_ready:
            if self._abandon:
                return 0
            self._stopping = True
            self._work_ready.notify_all()
        try:
            self.wait_until_idle(drain_timeout_s)
        except KeyboardInterrupt:
            logger.warning("interrupted while finishing the queued updates: keeping the rest for the next start")
        with self._work_ready:
            self._abandon = True
            self._work_ready.notify_all()
        for worker in self._workers:
            worker.join()
        persisted = self._persist_pending()
        if hasattr(self._replies, "close"):
            self._replies.close()
        return persisted

    def _persist_pending(self) -> int:
        persisted = 0
        with self._lock:
            waiting = {user: list(record.jobs) for user, record in self._users.items() if record.jobs}
        for user, jobs in waiting.items():
            rows = [
                {**job.interaction.to_dict(), "seq": job.seq, "queued_at": job.queued_at}
                for job in jobs
                if job.kind == "update"
            ]
            if rows:
                write_jsonl_atomic(self.user_folder(user) / PENDING_FILE, rows)
                persisted += len(rows)
                logger.info("kept %d queued update(s) of %s for the next start", len(rows), user)
        return persisted

    def _submit(self, job: Job) -> Job:
        """Queue ``job`` (a caller's request); with ``wait_for_updates`` wait until it is done."""
        self._enqueue(job, check_limits=True)
        if self.wait_for_updates:
            job.done.wait()
        return job

    def _enqueue(self, job: Job, *, check_limits: bool) -> None:
        """``check_limits``: a caller's request (bounded, refused while stopping), not the engine's own."""
        with self._work_ready:
            if self._stopping and check_limits:
                raise LiveChatError("the server is shutting down; try again when it is back")
            record = self._record(job.user)
            if check_limits and record.queued >= self.limits.max_queued_updates:
                raise LiveChatError(
                    f"{record.queued} of your updates are still queued (the limit is "
                    f"{self.limits.max_queued_updates}); wait until some have finished"
                )
            if job.kind == "update" and not job.seq:
                job.seq = record.next_seq
            record.next_seq = max(record.next_seq, job.seq + 1)
            record.jobs.append(job)
            if not record.running and job.user not in self._turns:
                self._turns.append(job.user)
            self._work_ready.notify_all()

    # ------------------------------------------------------------------ workers

    def _next_job(self) -> Job | None:
        """The next job in round-robin order over the users (None: stop this worker)."""
        with self._work_ready:
            while not self._turns and not self._abandon:
                if self._stopping and not any(r.queued for r in self._users.values()):
                    return None
                self._work_ready.wait()
            if self._abandon:
                return None
            user = self._turns.popleft()
            record = self._users[user]
            record.running = True
            return record.jobs.popleft()

    def _finish_job(self, job: Job) -> None:
        with self._work_ready:
            record = self._users[job.user]
            record.running = False
            if record.jobs:
                self._turns.append(job.user)  # behind every user already waiting
            self._work_ready.notify_all()
        job.done.set()

    def _work(self, trainer: _Trainer) -> None:
        handlers = {
            "update": self._run_update,
            "undo": self._run_undo,
            "reset": self._run_reset,
            "save": self._run_save,
            "retry": self._run_retry,
            "delete": self._run_delete,
        }
        while (job := self._next_job()) is not None:
            try:
                handlers[job.kind](trainer, job)
            except Exception as error:  # the worker must survive any one job; the job is reported, not lost
                logger.exception("live chat: %s for %s failed", job.kind, job.user)
                try:
                    self._record_failure(trainer, job, error)
                except Exception:  # not even the report could be written: the worker still goes on
                    logger.exception("live chat: recording the failed %s of %s failed too", job.kind, job.user)
            finally:
                self._finish_job(job)

    def _record_failure(self, trainer: _Trainer, job: Job, error: Exception) -> None:
        # The training model may hold a half-applied step: reload the user's state before the next job.
        trainer.active = None
        trainer.updater.optimizer.zero_grad(set_to_none=True)
        message = f"{type(error).__name__}: {error}"
        if job.interaction is None:
            self._notify(job.user, f"{job.kind} failed: {message}")
            return
        with self._lock:
            record = self._users[job.user]
            record.failed.append({**job.interaction.to_dict(), "error": message})
            record.notice = f"the update on “{job.interaction.follow_up[:60]}” failed: {message}"
        self._write_failed(job.user)

    def _activate(self, trainer: _Trainer, user: str) -> dict:
        """Make the worker's training model hold the user's current version; returns the user's HEAD."""
        with self._lock:
            head = self._record(user).head
        key = (user, head["current"]["name"])
        if trainer.active != key:
            _load_version(trainer.updater, self._version_path(user, head["current"]))
            trainer.active = key
        return head

    def _run_update(self, trainer: _Trainer, job: Job) -> None:
        user, interaction = job.user, job.interaction
        head = self._activate(trainer, user)
        updater = trainer.updater
        try:
            metrics = updater.train_step(
                interaction.context, interaction.response, interaction.follow_up, return_token_signals=True
            )
        except EmptyResponseError as error:
            self._notify(user, f"update skipped: {error}")
            return
        report = UpdateReport(
            step=metrics["step"],
            loss=metrics["loss"],
            signal_mean=metrics["signal_mean"],
            follow_up=interaction.follow_up,
            tokens=[updater.tokenizer.decode([t]) for t in updater.completion_ids(interaction.response)],
            signal=metrics["token_signals"][0],
            train_time_s=metrics["train_time_s"],
        )
        name = f"{VERSION_PREFIX}{head['next']:06d}"
        extra_state = {"last_update": asdict(report), "interaction": interaction.to_dict(), "seq": job.seq}
        path = _save_version(updater, self.user_folder(user), name, extra_state)
        entry = {
            "name": name,
            "step": updater.step,
            "fingerprint": file_fingerprint(path / ADAPTER_WEIGHTS_FILE),
            "last_update": asdict(report),
        }
        applied = {
            "seq": job.seq,
            "step": updater.step,
            "follow_up": interaction.follow_up,
            "queued_at": job.queued_at,
            "applied_at": time.time(),
        }
        with self._lock:
            rows = [*self._users[user].applied, applied]
        write_jsonl_atomic(self.user_folder(user) / UPDATES_FILE, rows)
        self._write_head(user, {"current": entry, "previous": head["current"], "next": head["next"] + 1})
        with self._lock:
            self._users[user].applied = rows
        trainer.active = (user, name)
        self._notify(user, f"update {report.step} finished ({report.train_time_s:.1f} s)")

    def _run_undo(self, trainer: _Trainer, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        if head["previous"] is None:
            self._notify(job.user, "nothing to undo")
            return
        self._write_head(job.user, {**head, "current": head["previous"], "previous": None})
        self._notify(job.user, f"undone: back to adapter step {head['previous']['step']}")

    def _run_reset(self, trainer: _Trainer, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        self.user_folder(job.user).mkdir(parents=True, exist_ok=True)
        self._write_head(job.user, {**head, "current": self._initial_entry(), "previous": head["current"]})
        self._notify(job.user, "reset to the initial adapter (undo brings the previous one back)")

    def _run_save(self, trainer: _Trainer, job: Job) -> None:
        with self._lock:
            head = self._record(job.user).head
        source = self._version_path(job.user, head["current"])
        target = self.user_folder(job.user) / "saved" / f"step_{head['current']['step']}"
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        self._notify(job.user, f"saved a copy of adapter step {head['current']['step']}")

    def _run_retry(self, trainer: _Trainer, job: Job) -> None:
        with self._lock:
            record = self._record(job.user)
            rows, record.failed = record.failed, []
        self._write_failed(job.user)
        for row in rows:
            self._enqueue(Job("update", job.user, Interaction.from_dict(row)), check_limits=False)
        self._notify(job.user, f"{len(rows)} failed update(s) queued again")

    def _run_delete(self, trainer: _Trainer, job: Job) -> None:
        folder = self.user_folder(job.user)
        with self._lock:
            record = self._users[job.user]
            if any(self._in_use[path] for path in (folder.iterdir() if folder.is_dir() else ())):
                raise LiveChatError("a reply is being generated with this adapter; delete again in a moment")
            # Version names keep counting, so no worker mistakes a new version for one it held before.
            self._users[job.user] = _UserRecord(
                head={"current": self._initial_entry(), "previous": None, "next": record.head["next"]},
                failed=[],
                applied=[],
                next_seq=record.next_seq,
                jobs=record.jobs,
                running=True,
                notice="all your stored data was deleted",
            )
        shutil.rmtree(folder, ignore_errors=True)


class _ConversationStream:
    """A page conversation's reply stream: appends the reply to the conversation when it is complete."""

    def __init__(self, engine: LiveChatEngine, conversation: Conversation, context: list[dict]):
        self.conversation, self.context = conversation, context
        self.stream = ReplyStream(engine, conversation.user, context)
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self.stream
        self.reply = self.stream.reply
        conversation = self.conversation
        conversation.messages.append({"role": "assistant", "content": self.reply.generation.text})
        conversation.awaiting_follow_up = (self.context, self.reply.generation)
        conversation.reply_steps.append(self.reply.step)


class _RememberedStream:
    """An API reply stream whose finished reply is remembered for its follow-up."""

    def __init__(self, engine, user, messages, context, stream: ReplyStream):
        self.engine, self.user, self.messages, self.context, self.stream = engine, user, messages, context, stream
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self.stream
        self.reply = self.stream.reply
        self.engine._remember_reply(self.user, self.messages, self.context, self.reply.generation)


@dataclass
class _Trainer:
    """One worker's training model and which (user, version) it holds."""

    updater: OnlineSDPOUpdater
    active: tuple[str, str] | None = None


def _is_version(name: str) -> bool:
    return name.startswith(VERSION_PREFIX) and name[len(VERSION_PREFIX) :].isdigit()


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [row for _, row, error in iter_jsonl(path) if error is None and isinstance(row, dict)]


def _conversation_key(messages: list[dict], reply_text: str) -> str:
    """Identifies (conversation so far, reply) whatever whitespace a client adds around the texts."""
    turns = [[m["role"], str(m["content"]).strip()] for m in messages] + [["assistant", reply_text.strip()]]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()


def _save_version(updater: OnlineSDPOUpdater, folder: Path, name: str, extra_state: dict) -> Path:
    """The training model's adapter and optimizer state as ``folder/name``, written atomically."""
    return updater.save_state(folder / name, extra_state)


def _load_version(updater: OnlineSDPOUpdater, path: Path) -> None:
    """Adapter weights, optimizer state and step of a version folder (RNG states untouched)."""
    updater.load_state(path, restore_rng=False)
