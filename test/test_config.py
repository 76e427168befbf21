"""support/config.py: the original's keys, command lines and YAML files resolve as the original resolves them."""
import os
import shlex

import pytest
import torch
import yaml

import train
from support import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every key of the original's config/defaults.py (centroids-reid a1825b7).
ORIGINAL_KEYS = """MODEL.NAME MODEL.BACKBONE_EMB_SIZE MODEL.LAST_STRIDE MODEL.PRETRAINED MODEL.PRETRAIN_PATH
MODEL.USE_CENTROIDS MODEL.KEEP_CAMID_CENTROIDS MODEL.RESUME_TRAINING INPUT.SIZE_TRAIN INPUT.SIZE_TEST INPUT.PROB
INPUT.RE_PROB INPUT.PIXEL_MEAN INPUT.PIXEL_STD INPUT.PADDING DATASETS.NAMES DATASETS.ROOT_DIR DATASETS.JSON_TRAIN_PATH
DATALOADER.NUM_WORKERS DATALOADER.SAMPLER DATALOADER.NUM_INSTANCE DATALOADER.DROP_LAST DATALOADER.USE_RESAMPLING
SOLVER.OPTIMIZER_NAME SOLVER.MAX_EPOCHS SOLVER.BASE_LR SOLVER.MOMENTUM SOLVER.MARGIN SOLVER.DISTANCE_FUNC
SOLVER.CLUSTER_MARGIN SOLVER.CENTER_LR SOLVER.CENTER_LOSS_WEIGHT SOLVER.WEIGHT_DECAY SOLVER.WEIGHT_DECAY_BIAS
SOLVER.LR_SCHEDULER_NAME SOLVER.GAMMA SOLVER.LR_STEPS SOLVER.USE_WARMUP_LR SOLVER.WARMUP_EPOCHS
SOLVER.MONITOR_METRIC_NAME SOLVER.MONITOR_METRIC_MODE SOLVER.CHECKPOINT_PERIOD SOLVER.EVAL_PERIOD SOLVER.IMS_PER_BATCH
SOLVER.DIST_BACKEND SOLVER.QUERY_XENT_WEIGHT SOLVER.QUERY_CONTRASTIVE_WEIGHT SOLVER.CENTROID_CONTRASTIVE_WEIGHT
SOLVER.USE_AUTOMATIC_OPTIM TEST.IMS_PER_BATCH TEST.WEIGHT TEST.FEAT_NORM TEST.ONLY_TEST TEST.VISUALIZE
TEST.VISUALIZE_TOPK TEST.VISUALIZE_MAX_NUMBER GPU_IDS LOG_DIR USE_MIXED_PRECISION OUTPUT_DIR REPRODUCIBLE
REPRODUCIBLE_NUM_RUNS REPRODUCIBLE_SEED""".split()

