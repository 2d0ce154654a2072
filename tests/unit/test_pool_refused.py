"""A pool whose endpoint refuses it at the CURVE handshake still ends by itself.

After a ZAP denial a DEALER has no pipe left and a blocking send never returns: before the
pool sent without blocking, such a pool (left behind by an endpoint that was killed and restarted
with new session keys) hung forever, holding its node until walltime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator


def test_a_pool_refused_at_the_handshake_exits_after_the_silence_threshold(tmp_path):
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    (tmp_path / "no-keys").mkdir()
    auth.configure_curve(domain="*", location=str(tmp_path / "no-keys"))  # admits no client key
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = server_public, server_secret
    port = router.bind_to_random_port("tcp://127.0.0.1")
    config = {
        "endpoint_url": f"tcp://127.0.0.1:{port}",
        "token": "pool-token",
        "workers_per_node": 0,
        "heartbeat_s": 0.1,
        "heartbeat_threshold_s": 1.5,
        "curve": {
            "server_public": server_public.decode(),
            "client_public": client_public.decode(),
            "client_secret": client_secret.decode(),
        },
    }
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(config))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlhub.endpoint.pool", "--config", str(path), "--block-id", "default/0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, out  # "endpoint silent ...; pool exits"
        assert "endpoint silent" in out, out
        assert time.monotonic() - started < 25
        assert router.poll(0) == 0  # nothing of the refused pool ever reached the endpoint's loop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        router.close(0)
        auth.stop()
        ctx.term()
