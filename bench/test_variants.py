"""The test suite under other code generation (issue 20): XLA flags that change instruction sets,
fusion and reduction order, and other simulated device counts, each in its own pytest process
with its own empty compilation cache (a shared one would hand a variant another's programs).

    python bench/test_variants.py                              # every variant, the whole suite
    python bench/test_variants.py --variants=sse4_2,devices4 -- tests/test_ldu.py

Per variant: its flags, passed / failed / skipped, the wall time, and the largest share of its
tolerance that any float32 comparison used (tests/numerics.py; 1.0 is the limit) with that
comparison's test; failed tests are listed below the table. Prints one markdown table.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (XLA_FLAGS added to the device count, LDU_JAX_TEST_DEVICES)
VARIANTS = {
    "default": ("", "8"),
    "sse4_2": ("--xla_cpu_max_isa=SSE4_2", "8"),        # no FMA, 128-bit vectors
    "avx": ("--xla_cpu_max_isa=AVX", "8"),              # 256-bit vectors, no FMA
    "no_fusion": ("--xla_disable_hlo_passes=fusion", "8"),   # every op its own kernel: no FMA across ops
    "fast_math": ("--xla_cpu_enable_fast_math=true --xla_cpu_fast_math_honor_nans=true "
                  "--xla_cpu_fast_math_honor_infs=true", "8"),   # reassociated sums, approximate functions
    "devices4": ("", "4"),
}


def run(name, pytest_args, workdir):
    flags, devices = VARIANTS[name]
    log = os.path.join(workdir, f"{name}.f32.jsonl")
    env = dict(os.environ, XLA_FLAGS=flags, LDU_JAX_TEST_DEVICES=devices, LDU_JAX_TEST_F32_LOG=log,
               LDU_JAX_TEST_CACHE=os.path.join(workdir, f"{name}.cache"), PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(os.path.join(workdir, f"{name}.log"), "w") as out:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *pytest_args], cwd=ROOT,
                       env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = open(os.path.join(workdir, f"{name}.log")).read()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text.splitlines()[-1])}
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    worst = max(rows, key=lambda r: r["ratio"], default=None)
    return dict(name=name, flags=flags, devices=devices, wall=wall, failures=failures, worst=worst,
                **{k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default="", help="logs and caches (default: a new temporary folder)")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (default: the whole suite)")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ldu_test_variants_")
    os.makedirs(workdir, exist_ok=True)
    print(f"logs and caches in {workdir}", flush=True)
    results = []
    for name in args.variants.split(","):
        results.append(run(name, args.pytest_args, workdir))
        r = results[-1]
        print(f"{name}: {r['passed']} passed, {r['failed'] + r['error']} failed, {r['wall'] / 60:.1f} min", flush=True)
    print("\n| variant | XLA_FLAGS | devices | passed | failed | skipped | wall min | max diff / tol | at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["worst"] or {"ratio": float("nan"), "test": ""}
        print(f"| {r['name']} | `{r['flags'] or '-'}` | {r['devices']} | {r['passed']} | {r['failed'] + r['error']} "
              f"| {r['skipped']} | {r['wall'] / 60:.1f} | {w['ratio']:.3f} | {w['test'].split('::')[-1]} |")
    for r in results:
        for t in r["failures"]:
            print(f"{r['name']}: FAILED {t}")


if __name__ == "__main__":
    main()