# The original's CTL train scripts (train_scripts/*/train_ctl_*.sh), their arguments verbatim.
ORIGINAL_SCRIPTS = {
    "market1501_256_resnet50.yml": """--config_file="configs/256_resnet50.yml" GPU_IDS [0] DATASETS.NAMES 'market1501'
        DATASETS.ROOT_DIR '/data/mwieczorek/' SOLVER.IMS_PER_BATCH 16 TEST.IMS_PER_BATCH 128 SOLVER.BASE_LR 0.00035
        OUTPUT_DIR './logs/market1501/256_resnet50' DATALOADER.USE_RESAMPLING False USE_MIXED_PRECISION False""",
    "dukemtmcreid_256_resnet50.yml": """--config_file="configs/256_resnet50.yml" GPU_IDS [0]
        DATASETS.NAMES 'dukemtmcreid' DATASETS.ROOT_DIR '/data/mwieczorek/' SOLVER.IMS_PER_BATCH 16
        TEST.IMS_PER_BATCH 128 SOLVER.BASE_LR 0.00035 OUTPUT_DIR './logs/dukemtmcreid/256_resnet50'
        DATALOADER.USE_RESAMPLING False""",
    "df1_256_resnet50.yml": """--config_file="configs/256_resnet50.yml" GPU_IDS [0] DATASETS.NAMES 'df1'
        DATASETS.JSON_TRAIN_PATH '/data/deep_fashion/consumer_to_shop/train_128_256.json'
        DATASETS.ROOT_DIR '/data/deep_fashion/consumer_to_shop/128_256_images/' SOLVER.IMS_PER_BATCH 48
        TEST.IMS_PER_BATCH 128 SOLVER.BASE_LR 1e-4 OUTPUT_DIR './logs/df1/256_resnet50' DATALOADER.USE_RESAMPLING False
        MODEL.KEEP_CAMID_CENTROIDS False""",
    "df1_320_resnet50_ibn_a.yml": """--config_file="configs/320_resnet50_ibn_a.yml" GPU_IDS [0] DATASETS.NAMES 'df1'
        DATASETS.JSON_TRAIN_PATH '/data/deep_fashion/consumer_to_shop/train_320_320.json'
        DATASETS.ROOT_DIR '/data/deep_fashion/consumer_to_shop/320_320_images/' SOLVER.IMS_PER_BATCH 12
        TEST.IMS_PER_BATCH 256 SOLVER.BASE_LR 1e-4 OUTPUT_DIR './logs/df1/320_resnet50_ibn_a'
        DATALOADER.USE_RESAMPLING False MODEL.KEEP_CAMID_CENTROIDS False""",
    "street2shop_256_resnet50.yml": """--config_file="configs/256_resnet50.yml" GPU_IDS [0] DATASETS.NAMES 'street2shop'
        DATASETS.JSON_TRAIN_PATH '/data/street2shop/train_128_256.json' DATASETS.ROOT_DIR '/data/128_256_images'
        SOLVER.IMS_PER_BATCH 48 TEST.IMS_PER_BATCH 128 SOLVER.BASE_LR 1e-4 OUTPUT_DIR './logs/street2shop/256_resnet50'
        DATALOADER.USE_RESAMPLING False MODEL.KEEP_CAMID_CENTROIDS False""",
    "street2shop_320_resnet50_ibn_a.yml": """--config_file="configs/320_resnet50_ibn_a.yml" GPU_IDS [0]
        DATASETS.NAMES 'street2shop' DATASETS.JSON_TRAIN_PATH '/data/street2shop/train_320_320.json'
        DATASETS.ROOT_DIR '/data/320_320_images' SOLVER.IMS_PER_BATCH 14 TEST.IMS_PER_BATCH 256 SOLVER.BASE_LR 1e-4
        OUTPUT_DIR './logs/street2shop/320_resnet50_ibn_a' DATALOADER.USE_RESAMPLING False
        MODEL.KEEP_CAMID_CENTROIDS False""",
}

# What each script resolves to in the original (its YAML's values, then the script's), key by key.
BASE_256 = {"MODEL.NAME": "resnet50", "MODEL.BACKBONE_EMB_SIZE": 2048,
            "MODEL.PRETRAIN_PATH": "./models/resnet50-19c8e357.pth", "MODEL.KEEP_CAMID_CENTROIDS": True,
            "INPUT.SIZE_TRAIN": (256, 128), "INPUT.SIZE_TEST": (256, 128), "DATALOADER.NUM_INSTANCE": 4,
            "SOLVER.BASE_LR": 1e-4, "SOLVER.OPTIMIZER_NAME": "Adam", "SOLVER.MAX_EPOCHS": 120,
            "SOLVER.EVAL_PERIOD": 40, "USE_MIXED_PRECISION": True, "REPRODUCIBLE_NUM_RUNS": 3}
BASE_320 = {**BASE_256, "MODEL.NAME": "resnet50_ibn_a", "MODEL.PRETRAIN_PATH": "./models/r50_ibn_a.pth",
            "INPUT.SIZE_TRAIN": (320, 320), "INPUT.SIZE_TEST": (320, 320)}


def expected_values(recipe):
    """The original's resolution of a script: YAML values overridden by the script's KEY VALUE pairs."""
    tokens = shlex.split(ORIGINAL_SCRIPTS[recipe])
    values = dict(BASE_320 if "320" in tokens[0] else BASE_256)
    pairs = {tokens[i]: tokens[i + 1] for i in range(1, len(tokens), 2)}
    literal = {"[0]": (0,), "False": False, "True": True}
    for key, text in pairs.items():
        default = config.DEFAULTS[key]
        value = literal.get(text, text)
        if isinstance(default, tuple) and not isinstance(value, tuple):
            value = (value,)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            value = type(default)(float(value))
        values[key] = value
    return values


def test_every_original_key_is_in_the_schema():
    assert set(ORIGINAL_KEYS) <= set(config.DEFAULTS)
    assert len(ORIGINAL_KEYS) == 63  # 56 in sections, 7 at the top


