"""Load test of the live chat: N simulated users talk to it through its OpenAI-compatible API for M minutes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/live_chat_load.py --users 8 --minutes 2
    .venv/bin/python bench/live_chat_load.py --users 32 --minutes 10 --model Qwen/Qwen3-8B --device auto \
        --dtype bfloat16 --server_args "--use_vllm --lora_r 64 --lora_alpha 128"

Starts ``live_chat.py`` on 127.0.0.1 (only; a free port) with a fresh adapters folder and one account per
simulated user, then runs two phases against it: a baseline with one user for ``--baseline_minutes``, and N
concurrent users for ``--minutes``. Each user asks a prompt, reads the streamed reply, and answers with the
rule-based user's follow-up (``sdpo.personas.rule_based_user``, one style per user) as the next message of the
same conversation, which queues one SDPO update of that user's adapter; a conversation restarts every
``--turns`` replies. When time is up the bench waits for every queued update, then checks from the server's
per-user update log that every follow-up sent was applied exactly once, in the order sent, to its own user's
adapter only (each follow-up carries the user's tag; no tag of another user may appear), and that SIGTERM stops
the server with nothing left queued.

Prints per phase: users, replies, p50/p95 reply latency (request to last streamed token) and time to first
token, p50/p95 update lag (follow-up received to its update applied), replies/min and updates/min, and the
N-user figures as ratios of the one-user baseline. Exit code 1 when a check fails. Bounded: at most 64 users
and 30 minutes per phase; every request has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.utils.network import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_USERS = 64
MAX_MINUTES = 30.0
REQUEST_TIMEOUT_S = 600
STYLES = [
    "no_emojis",
    "short",
    "no_lists",
    "less_formatting",
    "no_punctuation",
    "committing",
    "less_filler_praise_sycophancy",
    "answer_directly_reduce_formatting",
]
PROMPTS = [
    "Explain what a hash table is.",
    "Give me three tips for writing clear emails.",
    "How do plants make food?",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "Why is the sky blue?",
]


@dataclass
class UserLog:
    """What one simulated user sent and measured."""

    name: str
    key: str
    style: str
    follow_ups: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def get_json(url: str, key: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def simulate_user(base_url: str, user: UserLog, index: int, deadline: float, turns: int) -> None:
    """Chat until ``deadline``: prompt, reply, follow-up (= next user message), reply, ..."""
    from openai import OpenAI

    from sdpo.personas.rule_based_user import write_feedback

    client = OpenAI(base_url=f"{base_url}/v1", api_key=user.key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    prompt_index = index
    while time.time() < deadline:
        prompt = PROMPTS[prompt_index % len(PROMPTS)]
        prompt_index += 1
        messages = [{"role": "user", "content": prompt}]
        for turn in range(turns):
            started = time.perf_counter()
            first, text = None, ""
            try:
                stream = client.chat.completions.create(model="sdpo-live", messages=messages, stream=True)
                for chunk in stream:
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece and first is None:
                        first = time.perf_counter() - started
                    text += piece or ""
            except Exception as error:  # noqa: BLE001  (recorded; counted as a failed check)
                user.errors.append(f"{type(error).__name__}: {error}")
                return
            user.latencies.append(time.perf_counter() - started)
            user.first_token.append(first if first is not None else user.latencies[-1])
            if turn == turns - 1 or time.time() >= deadline:  # a follow-up is made only when it will be sent
                break
            # The rule-based user's reaction, tagged so the server's logs show whose follow-up it was.
            follow_up = f"{write_feedback(user.style, prompt, text)} [{user.name}#{len(user.follow_ups) + 1}]"
            user.follow_ups.append(follow_up)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]


def run_phase(base_url: str, users: list[UserLog], minutes: float, turns: int) -> float:
    deadline = time.time() + minutes * 60
    started = time.perf_counter()
    threads = [
        threading.Thread(target=simulate_user, args=(base_url, u, i, deadline, turns), daemon=True)
        for i, u in enumerate(users)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S + minutes * 60)
    return time.perf_counter() - started


def check_user(base_url: str, user: UserLog, all_tags: set[str]) -> tuple[list[str], list[float]]:
    """(problems, update lags) of one user, from the server's own log of applied updates."""
    status = get_json(f"{base_url}/v1/live/status", user.key)
    applied = status["applied_updates"]
    problems = [f"{user.name}: {error}" for error in user.errors]
    if [row["follow_up"] for row in applied] != user.follow_ups:
        problems.append(
            f"{user.name}: {len(user.follow_ups)} follow-ups sent, applied {len(applied)} "
            "(not each exactly once in order)"
        )
    if [row["seq"] for row in applied] != list(range(1, len(applied) + 1)):
        problems.append(f"{user.name}: update numbers {[row['seq'] for row in applied]} are not 1..n")
    if status["status"]["step"] != len(user.follow_ups) or status["status"]["failed"]:
        problems.append(
            f"{user.name}: adapter step {status['status']['step']}, {len(status['status']['failed'])} failed"
        )
    own = f"[{user.name}#"
    leaked = [
        row["follow_up"]
        for row in applied
        if own not in row["follow_up"] or any(tag in row["follow_up"] for tag in all_tags - {own})
    ]
    if leaked:
        problems.append(f"{user.name}: another user's follow-up in this adapter's log: {leaked[:2]}")
    return problems, [row["applied_at"] - row["queued_at"] for row in applied]


