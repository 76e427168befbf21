"""The configuration: one schema, the original's command lines and YAML files, one read-only object.

    cfg = config.parse_args(["--config_file", "configs/256_resnet50.yml", "SOLVER.BASE_LR", "0.00035"])
    cfg.SOLVER.BASE_LR        # 0.00035

Precedence: the schema's defaults (the paper's recipe), then `--config_file FILE.yml`, then the command
line. The command line takes `KEY VALUE`, `--KEY VALUE` and `--KEY=VALUE` in the original's yacs value
syntax (`[0]`, `'market1501'`, `(40, 70)`, `True`); list keys also take `--INPUT.SIZE_TRAIN 256 128`.
Every key of the original's config/defaults.py (mikwieczorek/centroids-reid a1825b7) is here with its
meaning; keys marked "ours" are new. This module sits at the bottom of the imports: yaml and the
standard library only.
"""
import ast
import difflib
import re
import sys

import yaml

# (key, default, help, choices). Types follow the default; list keys hold tuples inside the config.
SCHEMA = [
    ("MODEL.NAME", "resnet50", "backbone: resnet18/34/50/101/152, resnet50_ibn_a, resnet101_ibn_a", None),
    ("MODEL.BACKBONE_EMB_SIZE", 0, "embedding size; 0 follows the backbone (2048 for resnet50); "
     "another value must equal the backbone's", None),
    ("MODEL.LAST_STRIDE", 1, "stride of layer4 (1 keeps a 16x8 map at 256x128)", None),
    ("MODEL.PRETRAINED", True, "start from ImageNet weights (models/resnet50-19c8e357.pth for resnet50)", None),
    ("MODEL.PRETRAIN_PATH", "", "weights to start from: ImageNet file, our checkpoint or an original .ckpt "
     "(with MODEL.RESUME_TRAINING: the checkpoint to continue)", None),
    ("MODEL.USE_CENTROIDS", True, "report centroid retrieval beside per-image retrieval", None),
    ("MODEL.KEEP_CAMID_CENTROIDS", True, "a query's own identity's centroid leaves out the query's camera", None),
    ("MODEL.RESUME_TRAINING", False, "continue the run saved in MODEL.PRETRAIN_PATH (schedule, optimizer, "
     "sampler), as --resume PATH does", None),
    ("MODEL.STEM_RELU", "auto", "ours: a ReLU after the stem's bn1; auto = the original's nets (none, IBN-a nets "
     "keep theirs)", ("auto", "true", "false")),
    ("MODEL.DEVICE", "auto", "ours: auto | npu | cuda | cpu (auto: NPU if torch_npu imports, else CUDA, else CPU)",
     ("auto", "npu", "cuda", "cpu")),
    ("INPUT.SIZE_TRAIN", (256, 128), "training image size H W", None),
    ("INPUT.SIZE_TEST", (256, 128), "test image size H W", None),
    ("INPUT.PROB", 0.5, "horizontal flip probability", None),
    ("INPUT.RE_PROB", 0.5, "random erasing probability", None),
    ("INPUT.PIXEL_MEAN", (0.485, 0.456, 0.406), "normalisation mean (RGB, 0-1 scale)", None),
    ("INPUT.PIXEL_STD", (0.229, 0.224, 0.225), "normalisation std (RGB, 0-1 scale)", None),
    ("INPUT.PADDING", 10, "padding before the random crop, pixels", None),
    ("INPUT.DEVICE_AUGMENT", False, "ours: decode JPEGs and augment whole batches on the training device "
     "(nvjpeg on CUDA), and decode the evaluation's images there too; loader workers then only read files", None),
    ("DATASETS.NAMES", ("market1501",), "data set names; several train on their union, the first is evaluated",
     None),
    ("DATASETS.ROOT_DIR", "data", "folder holding the data set folder (or the data set folder itself)", None),
    ("DATASETS.JSON_TRAIN_PATH", "", "df1/street2shop: the train JSON; query and gallery JSON are named "
     "with 'train' replaced, images are ROOT_DIR/{train,query,gallery}/", None),
    ("DATALOADER.NUM_WORKERS", 6, "loader processes per device", None),
    ("DATALOADER.SAMPLER", "random_identity", "random_identity: each batch draws P identities at random "
     "among those with images left; balanced: every identity in turn", ("random_identity", "balanced")),
    ("DATALOADER.NUM_INSTANCE", 4, "K: images per identity in a batch (>= 2)", None),
    ("DATALOADER.DROP_LAST", True, "drop the epoch's last incomplete batch", None),
    ("DATALOADER.USE_RESAMPLING", True, "a short chunk (an identity's last r < K images): True fills it with "
     "K - r draws from those r images, with replacement (the original's rule); False pads it with zero mock images "
     "masked out of the losses (the CTL recipe)", None),
    ("DATALOADER.CHECK_IMAGES", True, "ours: decode every image once before training and list the bad ones "
     "(remembered per data set in ~/.cache/centroid-reid until a file changes)", None),
    ("DATALOADER.SKIP_BAD", False, "ours: an unreadable image is replaced by another of its identity (train) or "
     "left out (query/gallery), and listed in OUTPUT_DIR/skipped.txt; False stops the run there, saving last.pth",
     None),
    ("SOLVER.OPTIMIZER_NAME", "Adam", "Adam | AdamW | SGD", ("Adam", "AdamW", "SGD")),
    ("SOLVER.MAX_EPOCHS", 120, "epochs", None),
    ("SOLVER.BASE_LR", 3.5e-4, "learning rate after warm-up", None),
    ("SOLVER.MOMENTUM", 0.9, "SGD momentum", None),
    ("SOLVER.MARGIN", 0.5, "triplet and centroid-triplet margin", None),
    ("SOLVER.DISTANCE_FUNC", "euclidean", "distance of the triplet losses and of the evaluation's ranking",
     ("euclidean", "cosine")),
    ("SOLVER.CLUSTER_MARGIN", 0.3, "accepted and unused, as in the original", None),
    ("SOLVER.CENTER_LR", 0.5, "SGD learning rate of the center-loss centers", None),
    ("SOLVER.CENTER_LOSS_WEIGHT", 5e-4, "weight of the center loss", None),
    ("SOLVER.WEIGHT_DECAY", 5e-4, "weight decay of the weights", None),
    ("SOLVER.WEIGHT_DECAY_BIAS", 5e-4, "accepted and unused, as in the original: biases decay at "
     "SOLVER.WEIGHT_DECAY like every parameter", None),
    ("SOLVER.LR_SCHEDULER_NAME", "multistep_lr", "multistep_lr (x GAMMA at LR_STEPS) | cosine_annealing "
     "(down to MIN_LR at MAX_EPOCHS)", ("multistep_lr", "cosine_annealing")),
    ("SOLVER.MIN_LR", 0.0, "ours: the floor of cosine_annealing (the original reads it but never defines it)",
     None),
    ("SOLVER.GAMMA", 0.1, "lr decay factor of multistep_lr", None),
    ("SOLVER.LR_STEPS", (40, 70), "epochs at which multistep_lr multiplies the lr by GAMMA", None),
    ("SOLVER.USE_WARMUP_LR", True, "linear warm-up: lr x (epoch+1)/WARMUP_EPOCHS", None),
    ("SOLVER.WARMUP_EPOCHS", 10, "warm-up epochs", None),
    ("SOLVER.MONITOR_METRIC_NAME", "centroid_mAP", "metric that picks best.pth (a metrics.jsonl key)", None),
    ("SOLVER.MONITOR_METRIC_MODE", "max", "max | min", ("max", "min")),
    ("SOLVER.CHECKPOINT_PERIOD", 50, "keep a numbered checkpoint (checkpoint_epochN.pth) every N epochs; 0: none",
     None),
    ("SOLVER.EVAL_PERIOD", 1, "evaluate every N epochs (and after the last)", None),
    ("SOLVER.IMS_PER_BATCH", 16, "P: identities per device per step (a batch holds P x K images)", None),
    ("SOLVER.DIST_BACKEND", "ddp", "accepted and ignored: Lightning's strategy; here the launcher decides", None),
    ("SOLVER.QUERY_XENT_WEIGHT", 1.0, "weight of the cross-entropy", None),
    ("SOLVER.QUERY_CONTRASTIVE_WEIGHT", 1.0, "weight of the batch-hard triplet loss", None),
    ("SOLVER.CENTROID_CONTRASTIVE_WEIGHT", 1.0, "weight of the centroid triplet loss", None),
    ("SOLVER.USE_AUTOMATIC_OPTIM", False, "accepted and ignored: Lightning's switch; the step is always "
     "written out", None),
    ("SOLVER.LABEL_SMOOTH", 0.1, "ours: label smoothing epsilon of the cross-entropy", None),
    ("SOLVER.LOG_PERIOD", 20, "ours: steps between progress-bar updates (the only host syncs of a step)", None),
    ("SOLVER.SYNC_BN", False, "ours: synchronise BatchNorm statistics across devices", None),
    ("SOLVER.CUDA_GRAPH", "auto", "ours: the whole training step (forward, 4 losses, backward, Adam, center SGD) "
     "as one CUDA graph; auto: on for CUDA with bf16 or fp32, a no-op elsewhere (said once)",
     ("auto", "true", "false")),
    ("SOLVER.AMP_DTYPE", "auto", "ours: auto (bf16 where the device computes it natively, else fp16) | fp16 | bf16",
     ("auto", "fp16", "bf16")),
    ("SOLVER.AMP_BACKEND", "auto", "ours: auto (apex O2 on an NPU where apex is installed, as the seed trains; "
     "native torch.autocast elsewhere; the run says which and why) | native | apex", ("auto", "native", "apex")),
    ("SOLVER.AMP_OPT_LEVEL", "O2", "ours: apex opt level (when the backend is apex)", None),
    ("SOLVER.SEED", 0, "ours: seed of the sampler, augmentation and initialisation", None),
    ("TEST.IMS_PER_BATCH", 128, "images per device per evaluation batch", None),
    ("TEST.WEIGHT", "", "the checkpoint TEST.ONLY_TEST evaluates (default: MODEL.PRETRAIN_PATH)", None),
    ("TEST.FEAT_NORM", True, "L2-normalise embeddings before distances", None),
    ("TEST.ONLY_TEST", False, "evaluate TEST.WEIGHT (or MODEL.PRETRAIN_PATH) and exit", None),
    ("TEST.VISUALIZE", "no", "yes: write ranked-list PNGs of the evaluated checkpoint to OUTPUT_DIR/visualize",
     ("yes", "no")),
    ("TEST.VISUALIZE_TOPK", 10, "gallery items per ranked list", None),
    ("TEST.VISUALIZE_MAX_NUMBER", 1000000, "at most this many queries drawn", None),
    ("TEST.FLIP_FEATS", False, "ours: average the embeddings of each image and its mirror", None),
    ("TEST.MAX_RANK", 50, "ours: length of the CMC curve", None),
    ("TEST.CAMERA_AGNOSTIC", False, "ours: no same-camera removal (single-camera data)", None),
    ("TEST.RERANK", False, "ours: k-reciprocal re-ranking (Zhong et al. 2017) of the per-image and centroid "
     "galleries", None),
    ("TEST.RERANK_K1", 20, "ours: re-ranking k1 (k-reciprocal neighbours)", None),
    ("TEST.RERANK_K2", 6, "ours: re-ranking k2 (local query expansion)", None),
    ("TEST.RERANK_LAMBDA", 0.3, "ours: re-ranking weight of the original distance", None),
    ("TEST.CENTROID_PROTOCOL", "standard", "ours: standard (the Market rule on centroids) | original (the original's "
     "code, its camera-index bug included: the paper's numbers) | original_fixed | all (the three side by side)",
     ("standard", "original", "original_fixed", "all")),
    ("TEST.REPORT", "", "ours: write the evaluation as one self-contained HTML page to this file (ranked lists per "
     "image and per centroid, failures, CMC curves, distance histograms, per-identity AP; '' = off); train.py "
     "rewrites it after every evaluation", None),
    ("TEST.REPORT_LIMIT", 0, "ours: at most this many queries (the first ones) in TEST.REPORT's ranked lists; 0 = all; "
     "the page says when it was cut", None),
    ("GPU_IDS", (), "device ids the local ranks use, e.g. [0] or 0 1 2 3 (default: all visible)", None),
    ("LOG_DIR", "", "where TensorBoard event files go (default: OUTPUT_DIR; needs the tensorboard package)", None),
    ("USE_MIXED_PRECISION", True, "mixed precision on accelerators (SOLVER.AMP_DTYPE; the CPU runs fp32)", None),
    ("OUTPUT_DIR", "output", "where config.yaml, metrics.jsonl, last.pth and best.pth go", None),
    ("REPRODUCIBLE", False, "run REPRODUCIBLE_NUM_RUNS times with seeds REPRODUCIBLE_SEED, +1, ... into "
     "OUTPUT_DIR/run_<seed>/, then print mean +- std of every metric", None),
    ("REPRODUCIBLE_NUM_RUNS", 3, "runs of a REPRODUCIBLE experiment", None),
    ("REPRODUCIBLE_SEED", 0, "first seed of a REPRODUCIBLE experiment", None),
]
ALIASES = {"SOLVER.STEPS": "SOLVER.LR_STEPS"}  # our earlier name of LR_STEPS
IGNORED = {  # accepted keys that do nothing here, and why
    "SOLVER.DIST_BACKEND": "Lightning's strategy; here the launcher, torchrun or torch.distributed.launch, "
                           "sets the processes",
    "SOLVER.USE_AUTOMATIC_OPTIM": "Lightning's switch; here the step is written out",
    "SOLVER.CLUSTER_MARGIN": "unused in the original too",
    "SOLVER.WEIGHT_DECAY_BIAS": "the original defines it and never reads it: every parameter, biases included, "
                                "decays at SOLVER.WEIGHT_DECAY in one optimizer group",
}
# the element type of list keys whose default cannot show it
LIST_TYPES = {"GPU_IDS": int, "DATASETS.NAMES": str}

