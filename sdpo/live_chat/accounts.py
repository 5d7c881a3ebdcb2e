"""Live-chat accounts: who may log in to the page and call the API, and under which id their data is kept.

The accounts file (JSON, written atomically, mode 0600) holds per account a name (the login), a random id
(the folder of the user's adapters: ``users/<id>/`` under the adapters folder, so no login can collide
with the store's own files), an scrypt hash of the password with its own salt, a SHA-256 hash of the API
key, and an admin flag. Secrets are never stored or printed: the password is read from the terminal (or
stdin), and the API key is shown once, when it is created.

    python live_chat.py users add alice --accounts_file accounts.json            # asks for a password
    python live_chat.py users add ops --admin --password-stdin --accounts_file accounts.json < pw.txt
    python live_chat.py users list --accounts_file accounts.json
    python live_chat.py users new-key alice --accounts_file accounts.json         # replaces alice's API key
    python live_chat.py users remove alice --accounts_file accounts.json
    python live_chat.py users export alice --accounts_file accounts.json --adapters_dir runs/live_chat --out a.zip
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sdpo.utils.file_io import write_json_atomic

ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
API_KEY_PREFIX = "sdpo-"
MIN_PASSWORD_CHARS = 8
# scrypt work factors (RFC 7914's interactive-login recommendation, ~50 ms per check).
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
LOCAL_USER = "local"  # the one identity of a page served on 127.0.0.1 without an accounts file


class AccountsError(ValueError):
    """A bad accounts file or command; the message names the file or field and what to do."""


@dataclass(frozen=True)
class Account:
    """One login. ``id`` names the user's data folder; the hashes are hex strings."""

    name: str
    id: str
    password_salt: str
    password_hash: str
    api_key_hash: str
    admin: bool = False


def password_digest(password: str, salt_hex: str) -> str:
    return hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), dklen=32, **SCRYPT).hex()


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class Accounts:
    """The accounts of one file; ``verify_password`` and ``by_api_key`` answer in constant time per account."""

    def __init__(self, path: str | Path, accounts: list[Account] | None = None):
        self.path = Path(path)
        self.accounts = list(accounts or [])

    @classmethod
    def load(cls, path: str | Path) -> Accounts:
        """Read and check the file; a missing file is an error (create it with ``users add``)."""
        path = Path(path)
        if not path.is_file():
            raise AccountsError(
                f"{path}: no accounts file; create one with: python live_chat.py users add NAME --accounts_file {path}"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data["accounts"]
            accounts = [Account(**row) for row in rows]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise AccountsError(
                f"{path}: not an accounts file ({type(error).__name__}: {error}); "
                "recreate it with `python live_chat.py users add`"
            ) from error
        seen_names, seen_ids = set(), set()
        for index, account in enumerate(accounts):
            where = f"{path}: account {index + 1}"
            if not ACCOUNT_NAME.match(account.name) or not USER_ID.match(account.id):
                raise AccountsError(f"{where}: name {account.name!r} or id {account.id!r} is malformed")
            if account.name in seen_names or account.id in seen_ids:
                raise AccountsError(f"{where}: name {account.name!r} or id {account.id!r} appears twice")
            seen_names.add(account.name)
            seen_ids.add(account.id)
        return cls(path, accounts)

    def save(self) -> None:
        write_json_atomic(self.path, {"version": 1, "accounts": [asdict(a) for a in self.accounts]})
        os.chmod(self.path, 0o600)

    def find(self, name: str) -> Account | None:
        return next((a for a in self.accounts if a.name == name), None)

    def by_id(self, user_id: str) -> Account | None:
        return next((a for a in self.accounts if a.id == user_id), None)

    def verify_password(self, name: str, password: str) -> Account | None:
        account = self.find(name)
        if account is None or not password:
            return None
        digest = password_digest(password, account.password_salt)
        return account if hmac.compare_digest(digest, account.password_hash) else None

    def by_api_key(self, key: str) -> Account | None:
        if not key or not key.startswith(API_KEY_PREFIX):
            return None
        digest = api_key_digest(key)
        found = None
        for account in self.accounts:  # no early exit: the time does not say which account matched
            if hmac.compare_digest(digest, account.api_key_hash):
                found = account
        return found

    def add(self, name: str, password: str, *, admin: bool = False) -> tuple[Account, str]:
        """A new account with a fresh id and API key; returns it and the key (shown once, never stored)."""
        if not ACCOUNT_NAME.match(name or ""):
            raise AccountsError(f"account name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-'")
        if self.find(name):
            raise AccountsError(f"{self.path}: account {name!r} exists; remove it first or pick another name")
        check_password(password)
        taken = {a.id for a in self.accounts}
        user_id = f"u{secrets.token_hex(8)}"
        while user_id in taken:  # 64 random bits: practically never
            user_id = f"u{secrets.token_hex(8)}"
        salt = secrets.token_hex(16)
        key = new_api_key()
        account = Account(name, user_id, salt, password_digest(password, salt), api_key_digest(key), admin)
        self.accounts.append(account)
        return account, key

    def new_key(self, name: str) -> str:
        account = self.require(name)
        key = new_api_key()
        self.accounts[self.accounts.index(account)] = Account(
            account.name, account.id, account.password_salt, account.password_hash, api_key_digest(key), account.admin
        )
        return key

    def remove(self, name: str) -> Account:
        account = self.require(name)
        self.accounts.remove(account)
        return account

    def require(self, name: str) -> Account:
        account = self.find(name)
        if account is None:
            raise AccountsError(f"{self.path}: no account {name!r} (see `python live_chat.py users list`)")
        return account


def check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD_CHARS:
        raise AccountsError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters")


def export_user_data(user_folder: Path, out_zip: Path) -> Path:
    """Zip one user's folder (adapters, history, failed and pending updates) to ``out_zip``, atomically."""
    if not user_folder.is_dir():
        raise AccountsError(f"{user_folder}: this user has no data yet")
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_zip.parent) as staging:
        archive = shutil.make_archive(str(Path(staging) / "export"), "zip", root_dir=user_folder)
        os.replace(archive, out_zip)
    return out_zip


