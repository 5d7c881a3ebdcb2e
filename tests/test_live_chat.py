"""Live chat without a browser: the engine (per-user adapters, fair per-user queues on a worker pool, undo,
restart, limits, shutdown), the signal panel (= the update's own A_t), the command line and
scripts/live_chat.sh, on a tiny config-built Llama."""

import json
import os
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict, load_peft_weights

import live_chat
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import TRAINING_STATE_FILE, OnlineSDPOUpdater
from sdpo.live_chat.sessions import (
    FAILED_FILE,
    INITIAL,
    PENDING_FILE,
    Conversation,
    Interaction,
    Limits,
    LiveChatEngine,
    LiveChatError,
    check_user_id,
)
from sdpo.live_chat.ui import chat_display, render_signal_html, render_status, signal_color_hex
from sdpo.models.generation import Generation
from tests.conftest import build_tiny_llama
from tests.test_vllm_policy import fake_policy_vllm  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Name a colour."
FOLLOW_UPS = ["Shorter please.", "No punctuation at all.", "Answer in French."]


def learner_config(**overrides) -> OnlineSDPOConfig:
    settings = dict(
        model_name_or_path="tiny-llama",
        device="cpu",
        torch_dtype="float32",
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        loss_mode="simple_signal",
        learning_rate=1e-2,
        max_new_tokens=8,
        do_sample=False,
        checkpoint_every_n_steps=0,
        max_checkpoints=0,
    )
    settings.update(overrides)
    return OnlineSDPOConfig(**settings)


@pytest.fixture()
def start_engine(chat_tokenizer, tmp_path):
    """start_engine(folder=tmp_path/'adapters', seed=0, **engine options) → a LiveChatEngine on a fresh tiny model."""
    engines = []

    def start(folder=None, seed=0, workers=1, config=None, **options):
        torch.manual_seed(seed)  # the LoRA init: a restart with another seed must still resume the stored one
        updaters = [
            OnlineSDPOUpdater(
                config or learner_config(), model=build_tiny_llama(chat_tokenizer), tokenizer=chat_tokenizer
            )
            for _ in range(workers)
        ]
        engine = LiveChatEngine(updaters, folder or tmp_path / "adapters", **options)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close(0)


def reference_learner(engine, chat_tokenizer) -> OnlineSDPOUpdater:
    """A separate learner starting from the engine's initial adapter, to replay updates by hand."""
    return OnlineSDPOUpdater(
        learner_config(),
        model=build_tiny_llama(chat_tokenizer),
        tokenizer=chat_tokenizer,
        resume_from=engine.root / INITIAL,
    )


def adapter_weights(path: Path) -> dict:
    return load_peft_weights(str(path), device="cpu")


def learner_weights(updater: OnlineSDPOUpdater) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(updater.model).items()}


def assert_same_weights(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), "adapters differ"


def chat(engine, conversation, text):
    engine.add_user_message(conversation, text)
    return engine.answer(conversation)


def interactions_for(engine, user="alice"):
    """(x, y, o) tuples whose y is a real reply of the engine's model."""
    reply = engine.reply(user, [{"role": "user", "content": PROMPT}])
    return [Interaction([{"role": "user", "content": PROMPT}], reply.generation, o) for o in FOLLOW_UPS]


def test_follow_up_trains_the_previous_reply_with_its_exact_ids(start_engine, chat_tokenizer):
    engine = start_engine()
    conversation = Conversation("alice")
    first = chat(engine, conversation, PROMPT)
    chat(engine, conversation, FOLLOW_UPS[0])
    engine.wait_until_idle()

    version = engine.adapter_path("alice")
    stored = torch.load(version / TRAINING_STATE_FILE, weights_only=False)["extra_state"]["interaction"]
    assert stored == {
        "context": [{"role": "user", "content": PROMPT}],
        "response": asdict(first.generation),
        "follow_up": FOLLOW_UPS[0],
    }
    status = engine.status("alice")
    assert status.step == 1 and status.last_update.follow_up == FOLLOW_UPS[0]
    assert status.last_update.tokens == [chat_tokenizer.decode([t]) for t in first.generation.token_ids]

    # The same update made by hand on (x, y, o) gives the identical adapter; the reference's async
    # mistake (the prompt before the reply used as o) gives another one.
    right, wrong = reference_learner(engine, chat_tokenizer), reference_learner(engine, chat_tokenizer)
    right_metrics = right.train_step([{"role": "user", "content": PROMPT}], first.generation, FOLLOW_UPS[0])
    wrong.train_step([{"role": "user", "content": PROMPT}], first.generation, PROMPT)
    assert_same_weights(adapter_weights(version), learner_weights(right))
    wrong_weights = learner_weights(wrong)
    assert any(not torch.equal(value, wrong_weights[key]) for key, value in adapter_weights(version).items())
    signal = right_metrics["signal_mean"]
    assert status.last_update.signal_mean == pytest.approx(signal)
    assert sum(status.last_update.signal) / len(status.last_update.signal) == pytest.approx(signal, abs=1e-5)