DEFAULTS = {key: default for key, default, _, _ in SCHEMA}
CHOICES = {key: choices for key, _, _, choices in SCHEMA if choices}
_BY_UPPER = {key.upper(): key for key in DEFAULTS} | {a.upper(): k for a, k in ALIASES.items()}
_KEY_LIKE = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*$")


class ConfigError(ValueError):
    """A bad key or value: the message names where it came from and the fix."""


class Config:
    """A read-only nested view of a flat {dotted key: value} dict: cfg.SOLVER.BASE_LR, cfg["SOLVER.BASE_LR"]."""

    def __init__(self, flat, prefix=""):
        object.__setattr__(self, "_flat", flat)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name):
        key = self._prefix + name
        if key in self._flat:
            return self._flat[key]
        if any(k.startswith(key + ".") for k in self._flat):
            return Config(self._flat, key + ".")
        raise AttributeError(f"no configuration key {key}")

    def __getitem__(self, key):
        return self._flat[key]

    def __setattr__(self, name, value):
        raise AttributeError(f"the configuration is read-only: use cfg.replace({{'{self._prefix}{name}': ...}})")

    def __eq__(self, other):
        return isinstance(other, Config) and self._flat == other._flat

    def __repr__(self):
        return f"Config({self._flat!r})"

    def flat(self):
        """{dotted key: value} with lists as lists (for checkpoints and JSON)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._flat.items()}

    def replace(self, changes):
        """A new Config with some keys changed (values checked as on the command line)."""
        flat = dict(self._flat)
        for key, value in changes.items():
            name = canonical_key(key, "replace()")
            flat[name] = coerce(name, value, "replace()")
        return Config(flat)


def canonical_key(key, source, typed=None):
    """The schema's spelling of a key (case-insensitive, aliases resolved), or a ConfigError with hints."""
    name = _BY_UPPER.get(str(key).upper())
    if name is None:
        hints = difflib.get_close_matches(str(key).upper(), list(_BY_UPPER), n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(_BY_UPPER[h] for h in hints)}?" if hints else \
            "; python train.py --help lists every key"
        raise ConfigError(f"{source}: unknown key {typed or key}{hint}")
    return ALIASES.get(name, name)


