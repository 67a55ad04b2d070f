"""DP-SGD on scikit-learn's bundled handwritten digits: the default `make train` run.

Command:   jaxdp train --config configs/digits.py        (smoke: configs/digits.py:smoke)
Hardware:  2 CPU cores (x86_64), no accelerator.   Runtime: ~6 s for the run (+0.7 s calibration, ~3 s start-up).
Privacy:   Poisson sampling q = 512/1437, 40 epochs (120 steps); sigma is calibrated before the
           first step to the smallest value spending epsilon <= 3 at delta = 1e-5 (RDP): sigma = 5.9716.
Result:    test accuracy 91.9-93.9% (mean 93.0%) over five runs with secret noise (2026-11-22).
"""

import ml_collections

from jaxdp.config import check_variant

VARIANTS = ("smoke",)  # configs/digits.py:smoke


def get_config(arg=None):
    check_variant(__file__, arg, VARIANTS)
    config = ml_collections.ConfigDict()
    config.dataset = "digits"  # built-in; or a prepared TFDS dataset (mnist, cifar10, ...) under data_dir
    config.data_dir = ""  # TFDS data_dir ("" = TFDS default); unused for built-in datasets
    # > 0: hold out this many training examples (stratified, fixed split) and evaluate on them instead of the
    # test set: choose hyperparameters this way, never on the test set. The tuning itself is not accounted.
    config.validation_size = 0
    # A TFDS dataset whose images take more than this many MiB (as float32) stays on disk: each Poisson draw
    # is read from its array_record files by random access (the same batches). 0 = always load it whole.
    config.data_memory_mb = 4096.0
    # Draws gathered ahead by a thread while the step runs (0 = none). Off by default: on 2 CPU cores the thread
    # slowed the small digits runs (tests/test_train.py + test_checkpoint.py: 109 s with 2, 91 s with 0).
    config.data_prefetch = 0
    config.seed = 0  # model initialisation only (public); the noise has its own secret seed
    config.workdir = "runs/digits"

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (64,)})
    # The dtype the model computes in: float32 | bfloat16 | float16 (mixed precision: parameters, the clipped
    # sum, the noise and the optimizer stay float32). On a CPU bfloat16 is slower; on GPUs and TPUs it is the norm.
    config.model.dtype = "float32"

    config.batch_size = 512  # expected (Poisson) batch size
    config.sampling = "poisson"  # "shuffle": fixed-size batches, non-private runs only
    config.epochs = 40
    config.physical_batch_size = 0  # 0 = automatic (performance only, never changes privacy)
    config.microbatch_size = 0  # 0 = whole chunk at once (performance only)
    # Per-example norms: "vmap" (materialised per-example gradients, any model), "ghost" (from layer
    # inputs and output gradients), "auto" (ghost when every parameter is covered, else vmap, saying why).
    # Performance only: the clipped sum is the same.
    config.clipping_impl = "auto"

    config.augment = ml_collections.ConfigDict()
    config.augment.multiplicity = 0  # K > 0: average the gradients of K random crop/flip copies before clipping
    config.augment.crop_pad = 1
    config.augment.flip = False  # digits are not mirror-symmetric

    config.privacy = ml_collections.ConfigDict()
    config.privacy.l2_clip_norm = 1.0
    config.privacy.target_epsilon = 3.0  # None: no target (use noise_multiplier as given)
    config.privacy.noise_multiplier = None  # None: calibrate to target_epsilon; a number: use it, capped by the target
    config.privacy.accountant = "rdp"  # rdp | pld (gdp is an approximation: reporting only)
    config.privacy.delta = 1e-5
    config.privacy.per_layer = False
    # b > 1: banded matrix-factorization noise (BandMF), correlated over b steps, with cyclic Poisson
    # sampling over b groups; 1 = DP-SGD. See README, "Correlated noise (BandMF)".
    config.privacy.bands = 1
    # Seed of the noise and the Poisson draws. None = secret (OS entropy), as a private run needs;
    # an int makes them reproducible by anyone who reads it: tests and debugging only.
    config.privacy.noise_seed = None

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # sgd | adam | nadam
    config.optimizer.learning_rate = 0.02
    config.optimizer.momentum = 0.0  # sgd only
    config.optimizer.weight_decay = 0.0  # = a Gaussian prior (post-processing: privacy unchanged)
    # A step schedule: the learning rate is multiplied by lr_scales[i] after step lr_boundaries[i] (cumulative),
    # e.g. optimizer.lr_boundaries=(600,) optimizer.lr_scales=(0.25,). Public: privacy unchanged. () = constant.
    config.optimizer.lr_boundaries = ()
    config.optimizer.lr_scales = ()

    config.ema_decay = 0.0  # > 0: also report the test accuracy of an EMA of the parameters (post-processing)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_epochs = 5  # 0 = only at the end; resume with `jaxdp train ... --resume`
    config.checkpoint.keep = 3  # keep the last k checkpoints

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  # "auto" on TPU pods / managed clusters
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    if arg == "smoke":
        config.epochs = 2
        config.workdir = "runs/digits_smoke"
    return config
