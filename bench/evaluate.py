"""Where an evaluation cell's time goes, and cells per hour, with models and programs shared across
cells (``evaluate.Runner``, one per evaluation, attacks of ``subject_batch`` subjects trained
together, as ``evaluate.run`` does) against one Runner per cell, one subject at a time (models
loaded and every program traced and compiled again for each cell, as before the evaluation shared
them). A batch's seconds and compilation are split evenly over its cells.

    python bench/evaluate.py                                       # eval_tiny, a small grid
    python bench/evaluate.py --config=configs/eval_miniworld.py --subjects=2 --methods=none,advdm

Each (mode, cache) runs in its own process on a fresh work dir: 'none' has no persistent
compilation cache, 'cold' starts an empty one (``cli.enable_compilation_cache``, as the commands
do), 'warm' reuses what 'cold' wrote. Per run: cells per hour of the whole process, the first
cell's seconds and its trace+compile, and for the later cells (mean) their seconds, their
trace+compile (JAX's compile events, whatever phase they fall in) and the wall time of load (SD
for the attacks), protect, purify, train (the attack's steps), generate and metrics, each
including any compilation inside it. Prints one markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("load", "protect", "purify", "train", "generate", "metrics")


def child(args):
    """One (mode, cache) run; prints a JSON list of {cell, seconds, compile, time} rows."""
    import jax

    from ldu_jax import cli
    cli.enable_compilation_cache(args.cache)       # as the commands do ('' : none)
    compile_s = [0.0]
    events = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compile_s.__setitem__(0, compile_s[0] + secs) if name in events else None)
    from ldu_jax import config_file, evaluate
    cfg = config_file.load(args.config)
    cfg.data = f"demo:{args.subjects}" if str(cfg.data).startswith("demo") else f"miniworld:{args.subjects}"
    for key in ("methods", "settings", "attacks"):
        if getattr(args, key):
            setattr(cfg, key, tuple(getattr(args, key).split(",")))
    cells = evaluate.cells_of(cfg, args.workdir)
    # per-cell: a new Runner for every cell, one subject at a time; shared: as evaluate.run does
    groups = ([([s], *rest) for s, *rest in cells] if args.mode == "per-cell"
              else list(evaluate.subject_groups(cells, int(cfg.get("subject_batch", 1)))))
    runner, rows = None, []
    for subjects, *rest in groups:
        if runner is None or args.mode == "per-cell":
            runner = evaluate.Runner(cfg, args.workdir, log=lambda s: None)
        c0, t0 = compile_s[0], time.time()
        out = runner.cells(subjects, *rest)
        for row in out:
            if row["status"] != "done":
                raise SystemExit(f"cell {row['subject']}/{'/'.join(rest)} {row['status']}: {row['reason']}")
            rows.append({"cell": "/".join([row["subject"], *rest]), "seconds": (time.time() - t0) / len(out),
                         "compile": (compile_s[0] - c0) / len(out), "time": row["time"]})
    print("ROWS " + json.dumps(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "eval_tiny.py"))
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--methods", default="none,advdm")
    ap.add_argument("--settings", default="none,jpeg:quality=75")
    ap.add_argument("--attacks", default="ti,dreambooth")
    ap.add_argument("--modes", default="per-cell:none,per-cell:cold,per-cell:warm,shared:cold,shared:warm")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    base = tempfile.mkdtemp(prefix="bench_evaluate_")
    table = []
    for spec in args.modes.split(","):
        mode, cache = spec.split(":")
        cache_dir = "" if cache == "none" else os.path.join(base, f"cache-{mode}")
        workdir = os.path.join(base, f"{mode}-{cache}")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--mode={mode}", f"--cache={cache_dir}",
               f"--workdir={workdir}", f"--config={args.config}", f"--subjects={args.subjects}",
               f"--methods={args.methods}", f"--settings={args.settings}", f"--attacks={args.attacks}"]
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": ""})
        wall = time.time() - t0
        line = [x for x in out.stdout.splitlines() if x.startswith("ROWS ")]
        if out.returncode or not line:
            sys.exit(f"{spec} failed:\n{out.stderr[-3000:]}")
        rows = json.loads(line[0][5:])
        first, rest = rows[0], rows[1:] or rows
        mean = lambda f: sum(f(r) for r in rest) / len(rest)  # noqa: E731
        table.append([spec, len(rows), wall, 3600 * len(rows) / wall, first["seconds"], first["compile"],
                      mean(lambda r: r["seconds"]), mean(lambda r: r["compile"])]
                     + [mean(lambda r, p=p: r["time"].get(p, 0.0)) for p in PHASES])
        print(f"{spec}: {len(rows)} cells in {wall:.0f} s", flush=True)
    print(f"\n{args.config}: {args.subjects} subjects x methods {args.methods} x settings {args.settings} "
          f"x attacks {args.attacks}. Seconds: the first cell, then the mean of the later cells and their split\n")
    print("| mode:cache | cells | process s | cells/hour | first cell | its trace+compile | later cells | "
          "trace+compile | " + " | ".join(PHASES) + " |")
    print("|---" * (8 + len(PHASES)) + "|")
    for r in table:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | " + " | ".join(f"{v:.2f}" for v in r[4:]) + " |")

if __name__ == "__main__":
    main()
