"""Check a built wheel: it holds weakseg/_C, and that module registers CPU (and,
when built with CUDA, CUDA) kernels for every op; it holds every committed toy-world weight file
and not the test-only CUDA emulator weakseg/_C_emu. Unpacked into a scratch dir
and imported from there, against the torch of the running interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "pysrc" / "weakseg" / "toy" / "weights"

PROBE = r"""
import sys, torch
import weakseg, weakseg.ops.extension as ext
from weakseg.ops import OPS
assert weakseg.__file__.startswith(sys.argv[1]), weakseg.__file__
assert ext.HAS_EXT, ext.extension_error()
need = ["CPU"] + (["CUDA"] if sys.argv[2] == "1" else [])
missing = [(op, key) for op in OPS for key in need
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg::{op}", key)]
assert not missing, f"ops without kernels: {missing}"
print("wheel ok:", weakseg.__file__, "kernels:", ", ".join(need), "for", ", ".join(OPS),
      "| built with CUDA:", ext.built_with_cuda())
"""


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_wheel.py WHEEL", file=sys.stderr)
        return 2
    wheel = sys.argv[1]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        so = [n for n in names if n.startswith("weakseg/_C") and n.endswith(".so")]
        if not so:
            print(f"{wheel}: no weakseg/_C*.so inside", file=sys.stderr)
            return 1
        emu = [n for n in names if n.startswith("weakseg/_C_emu")]
        if emu:  # the CUDA emulator build is a test tool of editable checkouts (CMakeLists.txt)
            print(f"{wheel}: the test-only CUDA emulator is in the wheel: {emu}", file=sys.stderr)
            return 1
        want = sorted("weakseg/toy/weights/" + p.relative_to(WEIGHTS).as_posix()
                      for p in WEIGHTS.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"))
        lost = [n for n in want if n not in names]
        if lost:
            print(f"{wheel}: toy-world weight files missing from the wheel: {lost}", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as d:
            z.extractall(d)
            want_cuda = "1" if os.environ.get("CUDA_HOME") and os.path.exists(
                os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")) else "0"
            # -S: no site processing, so an editable install of weakseg in this environment
            # cannot shadow the unpacked wheel; torch comes from site-packages on the path.
            site = sysconfig.get_paths()["purelib"]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([d, site]))
            return subprocess.call([sys.executable, "-S", "-c", PROBE, d, want_cuda], env=env, cwd=d)


if __name__ == "__main__":
    sys.exit(main())
