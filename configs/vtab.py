r"""VQT on one VTAB-1k task with the official release's protocol.

Command:
  python main.py --config=configs/vtab.py:dtd --workdir=/tmp/vqt/dtd

Trains VQT (queries + linear head only) on train800val200 of the task for 100 epochs (Adam,
batch 128 with the last batch of each epoch partial, 10 warm-up epochs, cosine decay stepped
per epoch) on every local device and host, and writes the test top-1 to
/tmp/vqt/dtd/results.json (TensorBoard logs and metrics.jsonl beside it; re-running resumes
from the last checkpoint). The argument is `TASK` or `TASK,PROTOCOL`: any of the 19 tasks in
vqt_jax/data/tasks.py, or `folder` with --config.data_dir=ROOT for an image folder
ROOT/{train,val,test}/CLASS/*; PROTOCOL is `release` (default: the official release exactly,
including its per-task T and compression stage) or `big_vision` (vqt_jax/protocol.py). Override
any field on the command line, e.g.
  --config.split=val --config.lr=0.25 --config.wd=1e-3 --config.model.num_queries=10

The TFDS dataset must be prepared in data_dir (the run says what to run if it is not); the
checkpoint is downloaded once from `init` (or point `init` at a local/gs:// copy).

Backbone: `init` defaults to the original ImageNet-21k ViT-B/16 of vision_transformer, a
public file. The release's VTAB-1k numbers come from another backbone: its run_demo_exp.sh
trains every task on `sup_vitb16_imagenet1k`, i.e. `imagenet1k_ViT-B_16.npz` (its
src/models/build_vit_backbone.py), an ImageNet-1k supervised ViT-B/16 that its README links
on Google Drive only, so no loader can fetch it by URL. To compare with those numbers,
download that file by hand and point `init` at the copy:
  --config.init=/path/to/imagenet1k_ViT-B_16.npz
"""

import os
import sys

import ml_collections

# Config files are loaded by path: make the repository root importable for vqt_jax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vqt_jax import protocol  # noqa: E402

