"""The browser side of the live chat (Gradio): login, chat box with streamed replies, adapter controls,
and the signal panel.

Whose adapter a session uses comes from its login (``request.username``, checked by Gradio's auth against
the accounts file), never from anything the page sends; every handler checks it again. The page polls
the engine once a second, so an update that finishes while the person reads or types
shows up without a click: the adapter step and fingerprint in the status line, and the reply it was
trained on, token by token, coloured by the A_t that update trained on (returned by ``train_step``, at its
scoring temperature; the signal-analysis figures' colour map: red = the follow-up made the token less
likely, white = unchanged, blue = more likely).
"""

import html

from sdpo.evaluation.signal_plots import signal_color_hex, text_color_hex
from sdpo.live_chat.api import Identities, api_routes
from sdpo.live_chat.sessions import Conversation, LiveChatEngine, LiveChatError, UpdateReport, UserStatus

POLL_SECONDS = 1.0

PAGE_CSS = """
#signal-panel .tokens { font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.9;
  white-space: pre-wrap; }
#signal-panel .tokens span { border-radius: 3px; padding: 1px 2px; margin-right: 1px; }
#signal-panel table { font-size: 0.9em; margin-bottom: 0.5em; }
#signal-panel .legend { height: 10px; border-radius: 3px; margin-top: 0.6em; }
"""

INTRO = (
    "Chat with the model. Each message you send after one of its replies is read as feedback on that reply: "
    "the model is updated on it in the background (one SDPO step on your own adapter) while it answers you."
)


def render_signal_html(report: UpdateReport | None, vmin: float, vmax: float) -> str:
    """The last update's metrics and its reply, token by token, coloured by the signal."""
    if report is None:
        return "<p><b>SDPO signal</b>: no update yet. Reply to the model's answer to give it feedback.</p>"
    spans = []
    for piece, value in zip(report.tokens, report.signal):
        background = signal_color_hex(value, vmin, vmax)
        text = html.escape(piece).replace("\n", "⏎\n")
        spans.append(
            f'<span style="background:{background};color:{text_color_hex(background)}" '
            f'title="{value:+.3f}">{text}</span>'
        )
    gradient = ", ".join(signal_color_hex(vmin + (vmax - vmin) * i / 8, vmin, vmax) for i in range(9))
    return (
        f"<p><b>Update {report.step}</b>: your follow-up “{html.escape(report.follow_up)}” on the reply below.</p>"
        "<table><tr><th>step</th><th>loss</th><th>mean signal</th><th>tokens</th><th>time</th></tr>"
        f"<tr><td id='metric-step'>{report.step}</td><td>{report.loss:.4f}</td><td>{report.signal_mean:+.4f}</td>"
        f"<td>{len(report.tokens)}</td><td>{report.train_time_s:.1f} s</td></tr></table>"
        f"<div class='tokens'>{''.join(spans)}</div>"
        f"<div class='legend' style='background:linear-gradient(to right, {gradient})'></div>"
        f"<small>{vmin:g} (red: the follow-up made the token less likely) … 0 … {vmax:+g} (blue: more likely)</small>"
    )


def render_status(status: UserStatus, conversation: Conversation | None, login: str | None = None) -> str:
    """One status line: who, adapter step and fingerprint, queue, which step made the last reply, notices."""
    parts = [f"**{login or status.user}**", f"adapter step {status.step}", f"adapter `{status.fingerprint}`"]
    if status.queued:
        parts.append(f"updates running or queued: {status.queued}")
    if conversation is not None and conversation.reply_steps:
        steps = conversation.reply_steps
        parts.append(f"replies: {len(steps)}, the last made with step {steps[-1]}")
    lines = [" · ".join(parts)]
    if status.failed:
        lines.append(f"⚠ {len(status.failed)} failed update(s) kept: press “Retry failed updates”.")
    if status.notice:
        lines.append(status.notice)
    return "  \n".join(lines)


def chat_display(conversation: Conversation | None) -> list[dict]:
    """The chat as Gradio shows it: each reply with the adapter step that produced it."""
    if conversation is None:
        return []
    shown, replies = [], iter(conversation.reply_steps)
    for message in conversation.messages:
        content = message["content"]
        if message["role"] == "assistant":
            content = f"{content}\n\n*adapter step {next(replies)}*"
        shown.append({"role": message["role"], "content": content})
    return shown


