"""What sqlglot makes of the SQL files, kept between processes.

Parsing the migration and view files (and importing sqlglot to do it) is most of the time the project's
definitions take to load: about 0.2 s, which every Dagster run pays again in its new process (the launch
cost in docs/benchmarks.md). The results are pickled in `.cache/` at the project root under a key made of
every input: the SQL files (names and contents), this package's Python source, Python's and sqlglot's
versions. Changing any of them makes a new key, so a stale result is never read. A cache file that cannot
be read or written is ignored and the files are parsed as before.

Only this project writes `.cache/`, beside its own source: whoever can write there can change the code.
"""

import hashlib
import importlib.util
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from analytics_views.paths import PROJECT_ROOT

CACHE_DIR = PROJECT_ROOT / ".cache"
PACKAGE_DIR = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def cache_key(name: str, files: Iterable[Path]) -> str:
    digest = hashlib.sha256(f"{name}\0{sys.version}".encode())
    # sqlglot's version file, found without importing sqlglot (importing it is part of what the cache saves).
    sqlglot_version = Path(importlib.util.find_spec("sqlglot").origin).parent / "_version.py"
    for path in [sqlglot_version, *sorted(PACKAGE_DIR.rglob("*.py")), *sorted(files)]:
        digest.update(b"\0" + str(path.resolve()).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:32]


def cached(name: str, files: Iterable[Path], compute: Callable[[], T]) -> T:
    """compute()'s result for these input files: from the cache when they are unchanged, else computed and kept.

    Errors from compute() (a malformed SQL file) are never cached: they are raised each time, as without it.
    """
    path = CACHE_DIR / f"{name}-{cache_key(name, files)}.pickle"
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # missing, unreadable or damaged: parse again and write it anew
        pass
    value = compute()
    try:
        CACHE_DIR.mkdir(exist_ok=True)
        for stale in CACHE_DIR.glob(f"{name}-*.pickle"):
            stale.unlink(missing_ok=True)
        with tempfile.NamedTemporaryFile(dir=CACHE_DIR, prefix=f".{name}-", delete=False) as file:
            pickle.dump(value, file)
        os.replace(file.name, path)  # readers see the old file or the whole new one
    except OSError:
        pass
    return value
