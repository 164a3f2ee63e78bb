"""A compiler cache for the install tests' two builds of reattn._C (tests/_install_run.py), as ``CXX``.

The editable install and the wheel built from the source distribution compile the same sources in the
same folder, one after the other. The second build would repeat ~400 CPU-s of C++ compiles (torch's
headers) to produce the same objects; through this wrapper each compile is keyed by its preprocessed
source and its whole command line (as ccache's preprocessor mode does) and the second build copies the
first's objects. It still preprocesses every source from the sdist's own files, so a header the sdist
lacks fails the build as it would without the cache.

``write_launcher`` writes the executable that ``CXX`` names: it runs ``main`` with the cache folder, the
compiler it stands for and the options it adds at the end of each compile's command line (last, so that they
override the build's own: the install tests' ``-O1``). A command without ``-c`` (a link, ``-v``) runs the real
compiler unchanged. Hits and misses are appended to the folder's ``log``.
"""
import hashlib
import os
import shutil
import subprocess
import sys


def _option_value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def _without(args, flags_with_value, flags):
    """``args`` less each flag in ``flags`` and each flag in ``flags_with_value`` with the value after it."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags_with_value:
            skip = True
        elif a not in flags:
            kept.append(a)
    return kept


def main(cache: str, real: str, args: list, extra=()) -> int:
    if "-c" not in args or "-o" not in args:
        return subprocess.call([real, *args])
    args = [*args, *extra]  # part of the key below, as any option
    out, dep = _option_value(args, "-o"), _option_value(args, "-MF")
    preprocess = _without(args, ("-o", "-MF"), ("-c", "-MMD", "-MD")) + ["-E"]
    pre = subprocess.run([real, *preprocess], capture_output=True)
    if pre.returncode != 0:  # the compile reports the error itself
        return subprocess.call([real, *args])
    key = hashlib.sha256()
    key.update(pre.stdout)
    # The command line less where it writes (an object does not hold its own path: the builds use -g0).
    key.update("\0".join(_without(args, ("-o", "-MF"), ())).encode())
    entry = os.path.join(cache, key.hexdigest()[:40])
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "log"), "a") as log:
        if os.path.exists(entry + ".o"):
            shutil.copyfile(entry + ".o", out)
            if dep:
                with open(entry + ".d") as f:
                    old_out, text = f.readline().rstrip("\n"), f.read()
                with open(dep, "w") as f:
                    f.write(text.replace(old_out, out, 1))
            log.write(f"hit {out}\n")
            return 0
        rc = subprocess.call([real, *args])
        if rc == 0:
            shutil.copyfile(out, entry + ".o.tmp")
            os.replace(entry + ".o.tmp", entry + ".o")
            if dep:
                with open(dep) as f, open(entry + ".d", "w") as g:
                    g.write(out + "\n" + f.read())
            log.write(f"miss {out}\n")
        return rc


def write_launcher(cache: str, real: str, path: str, extra=()) -> str:
    """An executable at ``path`` that compiles through the cache at ``cache``, standing for ``real``, with the
    options ``extra`` appended to each compile."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {here!r})\nimport _compile_cache\n"
                f"sys.exit(_compile_cache.main({cache!r}, {real!r}, sys.argv[1:], {list(extra)!r}))\n")
    os.chmod(path, 0o755)
    return path

