"""vLLM's `vllm serve` front-end flags: the chat template (--chat-template,
--trust-request-chat-template, --default-chat-template-kwargs), --response-role,
--max-logprobs, CORS (--allowed-origins, --allowed-methods, --allowed-headers,
--allow-credentials), --root-path, --ssl-keyfile, --ssl-certfile and --uvicorn-log-level.
launch/serve.py takes them, checks them before any rank starts and passes them on to the
front end (afd.api_server), which reads them again into ``FrontendOptions``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from afd.openai_protocol import check_chat_template
from afd.sampling_params import MAX_LOGPROBS

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
FRONTEND_FLAGS = ("--chat-template", "--trust-request-chat-template",
                  "--default-chat-template-kwargs", "--response-role", "--max-logprobs",
                  "--allowed-origins", "--allowed-methods", "--allowed-headers",
                  "--allow-credentials", "--root-path", "--ssl-keyfile", "--ssl-certfile",
                  "--uvicorn-log-level")


def add_frontend_args(ap: argparse.ArgumentParser) -> None:
    """vLLM's front-end flags, its names and defaults (but --uvicorn-log-level's), defined
    once for launch/serve.py and the front end (``frontend_argv`` passes them on,
    ``FrontendOptions.from_args`` reads and checks them)."""
    ap.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                    help="the chat template of every chat request (chat completions, "
                         "responses, /tokenize): a file, or the Jinja template itself")
    ap.add_argument("--trust-request-chat-template", action="store_true",
                    help="take a request's own chat_template (default: a 400, as vLLM)")
    ap.add_argument("--default-chat-template-kwargs", default=None, metavar="JSON",
                    help="a JSON object of chat-template variables for every chat request; "
                         "its own chat_template_kwargs win")
    ap.add_argument("--response-role", default="assistant",
                    help="the role of a chat answer's message when the request has "
                         "add_generation_prompt (default: assistant)")
    ap.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                    help="the most logprobs, top_logprobs or prompt_logprobs a request may ask "
                         f"for, 0 to {MAX_LOGPROBS} (default {MAX_LOGPROBS})")
    for name, what in (("origins", "origins"), ("methods", "HTTP methods"),
                       ("headers", "request headers")):
        ap.add_argument(f"--allowed-{name}", default='["*"]', metavar="JSON",
                        help=f"CORS: the {what} allowed, a JSON list (default: [\"*\"])")
    ap.add_argument("--allow-credentials", action="store_true",
                    help="CORS: allow credentials (cookies, Authorization) cross-origin")
    ap.add_argument("--root-path", default=None,
                    help="the path prefix a proxy serves this server under (FastAPI's "
                         "root_path): routes answer with and without it")
    ap.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                    help="serve HTTPS with this private key (PEM; with --ssl-certfile)")
    ap.add_argument("--ssl-certfile", default=None, metavar="FILE",
                    help="serve HTTPS with this certificate chain (PEM)")
    ap.add_argument("--uvicorn-log-level", default="warning", choices=UVICORN_LOG_LEVELS,
                    help="uvicorn's log level (default warning, no line per request; vLLM's "
                         "is info)")


def frontend_argv(args: argparse.Namespace) -> list[str]:
    """The front-end flags in ``args`` (``add_frontend_args``'), as a command line (each value
    after an =: a template may start with a dash)."""
    argv = []
    for flag in FRONTEND_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv.append(f"{flag}={value}")
    return argv


def load_chat_template(value: str | None) -> str | None:
    """--chat-template as vLLM reads it: the file it names; failing that, a value with a
    Jinja character ({, } or a newline) is the template itself, its backslash escapes read
    (a shell's '\\n' is a newline); any other value is a path that could not be read: a
    ValueError naming the flag."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ValueError(f"--chat-template {value}: the file is not UTF-8 text") from None
    except OSError as exc:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r:.200}: no such file could be read "
                             f"({exc.strerror}), and it is no template (no {{, }} or "
                             "newline)") from None
    try:
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:  # a lone backslash at the end, say
        raise ValueError(f"--chat-template: a bad backslash escape in the template ({exc.reason})"
                         ) from None


