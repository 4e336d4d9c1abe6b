"""Build the tiny bundled demo corpus (data/demo/) from the Python standard library's docstrings.

Why docstrings: no dataset can be downloaded here, and they are real English prose on many
topics, redistributable under the PSF license. Records look like RefinedWeb's ({"content", "url"}).
The committed files were made with Python 3.11.7; another Python version gives other texts.

    python tools/make_demo_corpus.py data/demo
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import sys
from pathlib import Path

MODULES = [
    "json",
    "csv",
    "gzip",
    "zipfile",
    "tarfile",
    "sqlite3",
    "argparse",
    "logging",
    "pathlib",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "decimal",
    "fractions",
    "datetime",
    "calendar",
    "textwrap",
    "difflib",
    "string",
    "re",
    "unittest",
    "doctest",
    "threading",
    "multiprocessing",
    "subprocess",
    "socket",
    "ssl",
    "email",
    "http.client",
    "urllib.request",
    "xml.etree.ElementTree",
    "html",
    "shutil",
    "tempfile",
    "glob",
    "fnmatch",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "struct",
    "codecs",
    "io",
    "os",
    "time",
    "sched",
    "queue",
    "asyncio",
    "contextlib",
    "abc",
    "dataclasses",
    "enum",
    "typing",
    "copy",
    "pickle",
    "shelve",
    "dbm",
    "zlib",
    "bz2",
    "lzma",
    "configparser",
    "tomllib",
    "pprint",
    "reprlib",
    "weakref",
    "gc",
    "inspect",
    "dis",
    "ast",
    "tokenize",
    "traceback",
    "warnings",
    "operator",
    "math",
    "cmath",
    "array",
    "mmap",
    "signal",
    "selectors",
    "locale",
    "gettext",
    "uuid",
    "ipaddress",
    "wave",
    "colorsys",
    "turtle",
    "timeit",
    "trace",
    "pdb",
    "profile",
    "cProfile",
    "venv",
    "zipapp",
    "platform",
    "errno",
    "getpass",
    "curses",
    "sysconfig",
    "builtins",
]
MIN_CHARS = 300


def documents() -> list[dict[str, str]]:
    docs = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [(name, mod)] + [
            (f"{name}.{attr}", obj)
            for attr, obj in sorted(vars(mod).items())
            if not attr.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", "") == mod.__name__
        ]
        for qual, obj in objs:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= MIN_CHARS:
                url = f"https://docs.python.org/3/library/{name}.html#{qual}"
                docs.append({"content": doc, "url": url})
    return docs


def main(out: str) -> None:
    docs = documents()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    with open(folder / "part-0000.jsonl", "w", encoding="utf-8") as fh:
        for d in docs[:half]:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    with gzip.GzipFile(folder / "part-0001.jsonl.gz", "wb", mtime=0) as gz:
        for d in docs[half:]:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{len(docs)} documents, {sum(len(d['content']) for d in docs)} characters -> {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