@pytest.mark.parametrize("recipe", sorted(ORIGINAL_SCRIPTS))
def test_each_original_script_resolves_to_its_values_key_by_key(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # the scripts name configs/ relative to the repository
    cfg, _, given = config.parse(shlex.split(ORIGINAL_SCRIPTS[recipe]))
    expected = expected_values(recipe)
    for key, value in expected.items():
        assert cfg[key] == value, key
    untouched = set(config.DEFAULTS) - set(expected)
    assert all(cfg[key] == config.DEFAULTS[key] for key in untouched)
    assert given == set(expected)
    # our recipe file is the same run once the data paths are given
    paths = {k: cfg[k] for k in ("DATASETS.ROOT_DIR", "DATASETS.JSON_TRAIN_PATH")}
    from_recipe, _, _ = config.parse(["--config_file", f"configs/{recipe}"])
    assert from_recipe.replace(paths) == cfg


def test_key_value_forms_and_yacs_literals():
    cfg, opts, _ = config.parse(["--config-file=" + os.path.join(ROOT, "configs", "256_resnet50.yml"),
                                 "SOLVER.LR_STEPS", "(30, 60)", "--SOLVER.GAMMA=0.5", "--INPUT.SIZE_TRAIN", "[320,",
                                 "320]", "--INPUT.SIZE_TEST", "288", "144", "--GPU_IDS", "0", "1",
                                 "model.pretrained", "FALSE", "--TEST.VISUALIZE", "yes", "OUTPUT_DIR", "out=1"])
    assert cfg.SOLVER.LR_STEPS == (30, 60) and cfg.SOLVER.GAMMA == 0.5
    assert cfg.INPUT.SIZE_TRAIN == (320, 320) and cfg.INPUT.SIZE_TEST == (288, 144) and cfg.GPU_IDS == (0, 1)
    assert cfg.MODEL.PRETRAINED is False and cfg.TEST.VISUALIZE == "yes" and cfg.OUTPUT_DIR == "out=1"
    assert cfg.SOLVER.BASE_LR == 1e-4  # from the file, not overridden
    assert opts["config_file"].endswith("256_resnet50.yml")
    assert config.parse(["SOLVER.STEPS", "[5]"])[0].SOLVER.LR_STEPS == (5,)  # our earlier name is an alias


def test_defaults_are_the_papers_recipe():
    cfg, _, _ = config.parse([])
    assert (cfg.SOLVER.OPTIMIZER_NAME, cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == ("Adam", 3.5e-4, 16)
    assert (cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.WARMUP_EPOCHS) == (4, 120, 10)
    assert cfg.SOLVER.LR_STEPS == (40, 70) and cfg.SOLVER.LR_SCHEDULER_NAME == "multistep_lr"


def test_bad_keys_and_values_name_the_source_the_key_and_the_fix(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown key --SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR\?"):
        config.parse(["--SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(config.ConfigError, match=r"SOLVER.BASE_LR 'abc': expected a number"):
        config.parse(["SOLVER.BASE_LR", "abc"])
    with pytest.raises(config.ConfigError, match=r"MODEL.PRETRAINED 'maybe': expected True or False"):
        config.parse(["--MODEL.PRETRAINED", "maybe"])
    with pytest.raises(config.ConfigError, match=r"SOLVER.AMP_DTYPE .fp8.: choose one of auto, fp16, bf16"):
        config.parse(["--SOLVER.AMP_DTYPE", "fp8"])
    with pytest.raises(config.ConfigError, match=r"SOLVER.MAX_EPOCHS takes one value"):
        config.parse(["--SOLVER.MAX_EPOCHS", "1", "2"])
    bad = tmp_path / "bad.yml"
    bad.write_text("SOLVER:\n  BASE_LR: 0.1\n  WARMUP_EPOCH: 5\n")
    with pytest.raises(config.ConfigError, match=rf"{bad}: unknown key SOLVER.WARMUP_EPOCH; did you mean "
                                                 r"SOLVER.WARMUP_EPOCHS"):
        config.parse(["--config_file", str(bad)])
    with pytest.raises(config.ConfigError, match=r"nowhere.yml: cannot read it"):
        config.parse(["--config_file", str(tmp_path / "nowhere.yml")])


def test_command_line_beats_the_file_which_beats_the_defaults(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("SOLVER:\n  BASE_LR: 0.01\n  MAX_EPOCHS: 7\nTEST:\n  VISUALIZE: yes\n")
    cfg, _, given = config.parse(["SOLVER.MAX_EPOCHS", "3", "--config_file", str(path)])
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.GAMMA) == (0.01, 3, 0.1)
    assert cfg.TEST.VISUALIZE == "yes"  # YAML's bare yes is a boolean; the key wants the original's word
    assert given == {"SOLVER.BASE_LR", "SOLVER.MAX_EPOCHS", "TEST.VISUALIZE"}


def test_the_written_configuration_reads_back_equal_and_is_read_only(tmp_path):
    cfg, _, _ = config.parse(["--config_file", os.path.join(ROOT, "configs", "320_resnet50_ibn_a.yml"),
                              "SOLVER.BASE_LR", "3.5e-4", "DATASETS.NAMES", "[market1501, dukemtmcreid]"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.parse(["--config_file", str(path)])[0] == cfg
    assert yaml.safe_load(path.read_text())["INPUT"]["SIZE_TRAIN"] == [320, 320]
    with pytest.raises(AttributeError, match="read-only"):
        cfg.SOLVER.BASE_LR = 1.0
    assert cfg.replace({"SOLVER.SEED": 3}).SOLVER.SEED == 3 and cfg.SOLVER.SEED == 0


def test_ignored_lightning_keys_are_accepted_and_named_once():
    cfg, _, given = config.parse(["SOLVER.DIST_BACKEND", "ddp2", "SOLVER.USE_AUTOMATIC_OPTIM", "True"])
    note = config.ignored_note(given)
    assert "SOLVER.DIST_BACKEND" in note and "SOLVER.USE_AUTOMATIC_OPTIM" in note and "\n" not in note
    assert config.ignored_note(config.parse([])[2]) == ""


# ---------------------------------------------------------------------------------------------------
# The schedule and the optimizer's group, against the original's mechanism run with torch's own classes

def original_lrs(cfg):
    """The lr of each epoch as the original sets it: warm-up overwrites the lr at every step of a warm-up
    epoch, and torch's MultiStepLR / CosineAnnealingLR step once per epoch on the optimizer's lr."""
    solver = cfg.SOLVER
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=solver.BASE_LR)
    if solver.LR_SCHEDULER_NAME == "cosine_annealing":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, solver.MAX_EPOCHS, eta_min=solver.MIN_LR)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(solver.LR_STEPS), gamma=solver.GAMMA)
    lrs = []
    for epoch in range(solver.MAX_EPOCHS):
        if solver.USE_WARMUP_LR and epoch < solver.WARMUP_EPOCHS:
            for group in optimizer.param_groups:
                group["lr"] = min(1.0, (epoch + 1) / solver.WARMUP_EPOCHS) * solver.BASE_LR
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("flags", [[], ["SOLVER.LR_STEPS", "(5, 10, 60)"], ["SOLVER.USE_WARMUP_LR", "False"],
                                   ["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing"],
                                   ["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing", "SOLVER.MIN_LR", "1e-6"],
                                   ["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing", "SOLVER.USE_WARMUP_LR", "False"]])
def test_lr_schedule_follows_the_originals_warmup_and_scheduler(flags):
    cfg, _, _ = config.parse(flags)
    ours = [cfg.SOLVER.BASE_LR * train.lr_factor(epoch, cfg) for epoch in range(cfg.SOLVER.MAX_EPOCHS)]
    assert ours == pytest.approx(original_lrs(cfg), rel=1e-9, abs=1e-15)


def test_weight_decay_bias_does_what_the_original_does_nothing_and_a_run_says_so(tmp_path, capsys):
    cfg, _, given = config.parse(["SOLVER.WEIGHT_DECAY", "0.01", "SOLVER.WEIGHT_DECAY_BIAS", "0",
                                  "OUTPUT_DIR", str(tmp_path)])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].bias.requires_grad_(False)  # frozen (the BNNeck's bias): left out, as the original leaves it
    optimizer, _, _ = train.build_optimizers(cfg, model, torch.nn.Linear(1, 1))
    # the original's solver/build.py: one Adam group, weight_decay=SOLVER.WEIGHT_DECAY, biases included
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == \
        {id(model[0].weight), id(model[0].bias), id(model[1].weight)}
    train.write_config(cfg, given)  # what a run prints before its first step
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: accepted and ignored")]
    assert len(note) == 1 and "SOLVER.WEIGHT_DECAY_BIAS (the original defines it and never reads it" in note[0]
    train.write_config(*config.parse(["SOLVER.WEIGHT_DECAY", "0.01", "OUTPUT_DIR", str(tmp_path)])[::2])
    assert "WEIGHT_DECAY_BIAS" not in capsys.readouterr().out  # not set: nothing to say
