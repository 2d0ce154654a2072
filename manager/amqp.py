"""Publish Globus Compute results to a RabbitMQ broker, the way ``globus_compute_sdk.Executor``
consumes them (issue 13, item 4).

What the SDK's Executor does (globus-compute-sdk 4.19, ``sdk/executor.py``, ``_ResultWatcher``):
it asks ``GET /v2/get_amqp_result_connection_url`` for ``{"connection_url", "queue_prefix"}``,
opens ``pika.URLParameters(connection_url)`` and ``basic_consume``s the queue
``<queue_prefix><task_group_id>`` (it never declares it). Each message body must be
``globus_compute_common.messagepack.pack(Result(...))``; it reads ``props.timestamp`` (for
``TaskExecutionFailed``) and ``props.headers.get("high_assurance")`` (absent here). It acks after
storing the result, and nacks (requeue) what does not unpack.

Here:

- **Per-user credentials.** Each dlhub user gets a RabbitMQ user ``dlhub-gc-<user>``, created by
  the manager through the broker's **management HTTP API** (not ``rabbitmqctl``): the API works
  from another host and as any OS user (``rabbitmqctl`` must run beside the broker with its Erlang
  cookie, and starts an Erlang VM per call, ~1 s). Its password is ``HMAC(secret, user)``, so it is
  stable across manager restarts and nothing has to be stored. Its permissions (configure, write,
  read) are the regex ``^<queue_prefix>``: it can consume its own queues and no one else's.
- **One queue per task group**, ``<queue_prefix><task_group_id>``, durable, declared by the
  manager (with its admin connection) before the first result is published to it.
- **Publishing never blocks the caller**: :meth:`ResultPublisher.publish` puts the message on an
  in-memory queue; one thread owns the ``pika.BlockingConnection`` (pika connections are not
  thread-safe) and publishes with publisher confirms and persistent messages. A message leaves
  the queue only once the broker confirmed it; on a broken connection the thread reconnects and
  publishes it again, so delivery is **at least once**.
- **Duplicates**: the SDK keeps one future per task id (``_open_futures``) and completes it from
  ``_received_results[task_id]``: a second message for a task whose future is done finds no open
  future and is never delivered to it, so one future never sees a result twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class AmqpError(RuntimeError):
    """The broker (or its management API) refused or could not be reached."""


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 5672
    management_url: str = "http://127.0.0.1:15672"
    admin_user: str = "dlhub-admin"
    admin_password: str = "dlhub-admin"
    vhost: str = "/"
    secret: bytes = b""  # derives each user's password; keep it with the manager's other secrets
    host_for_clients: str | None = None  # the host the SDK dials (default: host)
    queue_expires_s: float = 7 * 86400  # a task group's queue unused (no consumer) this long is deleted


def _safe(name: str) -> str:
    """A user name as queue-name and regex-safe characters, unique (a short digest appended)."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]
    return f"{clean}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class ResultPublisher:
    """Per-user AMQP credentials and result publishing for the Globus Compute API."""

    def __init__(self, settings: BrokerSettings) -> None:
        if not settings.secret:
            raise ValueError("BrokerSettings.secret must be set (it derives each user's password)")
        self.settings = settings
        self._users: set[str] = set()
        self._users_lock = threading.Lock()
        self._policy_set = False
        self._outbox: queue.Queue[tuple[str, str, bytes, int] | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._declared: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amqp-results", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ credentials
    def rabbit_user(self, user: str) -> str:
        return f"dlhub-gc-{_safe(user)}"

    def password(self, user: str) -> str:
        return hmac.new(self.settings.secret, user.encode(), hashlib.sha256).hexdigest()

    def queue_prefix(self, user: str) -> str:
        return f"dlhub.gc.{_safe(user)}."

    def queue_name(self, user: str, task_group_id: str | uuid.UUID) -> str:
        return f"{self.queue_prefix(user)}{task_group_id}"

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.settings.management_url.rstrip('/')}/api/{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        auth = f"{self.settings.admin_user}:{self.settings.admin_password}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(auth).decode())
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            raise AmqpError(
                f"RabbitMQ management API {method} {path}: {exc.code} {exc.read()[:200]!r}"
            ) from None
        except OSError as exc:
            raise AmqpError(f"RabbitMQ management API at {url} unreachable: {exc}") from None
        return json.loads(text) if text else None

    POLICY = "dlhub-gc-expire"

    def ensure_policy(self) -> None:
        """A broker policy (not a queue argument, which the publisher's and the SDK's declares
        would have to repeat exactly) deletes a task group's queue once nothing used it for
        ``queue_expires_s``: an Executor that never comes back leaves no queue behind for ever."""
        vhost = urllib.parse.quote(self.settings.vhost, safe="")
        body = {
            "pattern": "^" + re.escape("dlhub.gc."),
            "definition": {"expires": int(self.settings.queue_expires_s * 1000)},
            "apply-to": "queues",
            "priority": 0,
        }
        self._api("PUT", f"policies/{vhost}/{self.POLICY}", body)
        self._policy_set = True

    def ensure_user(self, user: str) -> None:
        """Create (or re-assert) the RabbitMQ user of a dlhub user, limited to its own queues."""
        with self._users_lock:
            if not self._policy_set:
                self.ensure_policy()
            if user in self._users:
                return
            name = urllib.parse.quote(self.rabbit_user(user), safe="")
            vhost = urllib.parse.quote(self.settings.vhost, safe="")
            self._api("PUT", f"users/{name}", {"password": self.password(user), "tags": ""})
            own = "^" + re.escape(self.queue_prefix(user))
            self._api("PUT", f"permissions/{vhost}/{name}", {"configure": own, "write": own, "read": own})
            self._users.add(user)

    def declare_queue(self, user: str, task_group_id: str | uuid.UUID) -> str:
        """Declare the task group's queue (durable; idempotent) before the SDK consumes it: the SDK
        never declares it, and consuming a missing queue closes its channel. Blocking HTTP: call it
        from the request thread that creates the task group, not from the manager loop."""
        self.ensure_user(user)
        name = self.queue_name(user, task_group_id)
        vhost = urllib.parse.quote(self.settings.vhost, safe="")
        self._api("PUT", f"queues/{vhost}/{urllib.parse.quote(name, safe='')}", {"durable": True})
        return name

    def connection_info(self, user: str) -> dict[str, str]:
        """What ``GET /v2/get_amqp_result_connection_url`` returns to this user's SDK."""
        self.ensure_user(user)
        s = self.settings
        creds = f"{urllib.parse.quote(self.rabbit_user(user), safe='')}:{self.password(user)}"
        vhost = urllib.parse.quote(s.vhost, safe="")
        return {
            "connection_url": f"amqp://{creds}@{s.host_for_clients or s.host}:{s.port}/{vhost}",
            "queue_prefix": self.queue_prefix(user),
        }

    # ------------------------------------------------------------------ publishing
    def publish(self, user: str, task_group_id: str | uuid.UUID, result: Any) -> None:
        """Queue ``result`` (a ``globus_compute_common`` ``Result``) for the task group's queue;
        returns at once. The message is packed here, so a bad result fails in the caller."""
        from globus_compute_common import messagepack

        body = messagepack.pack(result)
        with self._idle:
            self._pending += 1
        self._outbox.put((self.queue_name(user, task_group_id), str(result.task_id), body, int(time.time())))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued result was confirmed by the broker; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._outbox.put(None)
        self._thread.join(timeout)

    def _connect(self):
        import pika

        s = self.settings
        params = pika.ConnectionParameters(
            host=s.host,
            port=s.port,
            virtual_host=s.vhost,
            credentials=pika.PlainCredentials(s.admin_user, s.admin_password),
            heartbeat=30,
            blocked_connection_timeout=60,
        )
        conn = pika.BlockingConnection(params)
        channel = conn.channel()
        channel.confirm_delivery()  # basic_publish raises unless the broker confirmed
        self._declared.clear()
        return conn, channel

    def _run(self) -> None:
        import pika

        conn = channel = None
        item = None
        backoff = 0.2
        while not self._stop.is_set():
            if item is None:
                try:
                    item = self._outbox.get(timeout=1.0)
                except queue.Empty:
                    try:
                        if conn is not None and conn.is_open:
                            conn.process_data_events(0)  # answer heartbeats, notice a closed link
                    except Exception as exc:
                        log.info(
                            "AMQP connection lost while idle (%s); reconnecting on the next publish", exc
                        )
                        conn = channel = None
                    continue
                if item is None:
                    break
            name, task_id, body, stamp = item
            try:
                if conn is None or not conn.is_open:
                    if conn is not None:
                        log.info("AMQP connection closed; reconnecting")
                    conn, channel = self._connect()
                if name not in self._declared:
                    channel.queue_declare(queue=name, durable=True)
                    self._declared.add(name)
                props = pika.BasicProperties(
                    delivery_mode=2,
                    timestamp=stamp,
                    message_id=task_id,
                    content_type="application/json",
                    headers={},
                )
                channel.basic_publish(
                    exchange="", routing_key=name, body=body, properties=props, mandatory=True
                )
            except Exception as exc:  # broker down, connection lost, unroutable: retry the same one
                log.warning("publishing result of task %s to %s failed (%s); retrying", task_id, name, exc)
                try:
                    if conn is not None and conn.is_open:
                        conn.close()
                except Exception:
                    pass
                conn = channel = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            item = None
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
        try:
            if conn is not None and conn.is_open:
                conn.close()
        except Exception:
            pass
