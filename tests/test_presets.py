"""Every paper preset carries the reference scripts' numbers (github.com/Jiacheng8/FADRM).

The table below is the spec: each row is what docs/PRESETS.md derives from the authors'
recover / relabel / validate scripts for the preset's own IPC (10). A changed preset number
fails here; change the table only together with docs/PRESETS.md and the reason.
"""

import pytest

from fadrm.config import list_presets, load_config, preset_path

R18 = "torchvision:resnet18"
FOUR = [R18, "torchvision:densenet121", "torchvision:shufflenet_v2_x1_0",
        "torchvision:mobilenet_v2"]
MRO_224 = [200, 224, 200, 224]

# Shared by every paper preset: recover.py's defaults and the scripts' common flags.
COMMON = {
    "recover.betas": [0.5, 0.9],            # Adam betas in recover.py
    "recover.r_bn": 0.01,                   # --r-bn 0.01
    "recover.first_bn_multiplier": 10.0,    # recover.py default, no script sets it
    "recover.alpha": 0.5,                   # --alpha 0.5
    "recover.crop_scale": [0.08, 1.0],      # RandomResizedCrop default scale
    "relabel.crop_scale": [0.08, 1.0],      # --min/--max-scale-crops 0.08 / 1
    "relabel.cutmix": True,                 # --mix-type cutmix
    "relabel.cutmix_beta": 1.0,             # relabel.py --cutmix default
    "relabel.bn_splits": 2,                 # relabel.py labels each batch as two halves
    "relabel.top_k": 0,                     # all logits stored
    "student.model": R18,                   # --model ResNet18
    "student.temperature": 20.0,            # -T 20
    "student.weight_decay": 0.01,           # AdamW --adamw-weight-decay default
    "student.accumulation_steps": 2,        # --gradient-accumulation-steps 2
    "student.eval_every": 10,               # train_fkd.py validates every 10 epochs
    "select.full_resolution": True,         # RDED-style crops of the stored image
    "ipc": 10,
}


def row(method, teachers, px, res, iters, lr, jitter, block, epochs, batch, bn, s_lr, eta):
    return {
        "recover.method": method,
        "teachers": teachers,
        "data.resolution": px,
        # utils_validate.py: Resize(256) + CenterCrop(224) for the 224 px sets, the stored
        # image (ToTensor only) for CIFAR and Tiny-ImageNet.
        "data.val_crop_ratio": 0.875 if px == 224 else None,
        "recover.resolutions": res,
        "recover.stage_iterations": iters,
        "recover.lr": lr,
        "recover.jitter": jitter,
        "recover.class_block_size": block,
        "relabel.epochs": epochs,
        "relabel.batch_size": batch,
        "relabel.teacher_bn_mode": bn,
        "student.lr": s_lr,
        "student.eta": eta,
    }


# preset: method, teachers, px, MRO resolutions, iterations per stage, recover lr, jitter,
#         classes per block (0 = all), relabel epochs, stored batch, teacher BN mode,
#         student lr, eta
SPEC = {
    "cifar100-fadrm": row("fadrm", [R18], 32, [32] * 4, [500] * 4, 0.25, 4, 0,
                          1000, 16, "train", 1e-3, 2.0),
    "cifar100-fadrm-plus": row("fadrm+", FOUR, 32, [32] * 4, [500] * 4, 0.25, 4, 0,
                               1000, 16, "train", 1e-3, 2.0),
    "tiny-imagenet-fadrm": row("fadrm", [R18], 64, [64] * 2, [500] * 2, 0.01, 4, 100,
                               300, 16, "eval", 1e-3, 2.0),
    "tiny-imagenet-fadrm-plus": row("fadrm+", FOUR, 64, [64] * 4, [500] * 4, 0.25, 4, 100,
                                    300, 16, "train", 1e-3, 2.0),
    "imagenette-fadrm": row("fadrm", [R18], 224, MRO_224, [500] * 4, 0.05, 32, 0,
                            300, 10, "train", 5e-4, 1.0),
    "imagenette-fadrm-plus": row("fadrm+", FOUR, 224, MRO_224, [500] * 4, 0.25, 32, 0,
                                 300, 10, "train", 5e-4, 1.0),
    "imagewoof-fadrm": row("fadrm", [R18], 224, MRO_224, [500] * 4, 0.25, 32, 0,
                           300, 10, "train", 5e-4, 1.0),
    "imagewoof-fadrm-plus": row("fadrm+", FOUR, 224, MRO_224, [500] * 4, 0.25, 32, 0,
                                300, 10, "train", 5e-4, 1.0),
    "imagenet1k-fadrm": row("fadrm", [R18], 224, MRO_224, [500] * 4, 0.25, 32, 100,
                            300, 16, "train", 1e-3, 2.0),
    "imagenet1k-fadrm-plus": row("fadrm+", FOUR, 224, MRO_224, [500] * 4, 0.25, 32, 100,
                                 300, 16, "train", 1e-3, 2.0),
}

PAPER_PRESETS = [p for p in list_presets() if p != "demo"]


def _get(cfg, dotted):
    if dotted == "teachers":
        return [t.model for t in cfg.teachers]
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_paper_preset_has_a_spec_row():
    assert sorted(PAPER_PRESETS) == sorted(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_numbers_match_the_reference(name):
    cfg = load_config(name)
    want = COMMON | SPEC[name]
    got = {key: _get(cfg, key) for key in want}
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{name}: (preset, reference) {wrong}"


@pytest.mark.parametrize("name", sorted(SPEC))
def test_teachers_roles(name):
    cfg = load_config(name)
    n = len(cfg.teachers)
    # FADRM recovers with the first teacher only, FADRM+ round-robin over all of them;
    # relabel averages every teacher with equal weights (relabel.py's 1/n).
    assert cfg.recover_teachers == (list(range(n)) if name.endswith("-plus") else [0])
    assert cfg.relabel_teachers == list(range(n))
    assert all(t.ensemble_weight == 0.0 for t in cfg.teachers)
    # ImageNet-1K distils from torchvision's ImageNet weights (--pretrained-model-type
    # online); the other data sets' teachers are trained on the data set (squeeze).
    assert all(t.pretrained == name.startswith("imagenet1k-") for t in cfg.teachers)


def test_mro_budget_is_one_cosine_over_all_stages():
    # Same total budget everywhere except Tiny-ImageNet FADRM (2 x 500, lr 0.01).
    totals = {n: load_config(n).recover.total_iterations for n in SPEC}
    assert totals.pop("tiny-imagenet-fadrm") == 1000
    assert set(totals.values()) == {2000}


def test_other_ipc_is_an_override():
    # What docs/PRESETS.md tells users to --set for IPC 50 (ImageNette FADRM+).
    cfg = load_config("imagenette-fadrm-plus", ["ipc=50", "student.eta=2"])
    assert cfg.ipc == 50 and cfg.student.eta == 2.0 and cfg.student.lr == 5e-4


@pytest.mark.parametrize("name", list_presets())
def test_presets_say_their_precision(name):
    # bf16 autocast without a scaler (the GPU default; the CPU's dtype of before); the
    # paper's fp16 + GradScaler is execution.precision: fp16.
    text = preset_path(name).read_text()
    assert "\n  precision: bf16" in text
    assert load_config(name).execution.precision == "bf16"
