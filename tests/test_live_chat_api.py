"""Live chat accounts and the OpenAI-compatible API, served for real on 127.0.0.1 (Gradio + FastAPI) and called
with the openai SDK: a streamed reply for a bearer token, a wrong token refused, follow-ups training the
caller's own adapter only, admin export/delete, and the ``users`` command (no secret stored or printed twice)."""

import io
import json
import stat
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

pytest.importorskip("gradio")
openai = pytest.importorskip("openai")

import live_chat
from sdpo.live_chat.accounts import Accounts, AccountsError
from sdpo.live_chat.api import Identities
from sdpo.live_chat.ui import build_app, launch_app
from sdpo.utils.network import free_port
from tests.test_live_chat import PROMPT, start_engine  # noqa: F401  (fixture)

PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "ops": "ops-password"}


def add_user(accounts_file, name, *, admin=False, monkeypatch, capsys) -> str:
    """``python live_chat.py users add`` with the password on stdin; returns the printed API key."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORDS[name] + "\n"))
    argv = ["users", "--accounts_file", str(accounts_file), "add", name, "--password-stdin"]
    assert live_chat.main(argv + (["--admin"] if admin else [])) == 0
    output = capsys.readouterr().out
    assert PASSWORDS[name] not in output
    return output.strip().rsplit(" ", 1)[-1]


@pytest.fixture()
def server(start_engine, tmp_path, monkeypatch, capsys):  # noqa: F811
    """(base URL, engine, accounts, {name: API key}) of a served live chat with accounts alice, bob and ops."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    accounts_file = tmp_path / "accounts.json"
    keys = {
        name: add_user(accounts_file, name, admin=name == "ops", monkeypatch=monkeypatch, capsys=capsys)
        for name in PASSWORDS
    }
    accounts = Accounts.load(accounts_file)
    engine = start_engine()
    identities = Identities(accounts)
    app = build_app(engine, identities)
    url = launch_app(app, engine, identities, host="127.0.0.1", port=free_port(), block=False)
    yield url.rstrip("/"), engine, accounts, keys
    app.close()


def client(url, key):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def get(url, key=None, method="GET"):
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.read()


