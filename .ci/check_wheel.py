"""Import every public module of the built wheel with none of the optional extras importable.

Usage: python .ci/check_wheel.py DIST_DIR   (DIST_DIR holds the wheel built by `python -m build`)
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXTRAS = ("matplotlib", "tensorboard", "tqdm", "timm", "lightning", "skimage", "webdataset", "datasets")

wheel = next(Path(sys.argv[1]).glob("densecontrast-*.whl"))
target = tempfile.mkdtemp()
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, str(wheel)],
               check=True)
sys.path.insert(0, target)
for name in EXTRAS:
    sys.modules[name] = None  # type: ignore[assignment]  # any import of an extra now fails
import densecontrast  # noqa: E402

assert Path(densecontrast.__file__).is_relative_to(target), densecontrast.__file__
names = [m.name for m in pkgutil.walk_packages(densecontrast.__path__, "densecontrast.")]
for name in names:
    importlib.import_module(name)
print(f"wheel {wheel.name}: {len(names)} modules import without {', '.join(EXTRAS)}")
