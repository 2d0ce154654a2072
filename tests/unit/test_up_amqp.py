"""``dlhub up --amqp`` says clearly why it cannot get a broker, before it starts anything."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from dlhub.executor import cli


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_amqp_url_with_no_broker_there(tmp_path):
    port = closed_port()
    url = f"amqp://admin:pw@127.0.0.1:{port}/"
    out = CliRunner().invoke(cli.main, ["up", "--home", str(tmp_path / "h"), "--amqp-url", url, "--detach"])
    assert out.exit_code == 1
    assert f"no RabbitMQ answers at 127.0.0.1:{port}" in out.output
    assert not (tmp_path / "h" / "manager" / "manager.json").exists()  # nothing was started


def test_amqp_says_when_rabbitmq_server_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("RMQ_PORT", str(closed_port()))
    monkeypatch.setenv("PATH", str(tmp_path))  # no rabbitmq-server on it
    monkeypatch.setattr(cli, "RABBITMQ_SERVER_PATHS", ())
    out = CliRunner().invoke(cli.main, ["up", "--home", str(tmp_path / "h"), "--amqp", "--detach"])
    assert out.exit_code == 1
    assert "rabbitmq-server is not installed" in out.output
    assert "apt-get install rabbitmq-server" in out.output and "--amqp-url" in out.output


def test_a_bad_amqp_url_is_refused(tmp_path):
    out = CliRunner().invoke(cli.main, ["up", "--home", str(tmp_path / "h"), "--amqp-url", "http://x/"])
    assert out.exit_code == 1 and "expected amqp://" in out.output
