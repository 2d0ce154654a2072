"""setuptools' PEP 517 backend, without the notice every editable install printed.

Our folders (``protocol/``, ``executor/``, ...) install as ``dlhub.*`` through ``package-dir``, so
setuptools makes editable installs with an import finder and then emits an informational
"Editable installation ... be careful with folders in your working directory" warning, which
pip shows for every ``pip install -e .`` of a local directory. It says nothing actionable for
this layout (the folders are not named ``dlhub``), so it is filtered here; every other warning
and every hook is setuptools' own.
"""

from __future__ import annotations

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517/660 hooks, unchanged)
from setuptools.build_meta import __all__  # noqa: F401


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Editable installation", category=UserWarning)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
