"""What a unit's `import_s` is made of (issue 14, item 9): the fork server has preloaded tasks.unit.PRELOAD (torch,
transformers, accelerate, numpy); each unit then imports transformers' modeling code, which imports the quantization
libraries installed (torchao, hqq, ...), which may initialise CUDA (why it is never preloaded). In a fresh process
that has imported PRELOAD, as the fork server has:
- the seconds of `from transformers import AutoModelForCausalLM, AutoTokenizer` (what a row's import_s times) and of
  `import transformers.modeling_utils` after it (what from_pretrained imports first, inside load_s), with Python's
  -X importtime: the modules that cost most (cumulative, and their own);
- for each candidate module (the heavy parts of that import), its seconds, whether importing it alone (after
  PRELOAD) initialises torch's CUDA state, and (where there is a GPU) whether a child forked after it can still use
  the GPU: those that pass both could be preloaded by the fork server.

  python bench/import_cost.py [--top 25] [--candidates MODULE ...] [--own-process]
  PYTORCH_NVML_BASED_CUDA_CHECK=1 python bench/import_cost.py ...   (torch asks NVML whether there is a GPU instead of
                                                            the CUDA driver's cuInit, which no forked child survives)
  QSWEEP_PRELOAD=$(python bench/import_cost.py --safe import-cost.json) python bench/unit_overhead.py ...
                                                            (the fork server preloads them too; tasks/unit.py leaves
                                                            out the quantization libraries whatever the probe said)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what transformers.modeling_utils pulls in beyond PRELOAD, heaviest first on the CPU machine (torch's own compiler and
# distributed-tensor code, their pure-Python dependencies, then the quantization libraries themselves)
CANDIDATES = ["os",  # the control: PRELOAD alone
              "torch.distributed.tensor", "torch._dynamo", "torch._inductor.compile_fx", "torch._inductor.lowering",
              "sympy", "networkx", "hqq.core.quantize", "torchao", "bitsandbytes", "optimum.quanto", "gptqmodel",
              "transformers.cache_utils", "transformers.modeling_utils"]
PRELOAD = "import tasks.unit as U\nU.import_preload()\n"
# --own-process: as a unit's own process sees transformers (tasks.engines.hf.own_process: torchao and hqq hidden)
OWN_PROCESS = "from tasks import engines\nengines.own_process('hf', set())\n"


def importtime(top: int, first: str = "") -> dict:
    code = PRELOAD + first + (
        "import time, sys; before = set(sys.modules); sys.stderr.write('MARK\\n'); sys.stderr.flush()\n"
        "t = time.perf_counter()\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"  # what import_s times
        "t1 = time.perf_counter()\n"
        "import transformers.modeling_utils\n"  # what from_pretrained imports next (in load_s)
        "import torch; print('IMPORT', t1 - t, time.perf_counter() - t1, torch.cuda.is_initialized(), "
        "sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("IMPORT")), None)
    if line is None:
        return {"error": r.stderr[-1500:]}
    _, secs, secs_modeling, cuda, pkgs = line.split(" ", 4)
    rows = []
    for ln in r.stderr.partition("MARK\n")[2].splitlines():
        if ln.startswith("import time:") and "|" in ln and "self [us]" not in ln:
            own, cum, name = ln[len("import time:"):].split("|")
            rows.append((int(cum), int(own), name.strip()))
    new = set(eval(pkgs))  # noqa: S307 - our own print of a sorted list of names
    return {"import_s": float(secs), "modeling_utils_s": float(secs_modeling), "cuda_initialized": cuda == "True",
            "new_packages": sorted(new),
            "top_cumulative_ms": [(n, round(c / 1e3)) for c, _, n in sorted(rows, reverse=True)[:top]],
            "top_own_ms": [(n, round(o / 1e3)) for _, o, n in sorted(rows, key=lambda x: -x[1])[:top]]}


FORKED_CHILD_USES_GPU = """
import os, torch
pid = os.fork()
if pid == 0:
    try:
        torch.zeros(1, device="cuda:0").add_(1); torch.cuda.synchronize(); os._exit(0)
    except Exception as exc:
        print("CHILD", type(exc).__name__, str(exc)[:200], flush=True); os._exit(3)
_, status = os.waitpid(pid, 0)
print("FORK", os.waitstatus_to_exitcode(status) == 0)
"""


# what a fork of a process this size costs its parent (a unit's fork from the fork server: 0.85-1.5 s for a second
# unit on the H200 hosts of 11-30e/j and 12-01, against milliseconds on the CPU machine): the parent's time in
# os.fork() and its resident memory then
FORK_COST = """
import os, resource
t = time.perf_counter(); pid = os.fork()
if pid == 0: os._exit(0)
print('F', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); os.waitpid(pid, 0)
"""


def initialises_cuda(package: str, first: str = "") -> dict:
    """Import the module after PRELOAD, then fork as the fork server does: can the child still use the GPU? (torch's
    is_initialized() does not see the driver's cuInit, which a CUDA availability check makes and fork cannot survive.)"""
    code = PRELOAD + first + (
        f"import time, torch; t = time.perf_counter(); import {package}\n"
        "print('R', time.perf_counter() - t, torch.cuda.is_initialized())\n"
        + FORK_COST
        + "if __import__('shutil').which('nvidia-smi'):\n"
        + "".join("    " + ln + "\n" for ln in FORKED_CHILD_USES_GPU.strip().splitlines()))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("R ")), None)
    if line is None:
        return {"package": package, "error": r.stderr.strip().splitlines()[-1:]}
    _, secs, cuda = line.split()
    fork = next((ln.split()[1] == "True" for ln in r.stdout.splitlines() if ln.startswith("FORK ")), None)
    child = next((ln[6:] for ln in r.stdout.splitlines() if ln.startswith("CHILD ")), None)
    fork_s, rss_kb = next((ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("F ")), (None, None))
    return {"package": package, "import_s": round(float(secs), 2), "cuda_initialized": cuda == "True",
            "fork_ms": round(float(fork_s) * 1e3, 1) if fork_s else None,
            "peak_rss_mb": round(int(rss_kb) / 1024) if rss_kb else None,
            "forked_child_uses_gpu": fork, **({"child_error": child} if child else {})}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES)
    ap.add_argument("--safe", metavar="JSON", help="print the candidates of an earlier run that a forked child "
                    "survived, comma-separated (for QSWEEP_PRELOAD), and exit")
    ap.add_argument("--own-process", action="store_true", help="hide torchao and hqq from transformers first, as in "
                    "a unit's own process whose precision uses neither")
    a = ap.parse_args()
    if a.safe:
        found = json.loads(Path(a.safe).read_text()).get("candidates", [])
        print(",".join(c["package"] for c in found if c.get("forked_child_uses_gpu") and not c.get("cuda_initialized")
                       and c["package"] != "os"))
        return 0
    first = OWN_PROCESS if a.own_process else ""
    out = {"nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK", ""), "own_process": a.own_process,
           **importtime(a.top, first)}
    out["candidates"] = [initialises_cuda(m, first) for m in a.candidates]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
