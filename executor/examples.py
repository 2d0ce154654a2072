"""The example servables that ``dlhub up`` publishes in the background once it is ready, under
their own owner ``examples`` (``examples/noop``, ...), so they never share a name with a user's.

    noop                     a function that returns its argument unchanged (the latency floor)
    composition-featurizer   "Fe2O3" -> 8 numeric features from an element table
    composition-rf           RandomForestRegressor on those features (toy target: mean atomic
                             mass per atom, computed from the same table; it never sees masses)
    diabetes-rf              RandomForestRegressor trained on scikit-learn's diabetes data set
                             (vectorized: one call = one patient; the endpoint batches calls)
    digits-cnn               a small PyTorch CNN trained on scikit-learn's 8x8 digits (TorchScript)
    composition-pipeline     composition-featurizer -> composition-rf, in one trip

Models are trained here at build time, with fixed seeds, on data that scikit-learn ships (no
download). Each example's outputs are recorded from the trained model, so verification on the
endpoint checks that the model loads and computes the same thing there. A version already
published by the same dlhub release is not published again. The admin token of ``dlhub up``
publishes them for the owner ``examples`` (an admin may publish for another owner), so the
admin's own ``admin/composition-featurizer`` starts at version 1 and the example pipeline keeps
pinning the example featurizer. Run by hand: ``python -m dlhub.executor.examples [--home H]``; it
logs what it does and exits non-zero if any example failed.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("dlhub.examples")

EXAMPLES_REVISION = 2  # bump when an example changes: `dlhub up` publishes a new version of it
OWNER = "examples"  # the owner the examples are published for (never a user's own namespace)
AUTHORS = [{"name": "dlhub developers", "affiliation": "dlhub"}]

# symbol: (atomic number, Pauling electronegativity, standard atomic weight)
ELEMENTS: dict[str, tuple[int, float, float]] = {
    "H": (1, 2.20, 1.008), "Li": (3, 0.98, 6.94), "Be": (4, 1.57, 9.012), "B": (5, 2.04, 10.81),
    "C": (6, 2.55, 12.011), "N": (7, 3.04, 14.007), "O": (8, 3.44, 15.999), "F": (9, 3.98, 18.998),
    "Na": (11, 0.93, 22.990), "Mg": (12, 1.31, 24.305), "Al": (13, 1.61, 26.982),
    "Si": (14, 1.90, 28.085), "P": (15, 2.19, 30.974), "S": (16, 2.58, 32.06),
    "Cl": (17, 3.16, 35.45), "K": (19, 0.82, 39.098), "Ca": (20, 1.00, 40.078),
    "Sc": (21, 1.36, 44.956), "Ti": (22, 1.54, 47.867), "V": (23, 1.63, 50.942),
    "Cr": (24, 1.66, 51.996), "Mn": (25, 1.55, 54.938), "Fe": (26, 1.83, 55.845),
    "Co": (27, 1.88, 58.933), "Ni": (28, 1.91, 58.693), "Cu": (29, 1.90, 63.546),
    "Zn": (30, 1.65, 65.38), "Ga": (31, 1.81, 69.723), "Ge": (32, 2.01, 72.630),
    "As": (33, 2.18, 74.922), "Se": (34, 2.55, 78.971), "Br": (35, 2.96, 79.904),
    "Rb": (37, 0.82, 85.468), "Sr": (38, 0.95, 87.62), "Y": (39, 1.22, 88.906),
    "Zr": (40, 1.33, 91.224), "Nb": (41, 1.6, 92.906), "Mo": (42, 2.16, 95.95),
    "Ag": (47, 1.93, 107.87), "Cd": (48, 1.69, 112.41), "In": (49, 1.78, 114.82),
    "Sn": (50, 1.96, 118.71), "Sb": (51, 2.05, 121.76), "Te": (52, 2.1, 127.60),
    "I": (53, 2.66, 126.90), "Cs": (55, 0.79, 132.91), "Ba": (56, 0.89, 137.33),
    "La": (57, 1.10, 138.91), "W": (74, 2.36, 183.84), "Pt": (78, 2.28, 195.08),
    "Au": (79, 2.54, 196.97), "Pb": (82, 2.33, 207.2), "Bi": (83, 2.02, 208.98),
}  # fmt: skip

FEATURES = [
    "elements", "atoms", "mean_Z", "min_Z", "max_Z", "range_Z", "mean_electronegativity",
    "range_electronegativity",
]  # fmt: skip


def noop(x=None):
    """Returns its argument: what a call costs with nothing to compute."""
    return x


def parse_formula(formula: str) -> dict[str, float]:
    """ "Fe2O3" -> {"Fe": 2.0, "O": 3.0} (no parentheses or hydrates)."""
    if not isinstance(formula, str) or not formula.strip():
        raise ValueError(f"a formula is a non-empty string like 'Fe2O3', got {formula!r}")
    parts = re.findall(r"([A-Z][a-z]?)(\d*\.?\d*)", formula.strip())
    if "".join(e + n for e, n in parts) != formula.strip():
        raise ValueError(f"cannot parse formula {formula!r}: use element symbols and counts, like 'Fe2O3'")
    counts: dict[str, float] = {}
    for element, count in parts:
        if element not in ELEMENTS:
            raise ValueError(f"unknown or unsupported element {element!r} in {formula!r}")
        counts[element] = counts.get(element, 0.0) + (float(count) if count else 1.0)
    return counts


def featurize(formula: str) -> list[float]:
    """Composition features of a formula (see FEATURES), fraction-weighted where it matters."""
    counts = parse_formula(formula)
    total = sum(counts.values())
    z = {e: ELEMENTS[e][0] for e in counts}
    en = {e: ELEMENTS[e][1] for e in counts}
    mean_z = sum(z[e] * n for e, n in counts.items()) / total
    mean_en = sum(en[e] * n for e, n in counts.items()) / total
    return [
        float(len(counts)),
        float(total),
        round(mean_z, 6),
        float(min(z.values())),
        float(max(z.values())),
        float(max(z.values()) - min(z.values())),
        round(mean_en, 6),
        round(max(en.values()) - min(en.values()), 6),
    ]


def mean_atomic_mass(formula: str) -> float:
    counts = parse_formula(formula)
    return sum(ELEMENTS[e][2] * n for e, n in counts.items()) / sum(counts.values())


def _binary_formulas(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    symbols = sorted(ELEMENTS)
    out = []
    for _ in range(count):
        a, b = rng.sample(symbols, 2)
        out.append(f"{a}{rng.randint(1, 4)}{b}{rng.randint(1, 4)}")
    return out


# ---- the builds --------------------------------------------------------------------------------


def build_noop():
    from .servable import Servable

    return Servable.from_function(
        noop,
        name="noop",
        title="No-op: returns its input",
        description="Measures what a call costs when there is nothing to compute.",
        authors=AUTHORS,
        keywords=["benchmark", "latency", "no-op"],
        domains=["testing"],
        examples=[((42,), 42), (("hello",), "hello")],
        deterministic=True,
    )


def build_featurizer():
    from .servable import Servable

    return Servable.from_function(
        featurize,
        name="composition-featurizer",
        title="Composition featurizer: formula to numeric features",
        description="Eight features of a chemical formula from an element table: number of "
        "elements and atoms, statistics of atomic number and Pauling electronegativity.",
        authors=AUTHORS,
        domains=["materials"],
        keywords=["featurizer", "composition", "chemistry"],
        inputs=[{"type": "string", "description": "formula such as Fe2O3"}],
        output={"type": "list", "description": ", ".join(FEATURES), "item_type": {"type": "number"}},
        examples=[(("NaCl",), featurize("NaCl")), (("Fe2O3",), featurize("Fe2O3"))],
        deterministic=True,
    )


def build_composition_rf():
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    from .servable import Servable

    formulas = _binary_formulas(1500)
    x = np.array([featurize(f) for f in formulas])
    y = np.array([mean_atomic_mass(f) for f in formulas])
    model = RandomForestRegressor(n_estimators=50, random_state=0).fit(x, y)
    probe = np.array([featurize("NaCl"), featurize("Fe2O3")])
    return Servable.from_sklearn(
        model,
        name="composition-rf",
        title="Random forest: mean atomic mass from composition features",
        description="A toy regressor for the pipeline example: trained on 1,500 random binary "
        "formulas to predict the mean atomic mass per atom (computed from the element table) "
        "from composition-featurizer's features, which do not include masses.",
        authors=AUTHORS,
        domains=["materials"],
        keywords=["random forest", "regression", "composition"],
        inputs=[{"type": "ndarray", "shape": [None, len(FEATURES)], "dtype": "float64"}],
        output={"type": "ndarray", "shape": [None], "dtype": "float64"},
        examples=[{"args": [probe], "output": model.predict(probe), "rtol": 1e-6}],
        requirements=["scikit-learn", "numpy"],
        deterministic=True,
    )


def build_diabetes_rf(vectorized: bool = True, name: str = "diabetes-rf"):
    """The diabetes random forest. Vectorized: one call is one patient (10 features) and the
    endpoint batches concurrent calls into one ``predict`` (up to 256 rows)."""
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import RandomForestRegressor

    from .servable import Servable

    x, y = load_diabetes(return_X_y=True)
    model = RandomForestRegressor(n_estimators=100, random_state=0).fit(x, y)
    if vectorized:
        interface = {
            "inputs": [{"type": "list", "description": "one patient's 10 features per call"}],
            "output": {"type": "number", "description": "predicted progression"},
            "vectorized": True,
            "batching": {"max_batch_size": 256},
        }
    else:
        interface = {
            "inputs": [{"type": "ndarray", "shape": [None, 10], "dtype": "float64"}],
            "output": {"type": "ndarray", "shape": [None], "dtype": "float64"},
        }
    return Servable.from_sklearn(
        model,
        name=name,
        title="Random forest regressor: diabetes disease progression",
        description="scikit-learn RandomForestRegressor (100 trees) trained on the diabetes data "
        "set shipped with scikit-learn (442 patients, 10 standardized features); predicts a "
        "quantitative measure of disease progression one year after baseline.",
        authors=AUTHORS,
        domains=["medicine"],
        keywords=["random forest", "regression", "scikit-learn", "diabetes"],
        related_identifiers=[
            {"identifier": "10.1214/009053604000000067", "type": "DOI", "relation": "IsDerivedFrom"}
        ],
        examples=[{"args": [x[:3]], "output": model.predict(x[:3]), "rtol": 1e-6}],
        requirements=["scikit-learn", "numpy"],
        deterministic=True,
        **interface,
    )


def build_digits_cnn():
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from .servable import Servable

    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target)

    class DigitsCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16 * 2 * 2, 10)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return torch.softmax(self.fc(x.flatten(1)), dim=1)

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        for start in range(0, len(images), 128):
            batch = slice(start, start + 128)
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(torch.log(model(images[batch]) + 1e-9), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        accuracy = float((scripted(images).argmax(1) == labels).float().mean())
        probe = images[:2]
        expected = scripted(probe).numpy()
    log.info("digits-cnn training accuracy %.3f", accuracy)
    return Servable.from_torch(
        scripted,
        name="digits-cnn",
        title="Small CNN: handwritten digit classifier (8x8)",
        description="Two convolution layers and a linear layer (PyTorch, TorchScript), trained on "
        f"scikit-learn's 8x8 digits scaled to [0, 1] (training accuracy {accuracy:.3f}); returns "
        "class probabilities for digits 0-9.",
        authors=AUTHORS,
        domains=["computer vision"],
        keywords=["cnn", "pytorch", "classification", "digits"],
        inputs=[{"type": "ndarray", "shape": [None, 1, 8, 8], "dtype": "float32"}],
        output={"type": "ndarray", "shape": [None, 10], "dtype": "float32"},
        examples=[{"args": [np.asarray(probe)], "output": expected, "rtol": 1e-4, "atol": 1e-6}],
        requirements=["torch", "numpy"],
        deterministic=True,
    )


def build_pipeline(owner: str):
    from .servable import Servable

    return Servable.pipeline(
        [f"{owner}/composition-featurizer", f"{owner}/composition-rf"],
        name="composition-pipeline",
        title="Pipeline: formula -> features -> mean atomic mass",
        description="composition-featurizer then composition-rf, run at the endpoint in one trip.",
        authors=AUTHORS,
        domains=["materials"],
        keywords=["pipeline", "composition"],
        inputs=[{"type": "string"}],
        output={"type": "number"},
        examples=[],  # filled in by publish_examples from the steps' own outputs
        deterministic=True,
    )


BUILDS: list[tuple[str, Callable[..., Any], str | None]] = [
    ("noop", build_noop, None),
    ("composition-featurizer", build_featurizer, None),
    ("composition-rf", build_composition_rf, "sklearn"),
    ("diabetes-rf", build_diabetes_rf, "sklearn"),
    ("digits-cnn", build_digits_cnn, "torch"),
    ("composition-pipeline", build_pipeline, "sklearn"),
]
EXAMPLE_NAMES = [name for name, _, _ in BUILDS]


def _already_published(client, owner: str, name: str, release: str) -> str | None:
    """``owner/name:v (already published)`` when this release and examples revision published
    its latest ready version, else None (publish it)."""
    from .client import NotFoundError

    try:
        info = client.describe(f"{owner}/{name}")
    except NotFoundError:
        return None
    record, environment = info["record"], info["record"]["environment"]
    if (
        info["status"] == "ready"
        and environment.get("dlhub") == release
        and environment.get("dlhub-examples") == str(EXAMPLES_REVISION)
    ):
        return f"{owner}/{name}:{record['version']} (already published)"
    return None


PROGRESS_FILE = None  # set by main(): $DLHUB_HOME/examples.json, where `dlhub status` reads progress
TRAINED = {"composition-rf", "diabetes-rf", "digits-cnn"}  # built by training a model (slow)


def _report(
    outcome: dict, total: int, current: str | None = None, stage: str = "", done: bool = False
) -> None:
    """Write how publishing goes for `dlhub status` ("examples: 4/6 published, training digits-cnn")."""
    if PROGRESS_FILE is None:
        return
    import json
    import os

    state = {"pid": os.getpid(), "total": total, "outcome": outcome, "current": current, "stage": stage}
    state.update(stage_since=time.time(), finished=done)
    try:
        PROGRESS_FILE.with_suffix(".tmp").write_text(json.dumps(state))
        PROGRESS_FILE.with_suffix(".tmp").replace(PROGRESS_FILE)
    except OSError as exc:
        log.warning("cannot write %s: %s", PROGRESS_FILE, exc)


def publish_examples(
    client, owner: str = OWNER, endpoint: str | None = None, names: Iterable[str] | None = None
) -> dict[str, str]:
    """Build and publish (for ``owner``) each example not yet published by this release: name ->
    ref or why not. ``names``: only these (a pipeline needs its steps among them or published)."""
    import importlib.metadata

    release = importlib.metadata.version("dlhub")
    wanted = set(names) if names is not None else {name for name, _, _ in BUILDS}
    unknown = wanted - {name for name, _, _ in BUILDS}
    if unknown:
        raise ValueError(f"no example named {', '.join(sorted(unknown))} (known: {', '.join(EXAMPLE_NAMES)})")
    outcome: dict[str, str] = {}
    for name, build, needs in BUILDS:
        if name not in wanted:
            continue
        if needs and importlib.util.find_spec(needs) is None:
            outcome[name] = f"skipped: needs {needs} (pip install 'dlhub[examples]')"
            log.info("%s %s", name, outcome[name])
            continue
        reason = _already_published(client, owner, name, release)
        if name == "composition-pipeline" and any(
            outcome.get(step, "").startswith(("skipped", "failed"))
            for step in ("composition-featurizer", "composition-rf")
        ):
            reason = "skipped: its steps were not published"
        if reason is not None:
            outcome[name] = reason
            continue
        started = time.monotonic()
        _report(outcome, len(wanted), name, "training" if name in TRAINED else "building")
        try:
            servable = build(owner) if name == "composition-pipeline" else build()
            if name == "composition-pipeline":
                value = client.run(f"{owner}/composition-rf", [featurize("Fe2O3")], endpoint=endpoint)
                servable.record["examples"] = [{"args": ["Fe2O3"], "output": value[0], "rtol": 1e-6}]
            servable.record["environment"]["dlhub-examples"] = str(EXAMPLES_REVISION)
            _report(outcome, len(wanted), name, "verifying")
            outcome[name] = client.publish(servable, endpoint=endpoint, owner=owner)
            log.info("published %s in %.1f s", outcome[name], time.monotonic() - started)
        except Exception as exc:  # one broken example must not stop the others
            outcome[name] = f"failed: {type(exc).__name__}: {exc}"
            log.error("%s %s", name, outcome[name])
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="publish dlhub's example servables")
    parser.add_argument("--home", help="dlhub home (default $DLHUB_HOME or ~/.dlhub)")
    parser.add_argument("--endpoint", help="endpoint that verifies them (default: the only one)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the REST API")
    args = parser.parse_args(argv)
    global PROGRESS_FILE
    from .config import dlhub_home

    PROGRESS_FILE = dlhub_home(args.home) / "examples.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from .client import Client

    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            client = Client(home=args.home)
            client.whoami()  # reachable, and the token is valid
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                log.error("the manager's REST API is not reachable: %s", exc)
                return 2
            time.sleep(0.5)
    outcome = publish_examples(client, OWNER, args.endpoint)
    _report(outcome, len(outcome), done=True)
    for name, what in outcome.items():
        print(f"{name:24} {what}")
    return 1 if any(v.startswith("failed") for v in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
