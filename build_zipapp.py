#!/usr/bin/env python3
"""Build a reproducible zipapp, ``dist/ccsync.pyz``, from ``ccsync.py``.

The archive is written by hand with :mod:`zipfile` instead of
:func:`zipapp.create_archive`, because the latter stores file mtimes and so
gives a different archive after every ``touch``.  Here every entry has a fixed
timestamp, mode and compression, and entries are written in sorted order, so
building twice from the same source gives byte-identical output.

Beside the source it carries ``ccsync.pyc``, compiled by the Python that runs
this script, as an unchecked hash-based pyc (PEP 552: no timestamp in it), so
that Python does not compile 300 KB of source on every run.  zipimport takes
the .pyc first; another Python (another magic number) falls back to the source.

Standard library only.  Usage::

    python3 build_zipapp.py [--source PATH] [--output PATH]
"""

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE / "ccsync.py"
DEFAULT_OUTPUT = HERE / "dist" / "ccsync.pyz"

SHEBANG = b"#!/usr/bin/env python3\n"
# The collector is off while the module loads and then told to leave what
# it loaded alone (gc.freeze): those objects live as long as the process, and
# scanning them, during the load and again at exit, was an eighth of a small
# command's time.
# zipimport reads and unmarshals a module's code twice, once only to learn
# its file name (spec_from_loader asks get_filename); the entry gives the
# spec that name, so the 650 KB of bytecode is read once.  The loader still
# falls back to the source on another Python.  argparse's few words stay
# English like the rest of ccsync's: looking each up in gettext (no Python
# ships a catalogue for them) imported locale and cost every command 1 ms.
MAIN_PY = b"""import gc, sys
gc.disable()
import argparse
argparse._ = str
if hasattr(__loader__, "archive"):
    from importlib.machinery import ModuleSpec
    from importlib.util import module_from_spec
    spec = ModuleSpec("ccsync", __loader__, origin=__loader__.archive + "/ccsync.pyc")
    spec.has_location = True
    ccsync = sys.modules["ccsync"] = module_from_spec(spec)
    __loader__.exec_module(ccsync)
else:
    import ccsync
gc.freeze()
gc.enable()
sys.exit(ccsync.main())
"""
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
ARCHIVE_MODE = 0o755


def parse_args(argv):
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="path to ccsync.py (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="archive to write (default: %(default)s)")
    return parser.parse_args(argv)


def archive_entries(source):
    """Return ``{name: bytes}`` for everything that goes into the archive."""
    text = source.read_bytes()
    return {"__main__.py": MAIN_PY, "ccsync.py": text, "ccsync.pyc": bytecode(text)}


# Run in a child with a fixed hash seed: on Python 3.10 the order in which
# marshal writes a set constant follows the (randomised) string hashes.
# no_debug_ranges (3.11+; 3.10 has none) leaves the column ranges out of the
# line tables: an eighth less bytecode for every run to read, and tracebacks
# still name the line, without the ^^^ under the expression.
_COMPILE = (
    "import sys, marshal\n"
    "text = sys.stdin.buffer.read()\n"
    "code = compile(text, 'ccsync.py', 'exec', dont_inherit=True)\n"
    "sys.stdout.buffer.write(marshal.dumps(code))\n")


def bytecode(text):
    """An unchecked hash-based pyc of *text* for the running Python."""
    done = subprocess.run([sys.executable, "-X", "no_debug_ranges", "-c", _COMPILE],
                          input=text, capture_output=True,
                          env={**os.environ, "PYTHONHASHSEED": "0"}, check=True, timeout=300)
    return (importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little")
            + importlib.util.source_hash(text) + done.stdout)


def fixed_info(name):
    """Return a ZipInfo whose metadata does not depend on the build host.

    What every run reads is stored as it is: inflating the bytecode would
    cost each command a few milliseconds, and a deflated ``__main__.py``
    would import zlib for its 100 bytes.  Only the source, read on another
    Python alone, is deflated."""
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".py") and name != "__main__.py" \
        else zipfile.ZIP_STORED
    info.external_attr = FILE_MODE << 16
    info.create_system = 3  # Unix, so the mode bits mean the same everywhere
    return info


def write_archive(fileobj, entries):
    """Write the shebang, then a zip of *entries* in sorted order."""
    fileobj.write(SHEBANG)
    with zipfile.ZipFile(fileobj, "w") as zf:
        for name in sorted(entries):
            zf.writestr(fixed_info(name), entries[name], compresslevel=9)


def build(source, output):
    """Build the archive at *output* atomically (temp file + os.replace)."""
    entries = archive_entries(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".ccsync-", suffix=".pyz.tmp",
                                    dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as fileobj:
            write_archive(fileobj, entries)
        os.chmod(tmp_name, ARCHIVE_MODE)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def sha256_of(path):
    """Return the hex sha256 digest of the file at *path*."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None):
    """Build the zipapp; return a process exit code."""
    args = parse_args(argv)
    if not args.source.is_file():
        print(f"build_zipapp: error: source not found: {args.source}",
              file=sys.stderr)
        return 1
    build(args.source, args.output)
    print(args.output)
    print(f"sha256 {sha256_of(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