def test_replies_say_which_update_made_them(start_engine):
    engine = start_engine(wait_for_updates=True)
    conversation = Conversation("alice")
    for text in (PROMPT, FOLLOW_UPS[0], FOLLOW_UPS[1]):
        chat(engine, conversation, text)
    assert conversation.reply_steps == [0, 1, 2]
    replies = chat_display(conversation)[1::2]
    assert [reply["content"].rsplit("\n\n", 1)[1] for reply in replies] == [f"*adapter step {s}*" for s in (0, 1, 2)]
    assert "replies: 3, the last made with step 2" in render_status(engine.status("alice"), conversation)


def test_queued_updates_keep_their_order(start_engine, chat_tokenizer):
    engine = start_engine()
    interactions = interactions_for(engine)
    for interaction in interactions:
        engine.submit_update("alice", interaction)
    engine.wait_until_idle()

    by_hand = reference_learner(engine, chat_tokenizer)
    for interaction in interactions:
        by_hand.train_step(interaction.context, interaction.response, interaction.follow_up)
    status = engine.status("alice")
    assert status.step == 3 and status.last_update.follow_up == FOLLOW_UPS[-1] and status.queued == 0
    assert_same_weights(adapter_weights(engine.adapter_path("alice")), learner_weights(by_hand))


def test_undo_restores_the_adapter_bit_for_bit(start_engine):
    engine = start_engine()
    first, second, _ = interactions_for(engine)
    engine.submit_update("alice", first)
    engine.wait_until_idle()
    after_first = adapter_weights(engine.adapter_path("alice"))
    engine.submit_update("alice", second)
    engine.wait_until_idle()
    after_second = adapter_weights(engine.adapter_path("alice"))

    engine.undo("alice")
    engine.wait_until_idle()
    status = engine.status("alice")
    assert status.step == 1 and not status.can_undo and status.last_update.follow_up == first.follow_up
    assert_same_weights(adapter_weights(engine.adapter_path("alice")), after_first)
    assert engine.reply("alice", first.context).step == 1
    # Optimizer state came back too: redoing the second update reproduces it exactly.
    engine.submit_update("alice", second)
    engine.wait_until_idle()
    assert_same_weights(adapter_weights(engine.adapter_path("alice")), after_second)
    versions = [p for p in engine.user_folder("alice").iterdir() if p.name.startswith("v")]
    assert len(versions) == 2  # current + previous only

    engine.undo("alice")
    engine.undo("alice")
    engine.wait_until_idle()
    assert engine.status("alice").notice == "nothing to undo" and engine.status("alice").step == 1


def test_reset_save_and_undo_of_reset(start_engine):
    engine = start_engine()
    first, _, _ = interactions_for(engine)
    engine.submit_update("alice", first)
    engine.save("alice")
    engine.reset("alice")
    engine.wait_until_idle()
    assert engine.status("alice").step == 0 and engine.adapter_path("alice") == engine.root / INITIAL
    assert engine.status("alice").fingerprint == engine.initial_fingerprint
    saved = engine.user_folder("alice") / "saved" / "step_1"
    assert (saved / TRAINING_STATE_FILE).is_file()
    engine.undo("alice")
    engine.wait_until_idle()
    assert engine.status("alice").step == 1
    assert_same_weights(adapter_weights(engine.adapter_path("alice")), adapter_weights(saved))


