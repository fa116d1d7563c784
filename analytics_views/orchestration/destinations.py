"""Where notifications go: an SMTP server, a Slack channel, a JSON webhook. Each sends one notice or raises
DeliveryError with one line saying why (never a secret), and the sensor keeps the notice to try again.

A notice is sent again only when it cannot have arrived (no connection, a refusal): a destination that took
the request and did not answer within TIMEOUT_S raises DeliveryUnconfirmed, and the sensor does not send
that notice again. What no sensor can rule out (the daemon killed between a delivery and the cursor that
records it) may repeat a notice once: each carries its `id`, the same for every try of the same event, as
the webhook's `Idempotency-Key` header and JSON `id`, and the email's Message-ID, for receivers to drop
repeats. Slack's chat.postMessage takes no such key.

Secrets (the SMTP password, the Slack token, the webhook URL, which often carries a token) are read from the
environment when a notice is sent, where the sensors are evaluated (the code location's server): never from the defs.yaml, never into a
message, a log line or the sensor's cursor.
"""

import json
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import urlsplit

from analytics_views.errors import AnalyticsViewsError

TIMEOUT_S = 10  # one unreachable destination must not hold the sensor's tick (and the others' notices) for long


class DeliveryError(AnalyticsViewsError):
    """A notice that did not reach its destination; the message is one line without secrets."""


class DeliveryUnconfirmed(DeliveryError):
    """A notice sent whose destination did not answer in time: it may well have arrived, so it is not resent."""


class Notice(Protocol):
    subject: str

    @property
    def id(self) -> str: ...

    def text(self) -> str: ...

    def as_json(self) -> dict: ...


def secret_from_env(variable: str, what: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        raise DeliveryError(
            f"{variable} is not set: set it to {what} where the code location runs (its code server evaluates the sensors)"
        )
    return value


def _reason(error: BaseException) -> str:
    """One line: the error's kind and text, without the URL or credentials a library may have put in it."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {' '.join(str(text).split())}"[:300]


@dataclass(frozen=True)
class Email:
    """An email to `to`, through an SMTP server (STARTTLS by default, as Dagster's email sensor)."""

    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    security: str = "starttls"  # starttls | ssl | none (a relay on the same host or network only)
    username: str | None = None  # default: the sender
    password_env: str | None = None  # unset: no login

    name = "email"

    @property
    def where(self) -> str:
        return f"SMTP server {self.host}:{self.port}"

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(filter(None, [os.environ.get(self.password_env or "")]))

    def send(self, notice: Notice) -> None:
        message = EmailMessage()
        message["Subject"] = notice.subject
        message["From"] = self.sender
        message["To"] = ", ".join(self.to)
        message["Message-ID"] = f"<{notice.id}@analytics-views>"
        message.set_content(notice.text())
        password = secret_from_env(self.password_env, "the SMTP password") if self.password_env else None
        try:
            if self.security == "ssl":
                server = smtplib.SMTP_SSL(self.host, self.port, timeout=TIMEOUT_S, context=ssl.create_default_context())
            else:
                server = smtplib.SMTP(self.host, self.port, timeout=TIMEOUT_S)
            with server:
                if self.security == "starttls":
                    server.starttls(context=ssl.create_default_context())
                if password is not None:
                    server.login(self.username or self.sender, password)
                server.send_message(message)
        except (OSError, smtplib.SMTPException) as error:
            raise DeliveryError(f"{self.where}: {_reason(error)}") from None


@dataclass(frozen=True)
class Slack:
    """A message in a Slack channel, posted with a bot token through dagster-slack's client (slack_sdk)."""

    channel: str
    token_env: str = "SLACK_BOT_TOKEN"
    api_url: str | None = None  # default: Slack's own (https://slack.com/api/); a proxy or a test server

    name = "slack"

    @property
    def where(self) -> str:
        return f"Slack channel {self.channel}"

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(filter(None, [os.environ.get(self.token_env)]))

    def send(self, notice: Notice) -> None:
        from slack_sdk import WebClient
        from slack_sdk.errors import SlackApiError

        token = secret_from_env(self.token_env, "the Slack bot token (xoxb-...)")
        client = WebClient(token=token, timeout=TIMEOUT_S, **({"base_url": self.api_url} if self.api_url else {}))
        try:
            client.chat_postMessage(channel=self.channel, text=f"*{notice.subject}*\n{notice.text()}")
        except SlackApiError as error:
            raise DeliveryError(f"{self.where}: Slack answered {error.response.get('error', 'not ok')}") from None
        except TimeoutError as error:  # sent, no answer in time (a failed connection is a URLError)
            raise DeliveryUnconfirmed(f"{self.where}: {_reason(error)}") from None
        except (OSError, urllib.error.URLError) as error:
            raise DeliveryError(f"{self.where}: {_reason(error)}") from None


@dataclass(frozen=True)
class Webhook:
    """The notice as JSON, POSTed to the URL in `url_env` (a chat's incoming webhook, an incident tool, ...)."""

    url_env: str = "ANALYTICS_VIEWS_WEBHOOK_URL"

    name = "webhook"

    @property
    def where(self) -> str:
        parts = urlsplit(os.environ.get(self.url_env, ""))
        # Scheme, host and port only: the path and query of a webhook URL are often its secret.
        port = f":{parts.port}" if parts.port else ""
        return f"webhook at {parts.scheme}://{parts.hostname}{port} ({self.url_env})"

    @property
    def secrets(self) -> tuple[str, ...]:
        url = os.environ.get(self.url_env, "")
        parts = urlsplit(url)
        return tuple(piece for piece in (url, parts.path.strip("/"), parts.query, parts.password) if piece and len(piece) >= 4)

    def send(self, notice: Notice) -> None:
        url = secret_from_env(self.url_env, "the webhook's URL")
        if urlsplit(url).scheme not in ("http", "https"):
            raise DeliveryError(f"{self.url_env} is not an http(s) URL: set it to the webhook's https://... address")
        request = urllib.request.Request(
            url,
            data=json.dumps(notice.as_json()).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "analytics-views", "Idempotency-Key": notice.id},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read()
        except TimeoutError as error:  # urllib wraps failures to connect and send in URLError; this came after
            raise DeliveryUnconfirmed(f"{self.where}: {_reason(error)}") from None
        except (OSError, urllib.error.URLError) as error:
            raise DeliveryError(f"{self.where}: {_reason(error)}") from None


Destination = Email | Slack | Webhook
