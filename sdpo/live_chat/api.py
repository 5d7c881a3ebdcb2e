"""The live chat's HTTP API, served beside the page: an OpenAI-compatible chat endpoint that teaches the
caller's own adapter, the caller's status, and an admin's export/delete of a user's data.

    POST /v1/chat/completions      OpenAI chat format (``stream`` true or false). The bearer token is the
                                   account's API key and selects its adapter. When the messages end with one of
                                   this account's earlier replies and a new user message, that message is the
                                   follow-up o of the reply: its SDPO update is queued (once). Sampling follows
                                   the server's settings (the update scores y at the temperature it was sampled
                                   at), so ``temperature``/``top_p``/``max_tokens`` in the request are ignored.
    GET  /v1/models                the one model served
    GET  /v1/live/status           the caller's adapter step, queue, failures, and every applied update
    GET  /v1/live/admin/users/{name}/export   (admin key) the user's stored data as a zip
    DELETE /v1/live/admin/users/{name}/data   (admin key) delete the user's stored data

Identity comes only from the bearer token (or, without an accounts file on 127.0.0.1, the one local user);
a name in the request body is never read.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="sdpo-...")
    client.chat.completions.create(model="sdpo-live", messages=[...], stream=True)
"""

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from sdpo.live_chat.accounts import LOCAL_USER, Account, Accounts, AccountsError, export_user_data
from sdpo.live_chat.sessions import LiveChatEngine, LiveChatError

MODEL_ID = "sdpo-live"
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def message_text(content) -> str:
    """The text of an OpenAI message content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, "message content must be a string or a list of text parts")


def parse_messages(body, max_chars: int) -> tuple[list[dict], bool]:
    """(messages as [{role, content}], stream) of a chat-completions body, or APIError naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{index}]: 'role' must be one of {', '.join(ROLES)}")
        text = message_text(message.get("content"))
        if len(text) > max_chars:
            raise APIError(400, f"messages[{index}]: {len(text)} characters is too long for this server")
        parsed.append({"role": message["role"], "content": text})
    if parsed[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's: there is nothing to answer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false")
    return parsed, stream


class Identities:
    """Who a request is: the account of a bearer token, or the local user when no accounts are configured."""

    def __init__(self, accounts: Accounts | None):
        self.accounts = accounts

    def from_bearer(self, authorization: str | None) -> Account | None:
        if self.accounts is None:
            return Account(LOCAL_USER, LOCAL_USER, "", "", "", admin=True)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.accounts.by_api_key(token.strip())

    def user_of_login(self, username: str | None) -> str:
        """The account id of a page session's login name (the local user without accounts)."""
        if self.accounts is None:
            return LOCAL_USER
        account = self.accounts.find(username or "")
        if account is None:
            raise LiveChatError("this session is not logged in to an account; log in again")
        return account.id


def api_routes(engine: LiveChatEngine, identities: Identities) -> list:
    """The API's FastAPI routes (added to the page's app, see ``sdpo.live_chat.ui.launch_app``).

    FastAPI reads the handlers' annotations at definition time, so this module keeps them unquoted."""
    from fastapi import APIRouter, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()
    max_chars = 32 * max(engine.limits.max_message_tokens, engine.updater.config.max_new_tokens)

    def error_response(error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        body = {"error": {"message": error.message, "type": error.kind, "code": error.status}}
        return JSONResponse(body, status_code=error.status, headers=headers)

    def caller(request: Request, *, admin: bool = False) -> Account:
        account = identities.from_bearer(request.headers.get("authorization"))
        if account is None:
            raise APIError(
                401, "missing or unknown API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )
        if admin and not account.admin:
            raise APIError(403, "this needs an admin account's key", "permission_error")
        return account

    def target_account(name: str) -> Account:
        account = identities.accounts.find(name) if identities.accounts is not None else None
        if account is None:
            raise APIError(404, f"no account {name!r}", "not_found_error")
        return account

    @router.get("/v1/models")
    def models(request: Request):
        try:
            caller(request)
        except APIError as error:
            return error_response(error)
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "sdpo-live-chat"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            account = caller(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise APIError(400, f"the body is not JSON ({error})") from error
            messages, stream = parse_messages(body, max_chars)
            try:
                reply_stream = await run_in_threadpool(engine.api_turn, account.id, messages)
            except LiveChatError as error:
                raise APIError(400, str(error)) from error
        except APIError as error:
            return error_response(error)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def finish(reply) -> tuple[str, dict]:
            finish_reason = "stop" if reply.generation.finished else "length"
            return finish_reason, {"adapter_step": reply.step, "user_id": account.id}

        if not stream:
            text = await run_in_threadpool("".join, reply_stream)  # generation must not block the event loop
            finish_reason, extra = finish(reply_stream.reply)
            prompt_tokens = len(engine.updater.encode_context(engine.capped_context(messages)))
            completion_tokens = len(reply_stream.reply.generation.token_ids)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": MODEL_ID,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "sdpo": extra,
            }

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events():
            yield chunk({"role": "assistant", "content": ""})
            for piece in reply_stream:
                yield chunk({"content": piece})
            finish_reason, extra = finish(reply_stream.reply)
            yield chunk({}, finish_reason, sdpo=extra)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.get("/v1/live/status")
    def status(request: Request):
        try:
            account = caller(request)
        except APIError as error:
            return error_response(error)
        return {"status": asdict(engine.status(account.id)), "applied_updates": engine.applied_updates(account.id)}

    @router.get("/v1/live/admin/users/{name}/export")
    def export(name: str, request: Request):
        try:
            caller(request, admin=True)
            account = target_account(name)
            staging = Path(tempfile.mkdtemp(prefix="live-chat-export-"))
            try:
                archive = export_user_data(engine.user_folder(account.id), staging / f"{account.name}.zip")
            except AccountsError as error:
                raise APIError(404, str(error), "not_found_error") from error
        except APIError as error:
            return error_response(error)
        return FileResponse(
            archive,
            filename=archive.name,
            media_type="application/zip",
            background=BackgroundTask(shutil.rmtree, staging, ignore_errors=True),
        )

    @router.delete("/v1/live/admin/users/{name}/data")
    def delete(name: str, request: Request):
        try:
            caller(request, admin=True)
            account = target_account(name)
            job = engine.delete_user_data(account.id)
        except APIError as error:
            return error_response(error)
        except LiveChatError as error:
            return error_response(APIError(409, str(error)))
        job.done.wait()
        return {"deleted": account.name, "notice": engine.status(account.id).notice}

    return router.routes