# The default backbone: the original ImageNet-21k ViT-B/16 of vision_transformer (public; the
# release's own VTAB-1k runs use an ImageNet-1k ViT-B/16, see the module docstring).
IN21K_B16 = "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for one task: `arg` is 'TASK' or 'TASK,PROTOCOL' (default 'dtd,release')."""
    task, _, protocol_name = (arg or "dtd").partition(",")
    c = ml_collections.ConfigDict()
    c.task = task
    # The values the protocol decides (vqt_jax/protocol.py, one table), each set once below.
    p = protocol.settings(protocol_name or "release", task)
    c.protocol = p["protocol"]
    # TFDS data dir, or the image-folder root when task='folder'.
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.split = "test"  # 'val': train800 -> val200 (selection); 'test': train800val200 -> test.
    c.init = IN21K_B16
    c.prepare = ""  # a set-up step run first (vqt_jax/preparations.py), e.g. for the demo
    # How the checkpoint's position embeddings are resized to image_size's grid: 'auto' (the
    # checkpoint family's own rule: big_vision 'bilinear_corners', timm 'bicubic_antialias',
    # Meta's DINOv2 files 'bicubic'), or one of those names (vqt_jax/checkpoints/resample.py).
    c.posemb_resample = "auto"

    # Not type-safe: an option left 'auto' becomes the bool or int the resolve step reads.
    c.model = ml_collections.ConfigDict(type_safe=False)
    # 'auto' (here: variant, layerscale, pool_type, num_registers): read from `init`'s file
    # before the model is built (vqt_jax/resolve.py, docs/checkpoints.md); a value set here or on
    # the command line wins, and one the file contradicts is an error naming the flag.
    c.model.variant = "auto"  # e.g. 'B/16'; 'auto' without a file: B/16
    # T; 10 or 20 help structured tasks (SVHN, dSprites, KITTI, ...): the release's per task.
    c.model.num_queries = p["model.num_queries"]
    c.model.query_dropout = 0.1
    # The Google checkpoints were trained with tanh GELU; the release runs exact 'gelu'. 'auto':
    # the protocol's, else the file's family's (DINOv2: 'gelu'), else 'gelu_tanh'.
    c.model.mlp_act = p["model.mlp_act"]
    c.model.ln_eps = 1e-6
    c.model.layerscale = "auto"  # DINOv2: True
    c.model.pre_norm = False
    c.model.qkv_bias = True
    # 'tok' (class token), 'gap' (mean patch token) or 'map' (SigLIP's MAP head).
    c.model.pool_type = "auto"
    c.model.num_registers = "auto"  # DINOv2 with registers: 4
    c.model.kv_dtype = ml_collections.config_dict.placeholder(str)  # e.g. 'bfloat16'
    # Compute dtype of the backbone and the query path ('bfloat16' on accelerators; the
    # parameters, LayerNorm statistics, softmax and the head stay float32).
    c.model.dtype = "float32"
    # For ViT-L/H memory: the blocks under lax.scan (one compiled block), and rematerialised
    # in the backward (pair it with scan_blocks). The params tree stays big_vision's.
    c.model.scan_blocks = False
    c.model.remat = False
    c.model.head_init = p["model.head_init"]  # 'zeros' or 'kaiming_fan_out' (the release)
    c.model.head_bias_init = p["model.head_bias_init"]  # the release: -log(99)
    # Sizes of the other methods' parts; a method switches off the parts it does not use.
    c.model.num_prompts = 10  # VPT's prompt length
    c.model.prompt_dropout = 0.1
    c.model.adapter_dim = 64  # AdaptFormer's bottleneck and scale (its VTAB setting)
    c.model.adapter_scale = 0.1
    c.model.adapter_dropout = 0.1  # in the bottleneck, while training (AdaptFormer's release)
    c.model.lora_rank = 8
    c.model.lora_alpha = ml_collections.config_dict.placeholder(float)  # default: the rank

    # vqt, linear, full, vpt_shallow, vpt_deep, adaptformer, lora, head2toe, vqt+vpt_deep,
    # vqt+adaptformer, vqt+lora (vqt_jax/methods.py).
    c.method = "vqt"
    # Unset: the method's release recipe (vqt_jax/methods.py): VQT's Adam, batch 128 and 10
    # warm-up epochs; VPT's SGD (batch 1024 for linear) and AdamW (full: batch 384, 5 epochs).
    c.optimizer = ml_collections.config_dict.placeholder(str)
    c.batch_size = ml_collections.config_dict.placeholder(int)
    c.warmup_epochs = ml_collections.config_dict.placeholder(int)
    # lr grid of the release: {1.0, 0.5, 0.25, 0.1, 0.05} x batch/256; wd {1e-2,1e-3,1e-4,0}.
    c.lr = 0.125
    c.wd = 1e-3
    c.eval_batch_size = 128
    c.epochs = 100
    # 'epoch': every epoch a fresh permutation cut into batches, the last one partial (the
    # release's drop_last=False; padded and masked so the step keeps one shape);
    # 'stream': full batches read across epoch boundaries.
    c.batching = p["batching"]
    c.schedule_per_epoch = p["schedule_per_epoch"]  # the release steps it once per epoch
    c.seed = 0
    # The seed of the example order (unset: `seed`). The protocol's seeds share one order when
    # it is set (each keeps its own init and dropout), so their programs read each batch of the
    # cache once (experiments/sweep_speed.py measures what it changes).
    c.order_seed = ml_collections.config_dict.placeholder(int)
    # A training loss above this stops the run as diverged, like a NaN (inf: only non-finite
    # losses and states stop it). Either way no unsound state is ever checkpointed.
    c.max_loss = float("inf")
    # 'inception' = [-1, 1], what the Google checkpoints expect; the VQT/VPT release used
    # 'imagenet' mean/std instead. Or an explicit ((m, m, m), (s, s, s)).
    c.normalization = p["normalization"]
    c.image_size = 224
    # 'float': tf.image.resize's float result as is (the release); 'uint8': rounded to uint8.
    c.resize = p["resize"]
    # MAE-style models (model.fc_norm): 'fresh' starts fc_norm as a new LayerNorm (the release
    # drops the pretrained `norm`); 'checkpoint' loads the checkpoint's final norm into it.
    c.fc_norm_init = p["fc_norm_init"]

    # Train from a one-time cache of the frozen backbone's outputs ('auto': when the method
    # allows it; 'on': fail if it cannot; 'off'). See vqt_jax/cache.py.
    c.cache = "auto"
    c.cache_dtype = "float32"  # 'bfloat16' halves the cache (the forward stays exact)
    c.cache_storage = "disk"  # 'disk': memory-mapped files in cache_dir; 'memory': host RAM
    # Default: $VQT_JAX_CACHE/features (~/.cache/vqt_jax/features), on each host's own disk,
    # never in the workdir (caching.default_cache_dir); entries are named by their contents.
    c.cache_dir = ml_collections.config_dict.placeholder(str)
    c.cache_max_gb = 32.0  # budget; a larger cache falls back to the uncached path
    # The cache directory's cap: before a build, its least recently used entries that no
    # running process uses are removed to make room (0: no cap).
    c.cache_dir_max_gb = 200.0
    # Keep the cache on the devices and train in compiled loops ('auto': when it fits half of
    # each device's memory; 'on': fail if it does not; 'off': gather batches on the host).
    c.cache_on_device = "auto"
    # The release's feature-compression stage after VQT (group-lasso head, keep the top
    # keep_frac features by column norm, retrain the head), on cached query outputs.
    c.compression = ml_collections.ConfigDict()
    c.compression.enabled = p["compression.enabled"]
    c.compression.keep_frac = 0.7
    c.compression.lasso = 1e-4
    c.compression.epochs = 100
    c.compression.lr_scale = 0.5
    # True: both stages recompute the query outputs with query dropout on (the release trains
    # them in train mode); False: on fixed eval-mode features (seconds).
    c.compression.train_mode = p["compression.train_mode"]
    # Other heads fitted on the same fixed features after training, reported beside the
    # method's top-1, each tuned as its authors would (vqt_jax/linear_probe.py): 'linear'
    # (L2 logistic regression on the final CLS, C chosen on the val rows, refit on train+val),
    # 'head2toe' (every block's pooled tokens, group-lasso selection with the kept fraction and
    # C chosen on the val rows).
    c.baselines = ()
    # The test top-1 a run reports (results.json 'reported', the sweep's tables): 'top1' (the
    # trained model's) or 'compression.top1' (the compressed model's where the compression
    # stage ran, else the trained model's: the release's collect_demo_exp_results.py).
    c.report_metric = p["report_metric"]

    c.num_devices = 0  # 0: every device
    # experiments/vtab_sweep.py trains each stage's runs (the grid, the seeds) as one program
    # (vqt_jax/training/stacked.py); at most this many runs per program (0: all; a program too
    # large for the devices' memory is split on its own).
    c.program_max_runs = 0
    # Also write every evaluation example's label and prediction into evaluation.json.
    c.save_predictions = False
    # JAX's persistent compilation cache (vqt_jax/compilation_cache.py): re-runs and the next
    # task of the same shapes load their programs instead of compiling. Unset:
    # $JAX_COMPILATION_CACHE_DIR, else $VQT_JAX_CACHE/xla (~/.cache/vqt_jax/xla); '': not set here.
    c.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    return c