def test_users_are_isolated(start_engine):
    engine = start_engine()
    prompt = [{"role": "user", "content": PROMPT}]
    before = engine.reply("alice", prompt).generation
    for interaction in interactions_for(engine, "alice")[:2]:
        engine.submit_update("alice", interaction)
    engine.wait_until_idle()
    alice, bob = engine.status("alice"), engine.status("bob")
    assert alice.step == 2 and bob.step == 0 and bob.last_update is None
    assert bob.fingerprint == engine.initial_fingerprint != alice.fingerprint
    assert engine.adapter_path("bob") == engine.root / INITIAL
    # Bob's greedy reply comes from the untouched initial adapter, after the reply model held Alice's.
    engine.reply("alice", prompt)
    assert engine.reply("bob", prompt).generation == before
    engine.submit_update("bob", interactions_for(engine, "bob")[2])
    engine.wait_until_idle()
    assert engine.status("alice").step == 2 and engine.status("bob").step == 1
    assert engine.users() == ["alice", "bob"]


def test_restart_resumes_every_adapter_step_and_optimizer(start_engine, chat_tokenizer, tmp_path):
    engine = start_engine()
    interactions = interactions_for(engine)
    for interaction in interactions[:2]:
        engine.submit_update("alice", interaction)
    engine.submit_update("bob", interactions[0])
    engine.wait_until_idle()
    fingerprints = {user: engine.status(user).fingerprint for user in ("alice", "bob")}
    engine.close()

    restarted = start_engine(seed=123)
    assert restarted.initial_fingerprint == engine.initial_fingerprint
    assert {user: restarted.status(user).fingerprint for user in ("alice", "bob")} == fingerprints
    assert restarted.status("alice").step == 2 and restarted.status("alice").can_undo
    assert restarted.status("alice").last_update.follow_up == FOLLOW_UPS[1]
    restarted.submit_update("alice", interactions[2])
    restarted.wait_until_idle()

    uninterrupted = reference_learner(restarted, chat_tokenizer)
    for interaction in interactions:
        uninterrupted.train_step(interaction.context, interaction.response, interaction.follow_up)
    assert restarted.status("alice").step == 3
    assert_same_weights(adapter_weights(restarted.adapter_path("alice")), learner_weights(uninterrupted))


def test_a_failed_update_is_shown_kept_and_can_be_retried(start_engine):
    engine = start_engine()
    good = interactions_for(engine)[0]
    long_reply = Generation(good.response.token_ids * 10, good.response.text * 10, finished=False)
    too_long = Interaction(good.context, long_reply, "Stop.")
    engine.submit_update("alice", too_long)
    engine.submit_update("alice", good)
    engine.wait_until_idle()
    status = engine.status("alice")
    assert status.step == 1 and len(status.failed) == 1
    assert "max_new_tokens" in status.failed[0]["error"] and "⚠ 1 failed update" in render_status(status, None)
    rows = [json.loads(line) for line in (engine.user_folder("alice") / FAILED_FILE).read_text().splitlines()]
    assert Interaction.from_dict(rows[0]) == too_long

    engine.retry_failed("alice")
    engine.wait_until_idle()
    assert len(engine.status("alice").failed) == 1 and engine.status("alice").step == 1  # still too long, still kept
    engine.close()
    assert len(start_engine().status("alice").failed) == 1


def test_user_ids_are_folder_names_apart_from_the_stores_own_files(start_engine):
    assert check_user_id("u3f2a-b_1") == "u3f2a-b_1"
    for bad in ("", "../etc", ".hidden", "_initial", "a/b", "live_chat.json", "x" * 65, None):
        with pytest.raises(LiveChatError, match="not usable"):
            check_user_id(bad)
    engine = start_engine()
    assert engine.user_folder("live_chat") == engine.root / "users" / "live_chat" != engine.root / "live_chat.json"


def test_empty_message_and_answer_without_question_are_refused(start_engine):
    engine = start_engine()
    conversation = Conversation("alice")
    with pytest.raises(LiveChatError, match="empty"):
        engine.add_user_message(conversation, "   ")
    with pytest.raises(LiveChatError, match="no user message"):
        engine.answer(conversation)


def test_history_is_capped_and_starts_with_a_user_turn(start_engine):
    engine = start_engine(max_history_messages=3)
    conversation = Conversation(
        "alice",
        messages=[
            {"role": "user", "content": "1"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "3"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "5"},
        ],
    )
    assert [m["content"] for m in engine.conversation_context(conversation)] == ["3", "4", "5"]
    engine.max_history_messages = 2
    assert [m["content"] for m in engine.conversation_context(conversation)] == ["5"]


