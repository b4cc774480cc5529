"""Evaluation on tiny random models and procedural subjects (CPU, minutes): the smoke test of the
whole protect -> purify -> personalize -> generate -> measure pipeline. Tiny random models
protect nothing and generate noise; the numbers only show the plumbing."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = "demo:2"              # subjects root (<root>/<subject>/set_A,set_B,set_C), 'demo:N' (procedural)
                                   # or 'miniworld:N' (the mini-world's held-out identities)
    c.demo_size = 64               # image size of demo subjects
    c.subjects = ()                # a subset of subject folder names; () = all
    c.reference_sets = ("set_A",)  # the person's clean photos: ISM reference and FID(gen) reference
    c.sd = "tiny"                  # Stable Diffusion used by the attacks, LDU and DiffPure
    c.shortcut = "random"          # LDU's shortcut model (a train.py work dir) and diffpure model=shortcut
    c.methods = ("none", "ldu", "ldu-opt", "advdm", "photoguard", "pid")  # keys of method_configs, or key@variant
    c.method_configs = {"ldu": "configs/ldu_tiny.py", "ldu-opt": "configs/ldu_tiny.py",
                        **{m: f"configs/protect_{m.replace('sds-', 'sds_minus')}_tiny.py"
                           for m in ("advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "sds-", "pid")}}
    c.method_overrides = {"ldu": {"max_steps": 10}, "ldu-opt": {"opt_steps": 4}}
    c.rho_checkpoint = ""          # ldu: a `perturb.py train` work dir; '' trains ρ in <workdir>/rho
    c.rho_dataset = ""             # ρ training images when rho_checkpoint is ''; '' = the method config's
    c.settings = ("none", "jpeg:quality=75", "diffpure:strength=0.1,steps=5")
    c.attacks = ("ti", "dreambooth")
    c.attack_configs = {"ti": "configs/attack_ti_tiny.py", "dreambooth": "configs/attack_db_tiny.py"}
    c.attack_overrides = {"ti": {"max_steps": 20}, "dreambooth": {"max_steps": 20, "num_class_images": 4}}
    c.num_samples = 4              # generated images per validation prompt
    c.cached_only = False          # tabulate the cached cells only (a grid run in parts), run nothing
    c.subject_batch = 4            # subjects whose attacks train as one program (vmapped; memory x this)
    c.keep_attack_models = False   # delete each cell's fine-tuned model and checkpoints when it is measured
    # metrics
    c.ism_others = True            # also ISM of the samples against the other subjects' photos: the
                                   # level of an attack that did not learn the person (column ISM(others))
    c.face_backend = "dlib"        # 'dlib' (offline, PyPI), 'arcface' (deepface / insightface installed),
                                   # or 'miniworld:<identity work dir>' (the mini-world's identity model)
    c.fid_weights = ""             # pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth) or converted
    c.fid_batch = 8                # Inception batch (one compilation per image size)
    c.clip_iqa = ""                # CLIP weights for CLIP-IQA: a folder or hub id ('' = skipped)
    return c
