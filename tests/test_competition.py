"""The competition path without a GPU: the README's own commands through DVC on the CPU, at 256 px
with the full-size networks, and those networks held against the CycleGAN paper's architecture."""
import json
import zipfile

import pytest
import readme_recipes
import torch
from PIL import Image
from workspace import dvc, make_repo, new_rows, rows

from pipeline.features import offline_extractor
from pipeline.networks import define_discriminator, define_generator

# what a CPU test must change, and nothing else: the device, compile, a few dozen sample images
# instead of Kaggle's, a few steps, the package's minimum count, and (no internet) a weights file
# for the FID Inception that the test makes: the graph's own state dict, not the published weights
CPU = {"device": "cpu", "train.compile": "false", "ingest.source": "sample", "ingest.sample_photos": "24",
       "ingest.sample_paintings": "12", "train.epochs": "1", "train.steps_per_epoch": "1",
       "train.decay_from_epoch": "1", "package.min_images": "20"}


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_competition_networks_have_the_paper_architectures_parameter_counts():
    # ResNet-9 (Zhu et al. 2017, appendix 7.2): c7s1-64, d128, d256, R256 × 9, u128, u64, c7s1-3;
    # 70×70 PatchGAN: C64-C128-C256-C512, then a 1-channel conv (4×4 kernels throughout)
    resnet9 = (_conv(3, 64, 7) + _conv(64, 128, 3) + _conv(128, 256, 3) + 9 * 2 * _conv(256, 256, 3)
               + _conv(256, 128, 3) + _conv(128, 64, 3) + _conv(64, 3, 7))
    patchgan = _conv(3, 64, 4) + _conv(64, 128, 4) + _conv(128, 256, 4) + _conv(256, 512, 4) + _conv(512, 1, 4)
    assert (resnet9, patchgan) == (11_378_179, 2_764_737)  # as the reference PyTorch implementation prints
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(define_generator("resnet", 256, 64, 9)) == resnet9
    assert count(define_discriminator(64)) == patchgan


@pytest.mark.parametrize("name, generator", [("competition", "resnet"), ("tutorial", "unet")])
def test_readme_recipe_runs_all_five_stages_at_256_px(name, generator, tmp_path, repo_root):
    readme = readme_recipes.recipes()[name]
    over = readme_recipes.overrides(name)
    assert over["image_size"] == 256 and over["train.generator"] == generator
    root, env = make_repo(tmp_path, repo_root)
    assert over["evaluate.extractor"] == "fid-inception"
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    reference = torch.randint(0, 256, (4, 80, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.save(offline_extractor(reference, 75, torch.device("cpu")).model.inception.state_dict(), weights)
    settings = readme + [f"{k}={v}" for k, v in CPU.items()] + [f"evaluate.weights={weights}"]
    res = dvc(root, env, "exp", "run", "-n", name, *[a for s in settings for a in ("-S", s)])
    for stage in ("ingest", "train", "generate", "evaluate", "package"):
        assert f"Running stage '{stage}'" in res.stdout

    saved = torch.load(root / "models/photo2monet.pt", weights_only=True)
    assert saved["config"] == {"kind": generator, "image_size": 256, "filters": over["train.gen_filters"],
                               "resnet_blocks": over["train.resnet_blocks"], "upsample": over["train.upsample"]}
    nets = torch.load(root / ".cache/train/checkpoint.pt", weights_only=True)["trainer"]["nets"]
    assert nets["D_M"]["net.0.weight"].shape == (over["train.disc_filters"], 3, 4, 4)
    with zipfile.ZipFile(root / "data/images.zip") as zf:
        assert len(zf.namelist()) == 24
        with zf.open(zf.namelist()[0]) as f, Image.open(f) as img:
            assert img.size == (256, 256) and img.mode == "RGB"
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["extractor"] == "fid-inception-other"  # at 299 px; weights not the published ones
    assert "[FID Inception, NOT the published weights: not comparable to Kaggle]" in res.stdout  # they are not
    assert all(metrics[k] == metrics[k] for k in ("fid", "mifid", "kid_mean", "fid_vs_ground_truth"))  # not NaN
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["steps"] == 1 and all(train[k] == train[k] for k in train if k.startswith("loss_"))
    (row,) = new_rows(root, {})
    assert row["name"] == name and row["params"]["image_size"] == "256"
    assert row["params"]["train.gan_loss"] == str(over.get("train.gan_loss", "lsgan"))
    assert len(rows(root)) == 1
