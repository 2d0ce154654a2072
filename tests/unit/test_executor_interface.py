"""The Executor talks to its Connection through a small public interface only (issue 11, item 4):
no reaching into the I/O thread's internals (its lock, its resend buffer, raw queue items)."""

from __future__ import annotations

import ast
from pathlib import Path

import dlhub.executor.executor as executor_module
from dlhub.executor.connection import Connection

PUBLIC = {
    "submit",
    "put_code",
    "cancel",
    "fetch",
    "query",
    "status",
    "forget_unacked",
    "close",
    "closed",
    "welcome",
}


def test_the_executor_uses_only_the_public_interface_of_its_connection():
    tree = ast.parse(Path(executor_module.__file__).read_text())
    used = set()
    for node in ast.walk(tree):
        # self._conn.<name>
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "_conn"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            used.add(node.attr)
    assert used, "the Executor no longer uses self._conn? (update this test)"
    assert used <= PUBLIC, f"the Executor reaches into Connection: {sorted(used - PUBLIC)}"
    for name in PUBLIC:
        assert not name.startswith("_")
        assert hasattr(Connection, name) or name == "welcome", name