# --------------------------------------------------------------------------------------------------
# `python live_chat.py users ...`
# --------------------------------------------------------------------------------------------------


def build_users_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="live_chat.py users", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts_file", required=True, help="the accounts JSON file (created by `add`)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create an account; prints its API key once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may export and delete other users' data via the API")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin, not the terminal")
    commands.add_parser("list", help="names, ids and admin flags (no secrets)")
    for name, text in (
        ("remove", "delete the account (its data stays; export or delete it first)"),
        ("new-key", "replace the account's API key; prints the new key once"),
    ):
        commands.add_parser(name, help=text).add_argument("name")
    export = commands.add_parser("export", help="zip the account's stored data")
    export.add_argument("name")
    export.add_argument("--adapters_dir", required=True, help="the live chat's --adapters_dir")
    export.add_argument("--out", required=True, help="zip file to write")
    return parser


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise AccountsError("the two passwords differ; run the command again")
    return first


def users_main(argv: list[str]) -> int:
    """The ``users`` sub-command; one ``error:`` line and exit 1 on bad input."""
    args = build_users_parser().parse_args(argv)
    try:
        path = Path(args.accounts_file)
        accounts = Accounts.load(path) if path.is_file() or args.command != "add" else Accounts(path)
        if args.command == "add":
            account, key = accounts.add(args.name, read_password(args.password_stdin), admin=args.admin)
            accounts.save()
            print(f"added {account.name} (id {account.id}{', admin' if account.admin else ''})")
            print(f"API key (shown only now; the bearer token of /v1/chat/completions): {key}")
        elif args.command == "list":
            for account in accounts.accounts:
                print(f"{account.name}\t{account.id}\t{'admin' if account.admin else ''}")
        elif args.command == "remove":
            account = accounts.remove(args.name)
            accounts.save()
            print(f"removed {account.name}; its data stays in users/{account.id}/ under the adapters folder")
        elif args.command == "new-key":
            key = accounts.new_key(args.name)
            accounts.save()
            print(f"new API key for {args.name} (shown only now): {key}")
        elif args.command == "export":
            account = accounts.require(args.name)
            out = export_user_data(Path(args.adapters_dir) / "users" / account.id, Path(args.out))
            print(f"exported {account.name} to {out}")
    except (AccountsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
