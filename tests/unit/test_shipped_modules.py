"""The user's own modules travel with a submitted function (issue 9, item 1).

A "client" script runs as ``__main__`` in a subprocess, next to helper modules written into
tmp_path, exactly as a user's script does, and serializes its functions. Each function is then
loaded and called in a FRESH "worker" subprocess whose working directory and path cannot import the
helpers (it asserts so), so every helper it uses must have come inside the serialized bytes.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

HELPERS = {
    "helper_a.py": "def triple(x):\n    return 3 * x\n",
    "helper_b.py": "def scale(x):\n    return 10 * x\n",
    # a chain: helper_c imports helper_d (module import), which imports from helper_e (from-import)
    "helper_c.py": "import helper_d\n\ndef combined(x):\n    return helper_d.offset(x) + 1\n",
    "helper_d.py": "from helper_e import BASE\n\ndef offset(x):\n    return x + BASE\n",
    "helper_e.py": "BASE = 100\n",
    # a package whose __init__ re-exports from a submodule by a relative import
    "helper_pkg/__init__.py": "from .core import half\n\nNAME = 'pkg'\n",
    "helper_pkg/core.py": "def half(x):\n    return x / 2\n",
    # needs a package the client has and the worker lacks (the client sets DLHUB_TEST_CLIENT)
    "helper_broken.py": textwrap.dedent(
        """
        import os
        if os.environ.get("DLHUB_TEST_CLIENT") != "1":
            import dlhub_package_the_worker_lacks  # noqa: F401
        VALUE = 1
        """
    ),
    "helper_raises.py": textwrap.dedent(
        """
        import os
        if os.environ.get("DLHUB_TEST_CLIENT") != "1":
            raise RuntimeError("helper_raises needs the client's licence file")
        VALUE = 1
        """
    ),
    "helper_v.py": "def version():\n    return 1\n",
}

CLIENT = textwrap.dedent(
    """
    import sys
    import warnings

    from dlhub.protocol import serialize

    from helper_a import triple
    import helper_b
    import helper_c
    from helper_pkg import half
    import helper_pkg.core
    import helper_broken
    import helper_raises
    import helper_v

    def via_name(x):
        return triple(x)

    def via_module(x):
        return helper_b.scale(x)

    def via_transitive(x):
        return helper_c.combined(x)

    def via_package(x):
        return half(x) + helper_pkg.core.half(x) + len(helper_pkg.NAME)

    def via_default(x, f=triple):
        return f(x)

    def make_closure():
        g = helper_b.scale
        def closure(x):
            return g(x)
        return closure

    def via_lazy_import(x):
        import helper_b as hb
        return hb.scale(x)

    def via_broken(x):
        return helper_broken.VALUE + x

    def via_raises(x):
        return helper_raises.VALUE + x

    def which(x):
        return helper_v.version()

    out, cap = sys.argv[1], sys.argv[2]
    if cap != "default":
        serialize.MAX_SHIPPED_MODULE_BYTES = int(cap)
    cases = {
        "via_name": via_name, "via_module": via_module, "via_transitive": via_transitive,
        "via_package": via_package, "via_default": via_default, "closure": make_closure(),
        "via_lazy_import": via_lazy_import, "via_broken": via_broken, "via_raises": via_raises,
        "triple": triple, "which": which,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, fn in cases.items():
            with open(f"{out}/{name}.code", "wb") as f:
                f.write(serialize.serialize_function(fn))
    with open(f"{out}/warnings.txt", "w") as f:
        f.write("\\n".join(str(w.message) for w in caught))
    """
)

WORKER = textwrap.dedent(
    """
    import importlib.util
    import json
    import sys

    assert importlib.util.find_spec("helper_a") is None, "the worker must not see the helpers"
    from dlhub.protocol.serialize import load_function

    results = []
    for path in sys.argv[1:]:
        try:
            fn = load_function(open(path, "rb").read())
            results.append(["ok", fn(4)])
        except Exception as exc:
            results.append(["error", f"{type(exc).__name__}: {exc}"])
    print(json.dumps(results))
    """
)


def _env(client: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DLHUB_TEST_CLIENT")}
    if client:
        env["DLHUB_TEST_CLIENT"] = "1"
    return env


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _serialize(client_dir: Path, out: Path, cap: str = "default") -> None:
    out.mkdir()
    (client_dir / "client.py").write_text(CLIENT)
    proc = subprocess.run(
        [sys.executable, "client.py", str(out), cap],
        cwd=client_dir,
        env=_env(client=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def _run_worker(cwd: Path, *blobs: Path) -> list[list]:
    """Load and call each blob (in order, in one fresh process) with the argument 4."""
    (cwd / "worker_main.py").write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, "worker_main.py", *map(str, blobs)],
        cwd=cwd,
        env=_env(client=False),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict[str, Path]:
    """Serialized functions of one client run, plus an empty worker directory."""
    root = tmp_path_factory.mktemp("user-modules")
    client = root / "client"
    _write(client, HELPERS)
    _serialize(client, root / "out")
    worker = root / "worker"
    worker.mkdir()
    return {"client": client, "out": root / "out", "worker": worker, "root": root}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("via_name", 12),  # from helper_a import triple
        ("via_module", 40),  # import helper_b; helper_b.scale
        ("via_transitive", 105),  # helper_c -> helper_d -> helper_e
        ("via_package", 7.0),  # helper_pkg/__init__.py + helper_pkg/core.py
        ("via_default", 12),  # a default argument from a user module
        ("closure", 40),  # a closure over a user module's function
        ("via_lazy_import", 40),  # `import helper_b` inside the function body
        ("triple", 12),  # a function of a user module itself
    ],
)
def test_user_modules_a_function_reaches_travel_to_a_fresh_worker(shipped, case, expected):
    assert _run_worker(shipped["worker"], shipped["out"] / f"{case}.code") == [["ok", expected]]


def test_a_module_the_worker_cannot_import_is_named_in_the_load_error(shipped):
    [(state, message)] = _run_worker(shipped["worker"], shipped["out"] / "via_broken.code")
    assert state == "error"
    assert "NameError" not in message
    assert "ModuleNotFoundError" in message and "dlhub_package_the_worker_lacks" in message
    assert "helper_broken" in message  # which shipped module needed it


def test_an_exception_while_importing_a_shipped_module_is_the_load_error(shipped):
    [(state, message)] = _run_worker(shipped["worker"], shipped["out"] / "via_raises.code")
    assert state == "error"
    assert "NameError" not in message
    assert "RuntimeError" in message and "licence file" in message and "helper_raises" in message


def test_first_call_or_not_the_order_of_loads_does_not_matter(shipped):
    out = shipped["out"]
    results = _run_worker(
        shipped["worker"], out / "triple.code", out / "via_name.code", out / "via_module.code"
    )
    assert results == [["ok", 12], ["ok", 12], ["ok", 40]]


def test_a_changed_module_of_the_same_name_serves_new_loads_and_old_functions_keep_theirs(shipped):
    """helper_v shipped by an earlier function, then again with other source: the newer copy
    serves functions loaded after it; a function loaded before keeps the copy it was loaded with."""
    root = shipped["root"]
    client2 = root / "client-v2"
    _write(client2, {**HELPERS, "helper_v.py": "def version():\n    return 2\n"})
    _serialize(client2, root / "out-v2")
    v1, v2 = shipped["out"] / "which.code", root / "out-v2" / "which.code"
    (root / "worker-v").mkdir()
    worker = root / "worker-v"
    (worker / "worker_main.py").write_text(
        WORKER.replace(
            "print(json.dumps(results))",
            "old = load_function(open(sys.argv[1], 'rb').read())\n"
            "new = load_function(open(sys.argv[2], 'rb').read())\n"
            "results.append(['again', old(4), new(4)])\n"
            "print(json.dumps(results))",
        )
    )
    proc = subprocess.run(
        [sys.executable, "worker_main.py", str(v1), str(v2)],
        cwd=worker,
        env=_env(client=False),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["ok", 1], ["ok", 2], ["again", 1, 2]]


def test_a_module_the_worker_imports_from_its_own_environment_wins(shipped):
    """A worker that can import ``helper_a`` itself uses its own copy, never the shipped one."""
    worker = shipped["root"] / "worker-own"
    _write(worker, {"own/helper_a.py": "def triple(x):\n    return 'the worker own'\n"})
    (worker / "worker_main.py").write_text(
        WORKER.replace('assert importlib.util.find_spec("helper_a") is None', "sys.path.insert(0, 'own')")
    )
    proc = subprocess.run(
        [sys.executable, "worker_main.py", str(shipped["out"] / "via_name.code")],
        cwd=worker,
        env=_env(client=False),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["ok", "the worker own"]]


def test_modules_over_the_size_cap_stay_behind_with_a_warning_and_a_clear_load_error(shipped):
    root = shipped["root"]
    _serialize(shipped["client"], root / "out-capped", cap="10")
    warned = (root / "out-capped" / "warnings.txt").read_text()
    assert "helper_a" in warned and "MAX_SHIPPED_MODULE_BYTES" in warned
    [(state, message)] = _run_worker(shipped["worker"], root / "out-capped" / "via_name.code")
    assert state == "error" and "ModuleNotFoundError" in message and "helper_a" in message


def test_published_functions_and_methods_carry_the_user_modules_they_reach(tmp_path, monkeypatch):
    """Servable.from_function and from_method use the same discovery: a package's __init__ and a
    transitive import travel too, and the servable loads once the user's files are out of reach."""
    from dlhub.endpoint.servables import load_package
    from dlhub.executor.servable import Servable
    from dlhub.protocol.serialize import user_modules
    from dlhub.protocol.servable import pack_package

    tag = uuid.uuid4().hex[:8]
    pkg, dep = f"umpkg_{tag}", f"umdep_{tag}"
    _write(
        tmp_path / "src",
        {
            f"{pkg}/__init__.py": "from .model import Model, predict\n",
            f"{pkg}/model.py": (
                f"import {dep}\n\nclass Model:\n    def __init__(self, k):\n        self.k = k\n\n"
                f"    def run(self, x):\n        return {dep}.offset(self.k * x)\n\n"
                f"def predict(x):\n    return {dep}.offset(x)\n"
            ),
            f"{dep}.py": "def offset(x):\n    return x + 1000\n",
        },
    )
    monkeypatch.setenv("DLHUB_SERVABLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "src"), *sys.path])
    names = (pkg, f"{pkg}.model", dep)
    try:
        module = importlib.import_module(pkg)
        meta = {"title": "t", "authors": ["Doe, Jane"]}
        method = Servable.from_method(module.Model(2), "run", name="m", **meta)
        assert method.files[f"{pkg}/__init__.py"].decode().startswith("from .model import")
        assert {f"{pkg}/model.py", f"{dep}.py"} <= set(method.files)
        function = Servable.from_function(module.predict, name="f", **meta)
        shipped = user_modules(pickle.dumps(module.predict), module.predict.__module__)
        assert [(n, p) for n, _, p in shipped] == [(pkg, True), (dep, False), (f"{pkg}.model", False)]
        sys.path.remove(str(tmp_path / "src"))  # from here on only the servables' own copies import
        for servable, expected in ((function, 1005), (method, 1010)):
            for name in names:
                sys.modules.pop(name, None)
            record = {**servable.record, "owner": "jane", "version": 1}
            loaded = load_package(pack_package(record, servable.files, []))
            assert loaded(5) == expected
    finally:
        for name in names:
            sys.modules.pop(name, None)
