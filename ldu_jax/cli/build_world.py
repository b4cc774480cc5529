"""Build the mini-world from nothing: data, then every model, each stage resumable
(``ldu_jax/jobs/build_world.py`` says what each stage makes).

    python -m ldu_jax.cli.build_world --workdir=runs/miniworld [--profile=full|test] [--stages=...] [--install]
        [--set=vae.max_steps=10 ...]
"""
import jax
from absl import flags

from ldu_jax import cli
from ldu_jax.jobs import build_world

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "where the world and its models are built", required=True)
flags.DEFINE_enum("profile", "full", list(build_world.PROFILES), "full: the shipped models; test: tiny, seconds")
flags.DEFINE_string("stages", ",".join(build_world.STAGES), "comma-separated subset of " + ",".join(build_world.STAGES))
flags.DEFINE_multi_string("set", [], "stage.key=value: override a key of a stage's config (e.g. vae.max_steps=10)")
flags.DEFINE_bool("install", False, "copy <workdir>/export into the package (the shipped default models)")


def _main(argv):
    del argv
    build_world.build(FLAGS.workdir, FLAGS.profile, tuple(s for s in FLAGS.stages.split(",") if s),
                      settings=FLAGS.set)
    if FLAGS.install and jax.process_index() == 0:   # across hosts: process 0 copies the files
        print(f"installed the models into {build_world.install(FLAGS.workdir)}")


def main():
    cli.run(_main, multihost=True)   # every stage splits its work across hosts


if __name__ == "__main__":
    main()