def _literal(text):
    """A yacs-style value: a Python literal when it parses as one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _to_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError("expected True or False")


def _to_scalar(kind, value):
    """value as kind (bool, int, float or str), from a YAML value, a literal or a string."""
    if kind is bool:
        return _to_bool(value)
    if isinstance(value, str) and kind is not str:
        value = _literal(value.strip())
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError("expected a whole number")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if isinstance(value, (list, tuple, dict)):
        raise ValueError("expected a single value")
    return str(value)


def _list_items(value):
    """The elements of a list value given as a list, a literal like [256, 128], `256,128` or `256 128`."""
    if isinstance(value, str):
        parsed = _literal(value.strip())
        if isinstance(parsed, str):
            return [_literal(p.strip("'\"")) for p in re.split(r"[,\s]+", parsed.strip("[]() ")) if p]
        value = parsed
    return list(value) if isinstance(value, (list, tuple)) else [value]


def coerce(key, value, source):
    """Check and convert a value for a schema key; a ConfigError names the source, key and what is expected."""
    default = DEFAULTS[key]
    try:
        if isinstance(default, tuple):
            kind = LIST_TYPES.get(key) or type(default[0])
            result = tuple(_to_scalar(kind, v) for v in _list_items(value))
        elif key in CHOICES and isinstance(value, bool) and CHOICES[key] == ("yes", "no"):
            result = "yes" if value else "no"  # YAML reads an unquoted yes/no as a boolean
        else:
            result = _to_scalar(type(default), value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {key} {value!r}: {err} (default: {_show(default)})") from None
    if key in CHOICES:
        by_lower = {c.lower(): c for c in CHOICES[key]}
        if result.lower() not in by_lower:
            raise ConfigError(f"{source}: {key} {value!r}: choose one of {', '.join(CHOICES[key])}")
        result = by_lower[result.lower()]
    return result


def _show(value):
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else repr(value)


def _flatten(tree, prefix=""):
    """Nested YAML mappings -> [(dotted key, value)]."""
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _flatten(value, key + ".")
        else:
            yield key, value


def load_yaml(path):
    """{key: value} of a YAML config file, every key checked against the schema."""
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"--config_file {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config_file {path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config_file {path}: expected a mapping of keys such as SOLVER: {{BASE_LR: 0.00035}}")
    values = {}
    for key, value in _flatten(tree):
        name = canonical_key(key, path)
        values[name] = coerce(name, value, f"{path}: {key}")
    return values


# ---------------------------------------------------------------------------------------------------
# The command line

CONFIG_FILE_FLAGS = ("--config_file", "--config-file")


def _tokens(argv, option_flags):
    """Split argv into [(key or option flag, [value tokens], where)], where is 'KEY' or '--KEY' as typed."""
    groups = []
    for token in argv:
        name, has_value, inline = token.partition("=") if token.startswith("-") or "=" in token[:80] else \
            (token, "", "")
        bare = name.lstrip("-") if name.startswith("--") else name
        current = groups[-1] if groups else None
        if name in option_flags:
            groups.append([name, [inline] if has_value else [], token])
            continue
        is_key = name.startswith("--") or bare.upper() in _BY_UPPER or (
            _KEY_LIKE.match(bare) and current is not None and current[1] and not _takes_list(current[0]))
        if has_value and not name.startswith("-") and bare.upper() not in _BY_UPPER:
            is_key = False  # a value that contains '=' (e.g. a path), not KEY=VALUE
        if is_key:
            groups.append([canonical_key(bare, "command line", name),
                           [inline] if has_value else [], token])
        elif current is None:
            raise ConfigError(f"command line: {token!r} is not a key (keys look like SOLVER.BASE_LR; "
                              "python train.py --help lists them)")
        else:
            current[1].append(token)
    return groups


def _takes_list(key):
    return isinstance(DEFAULTS.get(key), tuple)


def parse(argv=(), options=()):
    """(Config, {option: value}, set of given keys) from argv; options are (dest, flags, default, help).

    Raises ConfigError for an unknown key, a bad value or a missing value.
    """
    options = [("config_file", CONFIG_FILE_FLAGS, "", "")] + list(options)
    flag_dest = {flag: dest for dest, flags, _, _ in options for flag in flags}
    opts = {dest: default for dest, _, default, _ in options}
    given = {}
    for name, values, typed in _tokens(list(argv), flag_dest):
        if name in flag_dest:
            if len(values) != 1:
                raise ConfigError(f"command line: {name} takes one value, got {len(values)}")
            opts[flag_dest[name]] = values[0]
        elif not values:
            raise ConfigError(f"command line: {typed} needs a value (default: {_show(DEFAULTS[name])})")
        elif len(values) > 1 and not _takes_list(name):
            raise ConfigError(f"command line: {name} takes one value, got {' '.join(values)}")
        else:
            given[name] = " ".join(values)
    values = dict(DEFAULTS)
    file_keys = set()
    if opts["config_file"]:
        from_file = load_yaml(opts["config_file"])
        values.update(from_file)
        file_keys = set(from_file)
    for name, text in given.items():
        values[name] = coerce(name, text, "command line")
    return Config(values), opts, file_keys | set(given)


def help_text(prog, options=()):
    """--help: the options, then every key grouped by section, with its default and choices."""
    lines = [f"usage: {prog} [--config_file FILE.yml] [KEY VALUE | --KEY VALUE | --KEY=VALUE ...]", "",
             "  --config_file FILE.yml  a YAML file of keys (the original's configs/*.yml work as they are)"]
    lines += [f"  {' '.join(flags)} {dest.upper()}  {text}" for dest, flags, _, text in options]
    section = None
    for key, default, text, choices in SCHEMA:
        head = key.split(".")[0] if "." in key else "OTHER"
        if head != section:
            section = head
            lines += ["", f"{section}:"]
        extra = f"; choices: {', '.join(choices)}" if choices else ""
        lines.append(f"  {key} (default {_show(default)}{extra})\n      {text}")
    lines += ["", "Aliases: " + ", ".join(f"{a} = {k}" for a, k in ALIASES.items())]
    return "\n".join(lines)


def parse_args(argv=None, options=(), prog="train.py"):
    """parse() for a CLI: --help prints every key; a bad key or value prints `error: ...` and exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(prog, options))
        raise SystemExit(0)
    try:
        return parse(argv, options)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------------
# Writing it back

class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line ([256, 128]) as the original's files write them."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def to_yaml(cfg):
    """The resolved configuration as nested YAML, readable back with --config_file."""
    tree = {}
    for key, value in cfg.flat().items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False, width=110)


def differences(cfg):
    """['KEY: value (default X)'] for every key that differs from the schema's default."""
    return [f"{key}: {_show(value)} (default {_show(DEFAULTS[key])})"
            for key, value in cfg._flat.items() if value != DEFAULTS[key]]


def ignored_note(given_keys):
    """One line about given keys that mean nothing here, or ''."""
    named = [k for k in IGNORED if k in given_keys]
    if not named:
        return ""
    return "note: accepted and ignored: " + "; ".join(f"{k} ({IGNORED[k]})" for k in named)