def wait_until_applied(base_url: str, users: list[UserLog], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(get_json(f"{base_url}/v1/live/status", u.key)["status"]["queued"] == 0 for u in users):
            return
        time.sleep(0.5)


def summarize(label: str, users: list[UserLog], lags: list[float], seconds: float) -> dict:
    latencies = [x for u in users for x in u.latencies]
    first = [x for u in users for x in u.first_token]
    updates = sum(len(u.follow_ups) for u in users)
    return {
        "phase": label,
        "users": len(users),
        "replies": len(latencies),
        "updates": updates,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "first_token_p50_s": percentile(first, 50),
        "update_lag_p50_s": percentile(lags, 50),
        "update_lag_p95_s": percentile(lags, 95),
        "replies_per_min": len(latencies) / seconds * 60,
        "updates_per_min": updates / seconds * 60,
    }


def print_table(rows: list[dict]) -> None:
    columns = [
        ("phase", "{}"),
        ("users", "{}"),
        ("replies", "{}"),
        ("updates", "{}"),
        ("latency_p50_s", "{:.1f}"),
        ("latency_p95_s", "{:.1f}"),
        ("first_token_p50_s", "{:.2f}"),
        ("update_lag_p50_s", "{:.1f}"),
        ("update_lag_p95_s", "{:.1f}"),
        ("replies_per_min", "{:.1f}"),
        ("updates_per_min", "{:.1f}"),
    ]
    print("| " + " | ".join(name for name, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt.format(row[name]) for name, fmt in columns) + " |")


def start_server(args, folder: Path, accounts_file: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        str(REPO / "live_chat.py"),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--adapters_dir",
        str(folder / "adapters"),
        "--accounts_file",
        str(accounts_file),
        "--update_workers",
        str(args.update_workers),
        "--max_queued_updates",
        "64",
        *shlex.split(args.server_args),
    ]
    log = open(folder / "server.log", "w")  # noqa: SIM115  (the server's lifetime)
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(
                    f"error: the server exited ({server.returncode}); see {folder / 'server.log'}"
                ) from None
            time.sleep(0.5)
    server.kill()
    raise SystemExit("error: the server did not start in 10 minutes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8, help=f"concurrent simulated users (1-{MAX_USERS})")
    parser.add_argument("--minutes", type=float, default=2.0, help=f"length of the N-user phase (<= {MAX_MINUTES})")
    parser.add_argument("--baseline_minutes", type=float, default=None, help="one-user phase (default minutes / 4)")
    parser.add_argument("--turns", type=int, default=3, help="replies per conversation before a new one starts")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="reply length budget")
    parser.add_argument("--update_workers", type=int, default=1)
    parser.add_argument("--server_args", default="", help="more live_chat.py flags, one quoted string")
    parser.add_argument("--out", default=None, help="also write the figures and checks as JSON here")
    args = parser.parse_args(argv)
    baseline_minutes = args.minutes / 4 if args.baseline_minutes is None else args.baseline_minutes
    phases_ok = 0 < args.minutes <= MAX_MINUTES and 0 < baseline_minutes <= MAX_MINUTES
    if not 1 <= args.users <= MAX_USERS or not phases_ok:
        parser.error(f"--users must be 1-{MAX_USERS} and the phases 0-{MAX_MINUTES} minutes")
    if args.turns < 2:
        parser.error("--turns must be >= 2 (a follow-up needs a reply before it)")

    from sdpo.live_chat.accounts import Accounts

    folder = Path(tempfile.mkdtemp(prefix="live-chat-load-"))
    accounts = Accounts(folder / "accounts.json")
    users = []
    for index in range(args.users + 1):  # user 0 is the baseline's
        name = f"sim{index}"
        _, key = accounts.add(name, f"password-of-{name}")
        users.append(UserLog(name, key, STYLES[index % len(STYLES)]))
    accounts.save()
    port = free_port()
    print(
        f"[live_chat_load] {os.uname().nodename}: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {os.getloadavg()[0]:.2f}; server log {folder / 'server.log'}",
        flush=True,
    )
    server = start_server(args, folder, folder / "accounts.json", port)
    base_url = f"http://127.0.0.1:{port}"
    rows, problems = [], []
    try:
        all_tags = {f"[{u.name}#" for u in users}
        for label, group, minutes in (
            ("baseline", users[:1], baseline_minutes),
            (f"{args.users} users", users[1:], args.minutes),
        ):
            print(f"[live_chat_load] {label}: {len(group)} user(s) for {minutes:g} min", flush=True)
            seconds = run_phase(base_url, group, minutes, args.turns)
            wait_until_applied(base_url, group, timeout_s=600)
            lags = []
            for user in group:
                found, user_lags = check_user(base_url, user, all_tags)
                problems += found
                lags += user_lags
            rows.append(summarize(label, group, lags, seconds))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=600)
        except subprocess.TimeoutExpired:
            server.kill()
    log = (folder / "server.log").read_text()
    if server.returncode != 0 or "0 queued update(s) kept" not in log:
        problems.append(f"the server did not stop cleanly (exit {server.returncode}); see {folder / 'server.log'}")
    print_table(rows)
    base, loaded = rows[0], rows[-1]
    print(
        f"ratios {loaded['phase']} / baseline: latency p50 {loaded['latency_p50_s'] / base['latency_p50_s']:.2f}x, "
        f"update lag p50 {loaded['update_lag_p50_s'] / base['update_lag_p50_s']:.2f}x, "
        f"replies/min {loaded['replies_per_min'] / base['replies_per_min']:.2f}x"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    checks = "every update applied exactly once, in order, to its own user only; clean stop"
    print(f"checks: {'PASS' if not problems else 'FAIL'} ({checks})")
    for problem in problems:
        print(f"  - {problem}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "problems": problems}, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