def test_vllm_replies_hot_swap_to_each_users_newest_adapter(fake_policy_vllm, chat_tokenizer, tmp_path):  # noqa: F811
    updater = OnlineSDPOUpdater(learner_config(), model=build_tiny_llama(chat_tokenizer), tokenizer=chat_tokenizer)
    engine = LiveChatEngine(updater, tmp_path / "adapters", use_vllm=True)
    try:
        llm = fake_policy_vllm.instances[-1]
        assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 4
        conversation = Conversation("alice")
        first = chat(engine, conversation, PROMPT)
        assert first.generation.token_ids[:2] == [42, 43] and llm.calls[-1][2][0][2] == str(engine.root / INITIAL)
        engine.add_user_message(conversation, FOLLOW_UPS[0])
        engine.wait_until_idle()
        engine.answer(conversation)
        assert llm.calls[-1][2][0][2] == str(engine.adapter_path("alice")) != str(engine.root / INITIAL)
        assert conversation.reply_steps == [0, 1]
        # One engine, one LoRA id per adapter folder: bob's initial adapter keeps the id it got first.
        engine.answer(Conversation("bob", messages=[{"role": "user", "content": PROMPT}]))
        assert llm.calls[-1][2][0][1] == llm.calls[0][2][0][1] != llm.calls[1][2][0][1]
        assert llm.kwargs["max_loras"] == llm.kwargs["max_cpu_loras"] == 8
    finally:
        engine.close()


def test_signal_colours_follow_the_signal_analysis_colour_map():
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    rdbu = colormaps["RdBu"]
    assert signal_color_hex(-5, -5, 5) == signal_color_hex(-50, -5, 5) == to_hex(rdbu(0.0))
    assert signal_color_hex(0, -15, 3) == to_hex(rdbu(0.5))
    assert signal_color_hex(3, -15, 3) == to_hex(rdbu(1.0))
    assert signal_color_hex(-1, -5, 5) != signal_color_hex(1, -5, 5)


def test_signal_panel_shows_each_token_escaped_with_its_value(start_engine):
    from sdpo.live_chat.sessions import UpdateReport

    report = UpdateReport(
        step=4,
        loss=0.5,
        signal_mean=-1.0,
        follow_up="too <b>bold</b>",
        tokens=["<script>", " ok", "\n"],
        signal=[-2.0, 0.0, 1.5],
        train_time_s=0.1,
    )
    page = render_signal_html(report, -5, 5)
    assert "&lt;script&gt;" in page and "<script>" not in page and "&lt;b&gt;bold" in page
    assert page.count("<span ") == 3 and 'title="-2.000"' in page and 'title="+1.500"' in page
    assert f"background:{signal_color_hex(-2.0, -5, 5)}" in page and "<td id='metric-step'>4</td>" in page
    assert "no update yet" in render_signal_html(None, -5, 5)


