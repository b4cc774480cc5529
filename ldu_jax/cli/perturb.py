"""Protect photos against personalization (LDU, or a pixel-space baseline): train ρ, protect folders.

    python perturb.py                                   # demo: the mini-world's models, built-in images -> ./ldu_demo/
    python perturb.py train --config=configs/ldu_tiny.py --workdir=runs/rho [--config.dataset=PATH]
    python perturb.py apply --method=ldu --config=configs/ldu_tiny.py --checkpoint=runs/rho \\
        --input=photos/ --output=protected/
    python perturb.py apply --method=ldu-opt --config=configs/ldu_tiny.py --input=photos/ --output=protected/
    python perturb.py apply --method=aspl --config=configs/protect_aspl_tiny.py --input=photos/ --output=protected/

(``python -m ldu_jax.cli.perturb`` and the ``ldu-perturb`` console script are the same command.)

Baselines (``--method``, each with its ``configs/protect_<method>_{tiny,sd21}.py``; ``sds-`` uses
``protect_sds_minus_*.py``): advdm, aspl, fsmg (Anti-DreamBooth), photoguard (encoder attack), mist,
sds (SDS+), sds- (SDS-), pid. Their budget is L-inf: ``config.eps`` on the [0, 1] scale.

``apply`` writes ``<stem>.png`` at each input's size and ``report.csv``; every written file is read
back and meets the budget (LDU: pixel MSE; baselines: L-inf; the perturbation is scaled back until
it does). The exit status is 1 when any input file could not be protected.
"""
import sys

from absl import flags

from ldu_jax import cli
from ldu_jax.errors import ConfigError
from ldu_jax.jobs import protect
from ldu_jax.protect import baselines

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "train: work dir for ρ (checkpoints, metrics.jsonl, grids)")
flags.DEFINE_enum("method", "ldu", ["ldu", "ldu-opt", *baselines.METHODS],
                  "apply: protection method (baselines take configs/protect_<method>_*.py)")
flags.DEFINE_string("checkpoint", None, "apply --method=ldu: the ρ work dir made by `train` "
                    "(default: the config's rho_checkpoint)")
flags.DEFINE_string("input", None, "apply: folder of photos to protect (never modified)")
flags.DEFINE_string("output", None, "apply: output folder (must differ from --input)")
cli.define_config("config", "configs/ldu_miniworld.py", "a configs/ldu_*.py file (baselines: configs/protect_*.py)")

DEMO_DIR = "ldu_demo"


def demo(config):
    rows = protect.demo(config, DEMO_DIR)
    for r in rows:
        if not r["error"]:
            print(f"  {r['file']}: PSNR {float(r['psnr']):.2f} dB, SSIM {float(r['ssim']):.4f}, "
                  f"within budget: {r['budget_ok']}")
    print(f"\nWrote {DEMO_DIR}/protected/ (protected images, report.csv) and {DEMO_DIR}/grid.png "
          "(original | protected).\n"
          "How well the mini-world's protection works against Textual Inversion and DreamBooth:\n"
          "  python -m ldu_jax.cli.evaluate --config=configs/eval_miniworld.py --workdir=runs/eval_miniworld\n"
          "For Stable Diffusion, train a shortcut model on its VAE's latents (train.py), then\n"
          "  python perturb.py train --config=configs/ldu_sd15.py --workdir=runs/rho \\\n"
          "      --config.sd=/models/stable-diffusion-v1-5 --config.shortcut=runs/shortcut_sd15 "
          "--config.dataset=/data/faces\n"
          "  python perturb.py apply --method=ldu --config=configs/ldu_sd15.py --checkpoint=runs/rho "
          "--input=photos/ --output=protected/")


def _main(argv):
    config = FLAGS.config
    cmd = argv[1] if len(argv) > 1 else "demo"
    if cmd == "demo":
        demo(config)
    elif cmd == "train":
        if not FLAGS.workdir:
            raise ConfigError("train needs --workdir")
        protect.train_rho(config, FLAGS.workdir)
    elif cmd == "apply":
        if not FLAGS.input or not FLAGS.output:
            raise ConfigError("apply needs --input and --output")
        rows = protect.protect_dir(FLAGS.method, config, FLAGS.checkpoint, FLAGS.input, FLAGS.output)
        failed = [r for r in rows if r["error"] or not r["budget_ok"]]
        print(f"protected {len(rows) - len(failed)} of {len(rows)} files into {FLAGS.output}")
        if failed:
            sys.exit(1)
    else:
        raise ConfigError(f"unknown command {cmd!r}; use train, apply, or nothing for the demo")


MULTIHOST = ("train", "apply")   # the commands that run across hosts (the demo runs in one process)


def main():
    cli.run(_main, multihost=lambda argv: len(argv) > 1 and argv[1] in MULTIHOST)


if __name__ == "__main__":
    main()