def build_app(engine: LiveChatEngine, identities: Identities, *, signal_vmin: float = -5.0, signal_vmax: float = 5.0):
    """The Gradio Blocks page for ``engine`` (serve with ``launch_app``)."""
    import gradio as gr

    limit = engine.limits.max_message_tokens

    def session_user(request: gr.Request) -> str:
        try:
            return identities.user_of_login(request.username)
        except LiveChatError as error:
            raise gr.Error(str(error)) from error

    def own(conversation: Conversation | None, request: gr.Request) -> Conversation:
        """The session's conversation, always of the logged-in user (a fresh one if the state is not theirs)."""
        user = session_user(request)
        if conversation is None or conversation.user != user:
            conversation = Conversation(user=user)
        return conversation

    def panels(conversation: Conversation, request: gr.Request):
        status = engine.status(conversation.user)
        return (
            render_status(status, conversation, request.username),
            render_signal_html(status.last_update, signal_vmin, signal_vmax),
        )

    def start(conversation: Conversation | None, request: gr.Request):
        conversation = own(conversation, request)
        return conversation, chat_display(conversation), *panels(conversation, request)

    def receive(text: str, conversation: Conversation | None, request: gr.Request):
        conversation = own(conversation, request)
        try:
            engine.add_user_message(conversation, text)
        except LiveChatError as error:
            raise gr.Error(str(error)) from error
        return "", conversation, chat_display(conversation), *panels(conversation, request)

    def respond(conversation: Conversation | None, request: gr.Request):
        conversation = own(conversation, request)
        if not conversation.messages or conversation.messages[-1]["role"] != "user":
            yield conversation, chat_display(conversation), *panels(conversation, request)
            return
        shown, text = chat_display(conversation), ""
        for piece in engine.stream_answer(conversation):
            text += piece
            yield conversation, [*shown, {"role": "assistant", "content": text}], *panels(conversation, request)
        yield conversation, chat_display(conversation), *panels(conversation, request)

    def new_conversation(conversation: Conversation | None, request: gr.Request):
        conversation = Conversation(user=session_user(request))
        return conversation, chat_display(conversation), *panels(conversation, request)

    def adapter_action(action):
        def run(conversation: Conversation | None, request: gr.Request):
            conversation = own(conversation, request)
            try:
                action(conversation.user)
            except LiveChatError as error:
                raise gr.Error(str(error)) from error
            return conversation, *panels(conversation, request)

        return run

    def refresh(conversation: Conversation | None, request: gr.Request):
        return panels(own(conversation, request), request)

    with gr.Blocks(title="SDPO live chat", analytics_enabled=False) as app:
        conversation = gr.State(None)
        gr.Markdown(f"## SDPO live chat\n{INTRO}")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chat", height=420, label="Conversation")
                message = gr.Textbox(
                    placeholder=f"Type a message (up to {limit} tokens) and press Enter",
                    show_label=False,
                    elem_id="message",
                )
                gr.Markdown(f"Messages and follow-ups are limited to **{limit} tokens**.", elem_id="limits")
                with gr.Row():
                    send_button = gr.Button("Send", variant="primary", elem_id="send")
                    new_button = gr.Button("New conversation", elem_id="new-conversation")
                    if identities.accounts is not None:
                        gr.Button("Log out", link="/logout", elem_id="logout")
            with gr.Column(scale=2):
                signal_panel = gr.HTML(elem_id="signal-panel")
                with gr.Row():
                    undo_button = gr.Button("Undo last update", elem_id="undo")
                    reset_button = gr.Button("Reset adapter", elem_id="reset")
                with gr.Row():
                    save_button = gr.Button("Save a copy", elem_id="save")
                    retry_button = gr.Button("Retry failed updates", elem_id="retry")
        chat_outputs = [conversation, chatbot, status, signal_panel]
        for trigger in (message.submit, send_button.click):
            sent = trigger(receive, [message, conversation], [message, *chat_outputs])
            sent.success(respond, [conversation], chat_outputs)
        new_button.click(new_conversation, [conversation], chat_outputs)
        for button, action in (
            (undo_button, engine.undo),
            (reset_button, engine.reset),
            (save_button, engine.save),
            (retry_button, engine.retry_failed),
        ):
            button.click(adapter_action(action), [conversation], [conversation, status, signal_panel])
        app.load(start, [conversation], chat_outputs)
        gr.Timer(POLL_SECONDS).tick(refresh, [conversation], [status, signal_panel])
    return app


def launch_app(
    app,
    engine: LiveChatEngine,
    identities: Identities,
    *,
    host: str,
    port: int,
    share: bool = False,
    block: bool = True,
) -> str:
    """Serve the page ``app`` with the API beside it, behind the accounts' login when there are accounts; returns
    the local URL (``block=False`` returns at once, for tests)."""
    import gradio as gr

    auth = None
    if identities.accounts is not None:
        accounts = identities.accounts

        def auth(name: str, password: str) -> bool:
            return accounts.verify_password(name, password) is not None

    # System fonts: the default theme would fetch web fonts, and this page must work offline.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    _, local_url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        quiet=not block,
        ssr_mode=False,
        auth=auth,
        auth_message="Log in with your live-chat account (created with `python live_chat.py users add`).",
        app_kwargs={"routes": api_routes(engine, identities)},
        theme=theme,
        css=PAGE_CSS,
    )
    return local_url
