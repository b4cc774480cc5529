"""Is a mini-world as vulnerable as Stable Diffusion? The calibration measurements and gates
(``ldu_jax/evaluate/calibrate.py`` says what each part measures).

    python -m ldu_jax.cli.calibrate --workdir=runs/calibrate [--models=DIR] [--parts=...]
"""
import os

from absl import flags

from ldu_jax import cli, files
from ldu_jax.evaluate import calibrate
from ldu_jax.miniworld import MODELS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "where subjects, attack runs and calibrate.json go", required=True)
flags.DEFINE_string("models", MODELS, "the world's models (sd/, identity/)")
flags.DEFINE_string("parts", ",".join(calibrate.PARTS), "comma-separated subset of " + ",".join(calibrate.PARTS))
flags.DEFINE_integer("subjects", 4, "held-out subjects")
flags.DEFINE_integer("attack_steps", 200, "DreamBooth steps (imprint, gates)")
flags.DEFINE_integer("encoder_steps", 200, "PhotoGuard PGD steps (published: 1000)")
flags.DEFINE_string("gate_settings", ",".join(calibrate.GATE_SETTINGS),
                    "the purifications the gates run (the evaluation caches each cell: a later run with more "
                    "extends the same work dir)")
flags.DEFINE_bool("redo", False, "recompute parts already in calibrate.json")
flags.DEFINE_string("vae_run", "", "instead: the encoder attack at each checkpoint of this train_vae work dir")
flags.DEFINE_enum("style", "v2", ["v1", "v2"], "the portraits --vae_run attacks")


def _main(argv):
    del argv
    f = FLAGS
    if f.vae_run:
        rows = calibrate.encoder_along_run(f.vae_run, f.style, steps=f.encoder_steps)
        os.makedirs(f.workdir, exist_ok=True)
        files.write_json(os.path.join(f.workdir, "encoder_along_run.json"), rows)
        return
    res = calibrate.calibrate(f.workdir, f.models, tuple(p for p in f.parts.split(",") if p), f.subjects,
                              f.attack_steps, f.encoder_steps, f.redo,
                              tuple(s for s in f.gate_settings.split(",") if s))
    print(calibrate.report(res))


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