def test_adapters_of_another_shape_are_refused_before_the_model_loads(tmp_path, capsys):
    folder = tmp_path / "adapters"
    folder.mkdir()
    modules = sorted(learner_config().lora_target_modules)
    shape = {"model": "not-a-model", "lora_r": 16, "lora_alpha": 32, "lora_target_modules": modules}
    (folder / "live_chat.json").write_text(json.dumps(shape))
    assert live_chat.main(["--model", "not-a-model", "--lora_r", "8", "--adapters_dir", str(folder)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "live_chat.json" in error and "lora_r 16 (running 8)" in error
    assert live_chat.main(["--signal_vmin", "1"]) == 2
    assert "--signal_vmin" in capsys.readouterr().err
    for exposed in (["--share"], ["--host", "0.0.0.0"]):
        assert live_chat.main(exposed) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "--accounts_file" in error
    assert live_chat.main(["--accounts_file", str(tmp_path / "none.json")]) == 1
    assert "users add" in capsys.readouterr().err
    assert live_chat.main(["--update_workers", "0"]) == 2
    assert "--update_workers must be >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert live_chat.main(["--adapters_dir", str(tmp_path / "file" / "a")]) == 1
    assert "is a file" in capsys.readouterr().err


def dry_run(*args, env=None):
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MODEL", "PRESET", "HOST", "PORT", "ADAPTERS_DIR", "ACCOUNTS_FILE"}
    }
    environment.update(TMPDIR="/tmp/sdpo-test", PYTHON="python", **(env or {}))
    script = str(REPO / "scripts" / "live_chat.sh")
    result = subprocess.run([script, *args], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    command = [line for line in lines if line.startswith("[dry-run] ") and "BASE_WORK=" not in line]
    assert len(command) == 1, result.stdout
    return shlex.split(command[0][len("[dry-run] ") :])


def test_script_defaults_to_the_embedded_model_on_cpu_bound_to_localhost(tmp_path):
    argv = dry_run("--dry-run")
    assert argv[:2] == ["python", "live_chat.py"]
    value = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    assert value["--model"] == "smollm2-135m-instruct" and value["--device"] == "cpu" and value["--host"] == "127.0.0.1"
    assert value["--max_new_tokens"] == "96" and value["--port"] == "7860" and "--use_vllm" not in argv
    assert value["--dtype"] == "float32" and "--accounts_file" not in argv
    argv = dry_run("--dry-run", env={"ACCOUNTS_FILE": "accounts.json", "HOST": "0.0.0.0"})
    assert argv[argv.index("--accounts_file") + 1] == "accounts.json" and argv[argv.index("--host") + 1] == "0.0.0.0"
    argv = dry_run("--port", "8000", "--dry-run", env={"PRESET": "gpu", "ADAPTERS_DIR": str(tmp_path / "a")})
    assert {"--use_vllm", "--use_lora"} <= set(argv) and argv[argv.index("--model") + 1] == "Qwen/Qwen3-8B"
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--device") + 1] == "auto"
    assert argv[argv.index("--adapters_dir") + 1] == str(tmp_path / "a") and argv[-2:] == ["--port", "8000"]
    assert not (tmp_path / "a").exists(), "dry-run must create nothing"


@pytest.mark.slow
def test_command_line_serves_the_page_and_stops_cleanly_on_sigterm(tiny_model_path, tmp_path):
    import signal
    import socket
    import sys
    import time
    import urllib.request

    pytest.importorskip("gradio")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        str(REPO / "live_chat.py"),
        "--model",
        tiny_model_path,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--max_new_tokens",
        "8",
        "--port",
        str(port),
        "--adapters_dir",
        str(tmp_path / "adapters"),
    ]
    server = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page = None
        for _ in range(240):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        assert page is not None and "SDPO live chat" in page
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, output
    assert "finishing 0 queued update(s)" in output
    assert json.loads((tmp_path / "adapters" / "live_chat.json").read_text())["lora_r"] == 4


# ------------------------------------------------------------------ one signal, a pool of workers, limits, shutdown


def test_signal_panel_is_the_updates_own_signal_at_the_sampling_temperature(start_engine, chat_tokenizer):
    config = learner_config(do_sample=True, temperature=0.7)
    engine = start_engine(config=config)
    conversation = Conversation("alice")
    first = chat(engine, conversation, PROMPT)
    chat(engine, conversation, FOLLOW_UPS[0])
    engine.wait_until_idle()
    panel = engine.status("alice").last_update

    by_hand = OnlineSDPOUpdater(
        learner_config(do_sample=True, temperature=0.7),
        model=build_tiny_llama(chat_tokenizer),
        tokenizer=chat_tokenizer,
        resume_from=engine.root / INITIAL,
    )
    metrics = by_hand.train_step(conversation.messages[:1], first.generation, FOLLOW_UPS[0], return_token_signals=True)
    assert by_hand.scoring_temperature == 0.7
    assert panel.signal == metrics["token_signals"][0] and len(panel.signal) == len(first.generation.token_ids)
    assert sum(panel.signal) / len(panel.signal) == pytest.approx(metrics["signal_mean"], abs=1e-5)
    page = render_signal_html(panel, -5, 5)
    assert all(f'title="{value:+.3f}"' in page for value in panel.signal)

    # Scored at T=1 (what the page used to show) the numbers differ: the panel really is the update's.
    at_one = OnlineSDPOUpdater(
        learner_config(),
        model=build_tiny_llama(chat_tokenizer),
        tokenizer=chat_tokenizer,
        resume_from=engine.root / INITIAL,
    )
    other = at_one.train_step(conversation.messages[:1], first.generation, FOLLOW_UPS[0], return_token_signals=True)
    assert other["token_signals"][0] != panel.signal


def gated_train_step(monkeypatch, gate, calls, fail_on=None):
    """Make every train_step record its follow-up, wait for ``gate``, and raise for the follow-up ``fail_on``."""
    original = OnlineSDPOUpdater.train_step

    def train_step(self, messages, response, follow_up, **kwargs):
        calls.append(follow_up)
        assert gate.wait(60)
        if follow_up == fail_on:
            raise RuntimeError("injected failure")
        return original(self, messages, response, follow_up, **kwargs)

    monkeypatch.setattr(OnlineSDPOUpdater, "train_step", train_step)


def test_an_exception_in_one_users_update_leaves_everyone_elses_flowing(start_engine, monkeypatch):
    import threading

    engine = start_engine(workers=2)
    interactions = interactions_for(engine)
    gate, calls = threading.Event(), []
    gated_train_step(monkeypatch, gate, calls, fail_on="boom")
    # Recording the failure fails too (the incident of issue 20): the worker must still survive.
    monkeypatch.setattr(engine, "_write_failed", lambda user: (_ for _ in ()).throw(OSError("disk full")))
    engine.submit_update("alice", Interaction(interactions[0].context, interactions[0].response, "boom"))
    for interaction in interactions[:2]:
        engine.submit_update("bob", interaction)
    engine.submit_update("alice", interactions[2])
    gate.set()
    assert engine.wait_until_idle(timeout=120)
    alice, bob = engine.status("alice"), engine.status("bob")
    assert bob.step == 2 and not bob.failed and bob.notice.startswith("update 2 finished")
    assert alice.step == 1 and [row["follow_up"] for row in alice.failed] == ["boom"]
    assert "injected failure" in alice.failed[0]["error"] and alice.notice.startswith("update 1 finished")
    assert sorted(calls) == sorted(["boom", *FOLLOW_UPS[:2], FOLLOW_UPS[2]])
    assert [row["seq"] for row in engine.applied_updates("bob")] == [1, 2]
    assert [row["follow_up"] for row in engine.applied_updates("alice")] == [FOLLOW_UPS[2]]


def test_users_take_turns_and_each_users_updates_keep_their_order(start_engine, monkeypatch):
    import threading

    engine = start_engine()
    alice_updates = interactions_for(engine)
    gate, calls = threading.Event(), []
    gated_train_step(monkeypatch, gate, calls)
    for interaction in alice_updates:
        engine.submit_update("alice", interaction)
    bob = Interaction(alice_updates[0].context, alice_updates[0].response, "bob's only follow-up")
    engine.submit_update("bob", bob)
    gate.set()
    assert engine.wait_until_idle(timeout=120)
    # Bob waits for alice's running update only, not for her whole queue.
    assert calls == [FOLLOW_UPS[0], bob.follow_up, FOLLOW_UPS[1], FOLLOW_UPS[2]]
    assert [row["seq"] for row in engine.applied_updates("alice")] == [1, 2, 3]


def test_messages_and_queues_are_bounded(start_engine, monkeypatch):
    import threading
    import time

    engine = start_engine(limits=Limits(max_message_tokens=20, max_queued_updates=2))
    conversation = Conversation("alice")
    long_text = "word " * 30
    with pytest.raises(LiveChatError, match=r"has \d+ tokens; the limit is 20"):
        engine.add_user_message(conversation, long_text)
    started = time.perf_counter()
    with pytest.raises(LiveChatError, match="characters, far more than the limit of 20 tokens"):
        engine.add_user_message(conversation, "x" * 40_000)
    assert time.perf_counter() - started < 0.5 and conversation.messages == []
    interactions = interactions_for(engine)
    gate = threading.Event()
    gated_train_step(monkeypatch, gate, [])
    engine.submit_update("alice", interactions[0])
    engine.submit_update("alice", interactions[1])
    with pytest.raises(LiveChatError, match="2 of your updates are still queued"):
        engine.submit_update("alice", interactions[2])
    engine.submit_update("bob", interactions[2])  # the limit is per user
    gate.set()
    assert engine.wait_until_idle(timeout=120)


def test_shutdown_keeps_every_queued_update_and_the_next_start_applies_each_once(start_engine, monkeypatch):
    import threading

    engine = start_engine()
    interactions = interactions_for(engine)
    gate, calls = threading.Event(), []
    gated_train_step(monkeypatch, gate, calls)
    for interaction in interactions:
        engine.submit_update("alice", interaction)
    while not calls:  # the first update is running (held at the gate)
        threading.Event().wait(0.01)
    closing = threading.Thread(target=lambda: calls.append(("kept", engine.close(drain_timeout_s=0))))
    closing.start()
    while not engine._abandon:
        closing.join(0.01)
    gate.set()  # the running update finishes; the two waiting ones are kept
    closing.join(60)
    assert calls == [FOLLOW_UPS[0], ("kept", 2)]
    pending = engine.user_folder("alice") / PENDING_FILE
    assert [json.loads(line)["seq"] for line in pending.read_text().splitlines()] == [2, 3]
    with pytest.raises(LiveChatError, match="shutting down"):
        engine.submit_update("alice", interactions[0])

    restarted = start_engine()
    assert restarted.wait_until_idle(timeout=120) and not pending.exists()
    assert [(r["seq"], r["follow_up"]) for r in restarted.applied_updates("alice")] == list(zip([1, 2, 3], FOLLOW_UPS))
    assert restarted.status("alice").step == 3


def test_api_conversation_queues_the_follow_up_of_its_own_reply_once(start_engine):
    engine = start_engine()
    question = [{"role": "user", "content": PROMPT}]
    stream = engine.api_turn("alice", question)
    text = "".join(stream)
    assert text == stream.reply.generation.text
    follow_up = [*question, {"role": "assistant", "content": f"  {text} "}, {"role": "user", "content": "Shorter."}]
    for _ in range(2):  # a client retrying the same request must not train twice
        "".join(engine.api_turn("alice", follow_up))
    # Another user sending alice's conversation gets no update on alice's reply.
    "".join(engine.api_turn("bob", follow_up))
    assert engine.wait_until_idle(timeout=120)
    assert engine.status("alice").step == 1 and engine.status("bob").step == 0
    assert [row["follow_up"] for row in engine.applied_updates("alice")] == ["Shorter."]


def test_concurrent_replies_share_one_batch_each_with_its_own_adapter(start_engine, monkeypatch):
    import threading

    from sdpo.live_chat import sessions

    engine = start_engine(max_resident_adapters=2)
    engine.submit_update("alice", interactions_for(engine)[0])
    engine.submit_update("carol", interactions_for(engine)[1])
    assert engine.wait_until_idle(timeout=120)
    asks = [("alice", PROMPT), ("bob", PROMPT), ("alice", "Name a fruit."), ("carol", PROMPT)]
    alone = [engine.reply(user, [{"role": "user", "content": text}]).generation for user, text in asks]

    gate, batches = threading.Event(), []
    original = sessions.generate

    def held_generate(model, tokenizer, contexts, sampling, **options):
        batches.append(len(contexts))
        assert gate.wait(60)
        return original(model, tokenizer, contexts, sampling, **options)

    monkeypatch.setattr(sessions, "generate", held_generate)
    results = {}

    def ask(i):
        user, text = asks[i]
        results[i] = engine.reply(user, [{"role": "user", "content": text}])

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    while not batches:  # the first request is being generated alone; the others queue behind it
        threading.Event().wait(0.01)
    others = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
    for thread in others:
        thread.start()
    while len(engine._replies._pending) < 3:
        threading.Event().wait(0.01)
    gate.set()
    for thread in (first, *others):
        thread.join(120)
    # Bob's and alice's waiting requests form one batch; carol's adapter would be a third one: the next batch.
    assert batches == [1, 2, 1]
    assert [results[i].generation for i in range(4)] == alone
    assert [results[i].step for i in range(4)] == [1, 0, 1, 1]
    assert len(engine._replies._resident) == 2


def test_streamed_pieces_add_up_to_the_reply(start_engine):
    engine = start_engine()
    conversation = Conversation("alice")
    engine.add_user_message(conversation, PROMPT)
    stream = engine.stream_answer(conversation)
    pieces = list(stream)
    assert "".join(pieces) == stream.reply.generation.text == conversation.messages[-1]["content"]
    assert len(pieces) > 1 and conversation.awaiting_follow_up[1] == stream.reply.generation