def _json_flag(flag: str, text: str | None, kind: type) -> Any:
    """A flag's JSON value, of type ``kind`` (a ValueError naming the flag)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc}): {text!r:.200}") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(x, str)
                                                               for x in value)):
        want = "a JSON object" if kind is dict else "a JSON list of strings"
        raise ValueError(f"{flag} must be {want}, got {text!r:.200}")
    return value


@dataclass
class FrontendOptions:
    """What the front-end flags (``add_frontend_args``) set; every value is checked here, a
    ValueError naming the flag."""

    chat_template: str | None = None  # the template itself (load_chat_template)
    trust_request_chat_template: bool = False
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    response_role: str = "assistant"
    max_logprobs: int = MAX_LOGPROBS
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    uvicorn_log_level: str = "warning"

    def __post_init__(self) -> None:
        import jinja2

        if self.chat_template is not None:
            try:
                check_chat_template(self.chat_template)
            except jinja2.TemplateError as exc:
                raise ValueError(f"--chat-template does not parse as a Jinja template: {exc}"
                                 ) from None
        if not isinstance(self.default_chat_template_kwargs, dict):
            raise ValueError("--default-chat-template-kwargs must be a JSON object")
        if not isinstance(self.response_role, str) or not self.response_role:
            raise ValueError(f"--response-role must be a non-empty string, got "
                             f"{self.response_role!r}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) \
                or not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be an integer in [0, {MAX_LOGPROBS}] (the "
                             f"engine's limit), got {self.max_logprobs!r}")
        if self.root_path and (not self.root_path.startswith("/")
                               or self.root_path.endswith("/")):
            raise ValueError(f"--root-path must start with / and not end with one, got "
                             f"{self.root_path!r}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level must be one of "
                             f"{', '.join(UVICORN_LOG_LEVELS)}, got {self.uvicorn_log_level!r}")
        if self.ssl_keyfile is not None or self.ssl_certfile is not None:
            self._check_ssl()

    def _check_ssl(self) -> None:
        """The key and certificate load (now, not when the server starts: after the ranks)."""
        import ssl

        if self.ssl_certfile is None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.ssl_certfile, self.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:  # SSLError is one; a missing file too
            raise ValueError(f"--ssl-certfile {self.ssl_certfile} / --ssl-keyfile "
                             f"{self.ssl_keyfile}: cannot load them: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontendOptions:
        return cls(load_chat_template(args.chat_template), args.trust_request_chat_template,
                   _json_flag("--default-chat-template-kwargs",
                              args.default_chat_template_kwargs, dict) or {},
                   args.response_role, args.max_logprobs,
                   *(_json_flag(f"--allowed-{name}", getattr(args, f"allowed_{name}"), list)
                     for name in ("origins", "methods", "headers")),
                   args.allow_credentials, args.root_path or "", args.ssl_keyfile,
                   args.ssl_certfile, args.uvicorn_log_level)

    def check_tokenizer(self, tokenizer) -> None:
        """--default-chat-template-kwargs hold template variables only: a key that is an
        argument of the tokenizer's apply_chat_template would make every chat request a 400
        (ChatTemplateFields.prompt_ids)."""
        import inspect

        taken = set(inspect.signature(tokenizer.apply_chat_template).parameters) & set(
            self.default_chat_template_kwargs)
        if taken:
            raise ValueError(f"--default-chat-template-kwargs may not set {sorted(taken)} "
                             "(apply_chat_template's own arguments, not template variables)")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        return {"log_level": self.uvicorn_log_level, "ssl_keyfile": self.ssl_keyfile,
                "ssl_certfile": self.ssl_certfile}


def uvicorn_config(app, options: FrontendOptions, host: str, port: int):
    """The uvicorn config the front end serves ``app`` with (--ssl-*, --uvicorn-log-level)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5,
                          **options.uvicorn_kwargs())


def route_path(scope) -> str:
    """A request's path under --root-path (Starlette routes it the same way): a request sent
    with the prefix is checked as one sent without it."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def add_frontend_options(app, options: FrontendOptions) -> None:
    """vLLM's CORS flags (Starlette's CORSMiddleware, always on, as vLLM's), and
    --root-path."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                       allow_credentials=options.allow_credentials,
                       allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers)
    app.root_path = options.root_path
