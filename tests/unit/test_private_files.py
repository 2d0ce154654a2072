"""Files of a dlhub home are private whatever the umask: folders 0700, the SQLite database and
its WAL files, logs and status files 0600; an older home is tightened, keeping owner bits."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import sqlalchemy as sa

from dlhub.endpoint.lifecycle import setup_logging
from dlhub.manager.store import make_engine, migrate
from dlhub.protocol.private import private_dir, tighten, write_private


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_database_and_its_wal_files_are_0600(tmp_path, open_umask):
    db = tmp_path / "manager" / "dlhub.db"
    private_dir(db.parent)
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM tasks"))
        for path in (db, db.with_name("dlhub.db-wal"), db.with_name("dlhub.db-shm")):
            assert _mode(path) == 0o600, path
    engine.dispose()
    assert _mode(db.parent) == 0o700


def test_an_existing_database_is_narrowed(tmp_path):
    db = tmp_path / "dlhub.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    engine.dispose()
    db.chmod(0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert _mode(db) == 0o600


def test_endpoint_logs_and_status_are_private(tmp_path, open_umask):
    run_dir = tmp_path / "home" / "endpoints" / "ep"
    setup_logging(run_dir / "endpoint.log", 1000, 0)
    try:
        logging.getLogger("dlhub.test").warning("x" * 2000)  # rolls over: the new file is private too
        write_private(run_dir / "status.json", "{}")
        assert _mode(run_dir) == 0o700 and _mode(run_dir.parent) == 0o700
        assert _mode(run_dir / "endpoint.log") == 0o600
        assert _mode(run_dir / "status.json") == 0o600
    finally:
        logging.getLogger().handlers.clear()


def test_tighten_narrows_an_older_home_and_keeps_owner_bits(tmp_path):
    home = tmp_path / "home"
    (home / "endpoints" / "ep").mkdir(parents=True, mode=0o755)
    (home / "endpoints" / "ep" / "submit.sh").write_text("#!/bin/sh\n")
    (home / "endpoints" / "ep" / "submit.sh").chmod(0o755)
    (home / "config.json").write_text("{}")
    (home / "config.json").chmod(0o644)
    (home / "link").symlink_to("/etc/hostname")
    home.chmod(0o755)
    assert tighten(home) >= 4
    assert _mode(home) == 0o700 and _mode(home / "endpoints" / "ep") == 0o700
    assert _mode(home / "endpoints" / "ep" / "submit.sh") == 0o700
    assert _mode(home / "config.json") == 0o600
    assert tighten(home) == 0  # nothing left to do