def test_accounts_file_keeps_only_salted_hashes(tmp_path, monkeypatch, capsys):
    accounts_file = tmp_path / "accounts.json"
    alice_key = add_user(accounts_file, "alice", monkeypatch=monkeypatch, capsys=capsys)
    bob_key = add_user(accounts_file, "bob", monkeypatch=monkeypatch, capsys=capsys)
    text = accounts_file.read_text()
    assert alice_key.startswith("sdpo-") and alice_key not in text and PASSWORDS["alice"] not in text
    assert stat.S_IMODE(accounts_file.stat().st_mode) == 0o600
    accounts = Accounts.load(accounts_file)
    alice, bob = accounts.find("alice"), accounts.find("bob")
    assert alice.password_salt != bob.password_salt and alice.id != bob.id and alice.id.startswith("u")
    assert accounts.verify_password("alice", PASSWORDS["alice"]) == alice
    assert accounts.verify_password("alice", PASSWORDS["bob"]) is None
    assert accounts.verify_password("carol", "x") is None
    assert accounts.by_api_key(alice_key) == alice and accounts.by_api_key(bob_key) == bob
    assert accounts.by_api_key(alice_key + "x") is None and accounts.by_api_key("") is None

    assert live_chat.main(["users", "--accounts_file", str(accounts_file), "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and alice.id in listed and alice.password_hash not in listed
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert live_chat.main(["users", "--accounts_file", str(accounts_file), "add", "carol", "--password-stdin"]) == 1
    assert "too short" in capsys.readouterr().err
    accounts_file.write_text("[1, 2]")
    with pytest.raises(AccountsError, match="not an accounts file"):
        Accounts.load(accounts_file)


def test_streamed_reply_for_a_bearer_token_and_a_wrong_token_refused(server):
    url, engine, accounts, keys = server
    messages = [{"role": "user", "content": PROMPT}]
    stream = client(url, keys["alice"]).chat.completions.create(model="sdpo-live", messages=messages, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text.strip()

    for wrong in (keys["alice"] + "x", "sdpo-not-a-key"):
        with pytest.raises(openai.AuthenticationError):
            client(url, wrong).chat.completions.create(model="sdpo-live", messages=messages, stream=True)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{url}/v1/live/status")
    assert refused.value.code == 401

    # The next user message of the same conversation is the follow-up: alice's adapter learns, bob's does not.
    follow_up = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "Shorter please."}]
    reply = client(url, keys["alice"]).chat.completions.create(model="sdpo-live", messages=follow_up)
    assert reply.choices[0].message.content
    client(url, keys["bob"]).chat.completions.create(model="sdpo-live", messages=follow_up)  # not bob's reply
    assert engine.wait_until_idle(timeout=120)
    alice_id, bob_id = accounts.find("alice").id, accounts.find("bob").id
    status = json.loads(get(f"{url}/v1/live/status", keys["alice"])[1])
    assert status["status"]["user"] == alice_id and status["status"]["step"] == 1
    assert [row["follow_up"] for row in status["applied_updates"]] == ["Shorter please."]
    bob_status = json.loads(get(f"{url}/v1/live/status", keys["bob"])[1])
    assert bob_status["status"]["step"] == 0 and bob_status["applied_updates"] == []
    assert engine.user_folder(alice_id).is_dir() and not engine.user_folder(bob_id).exists()

    with pytest.raises(openai.BadRequestError, match="the limit is 512"):
        client(url, keys["bob"]).chat.completions.create(
            model="sdpo-live", messages=[{"role": "user", "content": "word " * 600}]
        )


@pytest.mark.slow
def test_admin_exports_and_deletes_a_users_data(server):
    url, engine, accounts, keys = server
    alice = accounts.find("alice")
    messages = [{"role": "user", "content": PROMPT}]
    text = client(url, keys["alice"]).chat.completions.create(model="m", messages=messages).choices[0].message.content
    follow_up = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "More detail."}]
    client(url, keys["alice"]).chat.completions.create(model="m", messages=follow_up)
    assert engine.wait_until_idle(timeout=120)

    export = f"{url}/v1/live/admin/users/alice/export"
    for not_admin in ("alice", "bob"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(export, keys[not_admin])
        assert refused.value.code == 403
    status, body = get(export, keys["ops"])
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert status == 200 and "HEAD.json" in names and "updates.jsonl" in names
    status, body = get(f"{url}/v1/live/admin/users/alice/data", keys["ops"], method="DELETE")
    assert status == 200 and json.loads(body)["deleted"] == "alice"
    assert not engine.user_folder(alice.id).exists() and engine.status(alice.id).step == 0
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"{url}/v1/live/admin/users/carol/export", keys["ops"])
    assert missing.value.code == 404


def test_service_settings_come_from_the_chat_settings_dataclass_and_yaml(tmp_path, monkeypatch, capsys):
    accounts_file = tmp_path / "accounts.json"
    add_user(accounts_file, "alice", monkeypatch=monkeypatch, capsys=capsys)
    config_file = tmp_path / "live_chat.yaml"
    config_file.write_text(
        f"accounts_file: {accounts_file}\nhost: 0.0.0.0\nupdate_workers: 2\nmax_message_tokens: 64\n"
        f"reply_batch_size: 4\nadapters_dir: {tmp_path / 'adapters'}\n"
    )
    config, settings, use_vllm, accounts = live_chat.resolve(["--config", str(config_file)])
    assert (settings.host, settings.update_workers, settings.max_message_tokens, settings.reply_batch_size) == (
        "0.0.0.0",
        2,
        64,
        4,
    )
    assert [a.name for a in accounts.accounts] == ["alice"] and not use_vllm and config.use_lora
    with pytest.raises(SystemExit):
        live_chat.main(["--help"])
    usage = capsys.readouterr().out
    for flag in ("--accounts_file", "--max_message_tokens", "--update_workers", "--shutdown_timeout_s"):
        assert flag in usage
