"""The recipe's options (issue: a stronger recipe): DiffAugment for the discriminators, a moving
average of the generators' weights, and resize-convolution upsampling."""
import copy
import dataclasses

import pytest
import torch

from pipeline import generator_file
from pipeline import train as train_stage
from pipeline.cyclegan import Trainer, build_nets
from pipeline.diffaugment import Augment
from pipeline.networks import ResizeConv2d, define_generator, to_model_input
from pipeline.params import ParamsError, parse

BASE = {"image_size": 32, "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "batch_size": 3,
                                    "epochs": 2, "steps_per_epoch": 2, "decay_from_epoch": 1, "pool_size": 0,
                                    "upsample": "transpose"}}  # the options are measured against the old default


def _params(**train):
    return parse({**BASE, "train": {**BASE["train"], **train}})


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    photos = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=g)
    monets = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=g)
    return to_model_input(photos, torch.device("cpu")), to_model_input(monets, torch.device("cpu"))


def _trainer(p):
    torch.manual_seed(0)
    return Trainer(build_nets(p), p, torch.device("cpu"), None)


# --- DiffAugment -------------------------------------------------------------------------------

def test_diffaugment_is_differentiable_in_every_policy():
    aug = Augment(("color", "translation", "cutout"))
    x = torch.rand(4, 3, 16, 16, dtype=torch.double, requires_grad=True)
    params = aug.draw(4, 16, x.device, torch.Generator().manual_seed(1))
    params["color"] = tuple(p.double() for p in params["color"])
    assert torch.autograd.gradcheck(lambda t: aug(t, params), (x,))
    y = aug(x, params)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_each_policy_does_what_it_says():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(3)
    shifted = Augment(("translation",))(x, {"translation": torch.tensor([[2, 0], [0, -1]])})  # (dy, dx) per image
    assert torch.equal(shifted[0, :, 2:], x[0, :, :-2]) and (shifted[0, :, :2] == 0).all()
    assert torch.equal(shifted[1, :, :, :-1], x[1, :, :, 1:]) and (shifted[1, :, :, -1] == 0).all()
    cut = Augment(("cutout",))(x, Augment(("cutout",)).draw(2, 16, x.device, g))
    assert ((cut == 0).float().mean(dim=(1, 2, 3)) >= 0.0625).all()  # at least a clipped quarter-side square
    colored = Augment(("color",))(x, Augment(("color",)).draw(2, 16, x.device, g))
    assert colored.shape == x.shape and not torch.allclose(colored, x)


def test_one_draw_per_step_seen_alike_by_every_discriminator_input(monkeypatch):
    trainer = _trainer(_params(diffaugment="color,translation,cutout"))
    seen = []
    real_call = Augment.__call__
    monkeypatch.setattr(Augment, "__call__", lambda self, x, params: seen.append(params) or real_call(self, x, params))
    real_P, real_M = _batches()
    trainer.train_step(real_P, real_M)
    # the generators' step: G(P) and F(M) to the discriminators; theirs: real and pooled fake of each
    assert len(seen) == 6 and all(params is seen[0] for params in seen)
    # the same images through the same draw come out the same: real and fake are treated identically
    aug = trainer.augment
    assert torch.equal(aug(real_M, seen[0]), aug(real_M.clone(), seen[0]))


def test_an_empty_policy_leaves_the_step_as_it_was(monkeypatch):
    # no draw (the RNG stream is the one of a run without the option) and the discriminators see
    # the step's very pixels (its own step: the real paintings, then the pooled fakes, in one call)
    p = _params()
    trainer = _trainer(p)
    assert not trainer.augment
    inputs = []
    d = trainer.nets.D_M
    d.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    real_P, real_M = _batches()
    torch.manual_seed(5)
    trainer.train_step(real_P, real_M)
    after = torch.rand(1)
    assert any(len(x) == 2 * len(real_M) and torch.equal(x[:len(real_M)], real_M) for x in inputs)
    torch.manual_seed(5)
    torch.rand(0)
    assert torch.equal(after, _rand_after_plain_step(p, real_P, real_M))


def _rand_after_plain_step(p, real_P, real_M):
    trainer = _trainer(p)
    torch.manual_seed(5)
    trainer.train_step(real_P, real_M)
    return torch.rand(1)


def test_diffaugment_param_is_checked():
    with pytest.raises(ParamsError, match="'train.diffaugment' has unknown 'zoom'"):
        _params(diffaugment="color,zoom")
    assert _params(diffaugment=" color , cutout ").train.diffaugment_policy == ("color", "cutout")


# --- weight average ----------------------------------------------------------------------------

def test_weight_average_equals_a_hand_computed_average_and_survives_a_resume():
    decay = 0.9
    trainer = _trainer(_params(ema=decay))
    expected = {k: v.clone() for k, v in trainer.nets.G.state_dict().items()}  # starts at the initial weights
    for step in range(1, 4):
        trainer.train_step(*_batches(step))
        rate = 1 - min(decay, (1 + step) / (10 + step))
        for k, w in trainer.nets.G.state_dict().items():
            expected[k] = expected[k] + rate * (w - expected[k])
    average = trainer.generators()[0].state_dict()
    for k, v in expected.items():
        assert torch.allclose(average[k], v, atol=1e-6), k
    assert not torch.allclose(average["net.1.weight"], trainer.nets.G.state_dict()["net.1.weight"])

    resumed = _trainer(_params(ema=decay))
    resumed.load_state_dict(copy.deepcopy(trainer.state_dict()))  # the optimisers share tensors otherwise
    for t in (trainer, resumed):
        t.train_step(*_batches(9))
    for a, b in zip(trainer.generators(), resumed.generators()):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


def test_the_saved_generator_is_the_average_when_on(tmp_path):
    p = _params(ema=0.5)
    photos = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    trainer, _ = train_stage.train(p, photos, photos.clone(), tmp_path / "ckpt.pt", "key", print_fn=lambda *_: None)
    G, F = trainer.generators()
    assert G is trainer.average.G and F is trainer.average.F
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["trainer"]
    assert torch.equal(state["average"]["G"]["net.1.weight"], G.state_dict()["net.1.weight"])
    off = _trainer(_params())
    assert off.average is None and off.generators()[0] is off.nets.G


# --- upsampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resnet", "unet"])
@pytest.mark.parametrize("size", [32, 64])
def test_both_upsampling_modes_keep_shape_and_range(kind, size):
    for how in ("transpose", "resize"):
        torch.manual_seed(0)
        net = define_generator(kind, size, 4, 1, how)
        y = net(torch.rand(2, 3, size, size) * 2 - 1)
        assert y.shape == (2, 3, size, size) and y.min() >= -1 and y.max() <= 1
        transposed = any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
        assert transposed == (how == "transpose"), how


def test_a_resize_generator_file_rebuilds_as_saved(tmp_path):
    p = _params(upsample="resize")
    net = generator_file.build(generator_file.config_of(p))
    generator_file.save(net, generator_file.config_of(p), tmp_path / "g.pt")
    loaded, config = generator_file.load(tmp_path / "g.pt", torch.device("cpu"))
    assert config["upsample"] == "resize"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), net.eval()(x))
    with pytest.raises(ParamsError, match="'train.upsample' is 'bilinear'"):
        _params(upsample="bilinear")


def test_upsample_and_options_change_the_fingerprint(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("a\n")
    base = train_stage.fingerprint(_params(), m, "cpu None")
    for change in ({"upsample": "resize"}, {"ema": 0.99}, {"diffaugment": "color"}):
        assert train_stage.fingerprint(_params(**change), m, "cpu None") != base, change


def test_a_file_saved_before_the_option_loads_as_the_transposed_network_it_holds(tmp_path):
    p = _params()
    net = generator_file.build(generator_file.config_of(p))
    old_config = {k: v for k, v in generator_file.config_of(p).items() if k != "upsample"}
    generator_file.save(net, old_config, tmp_path / "old.pt")
    loaded, _ = generator_file.load(tmp_path / "old.pt", torch.device("cpu"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), net.eval()(x))


def _direct(net):
    """`net` with its ResizeConv2d modules computing the direct way (upsample, pad, 3×3 conv)."""
    for m in net.modules():
        if isinstance(m, ResizeConv2d):
            m.at_input_size = False
    return net


@pytest.mark.parametrize("kind, size", [("resnet", 32), ("resnet", 64), ("unet", 32), ("unet", 64)])
def test_resize_convolution_at_input_size_is_the_direct_one_with_its_gradients(kind, size):
    # in float64, so that what is compared is the function, not float32 rounding (which the
    # U-Net's instance norm over equal pixels below 4×4 amplifies in either form)
    torch.manual_seed(0)
    net = define_generator(kind, size, 4, 2, "resize").double().eval()  # eval: the U-Net's dropout off
    with torch.no_grad():  # trained-looking weights: the init's are tiny and would hide errors
        for p in net.parameters():
            p.normal_(0, 0.3)
    direct = _direct(copy.deepcopy(net))
    assert sum(isinstance(m, ResizeConv2d) for m in net.modules()) >= 2
    x = torch.rand(3, 3, size, size, dtype=torch.float64) * 2 - 1
    outputs, grads = [], []
    for model in (net, direct):
        model.zero_grad()
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert outputs[0].shape == (3, 3, size, size)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)  # it trains the same way


def test_a_resize_convolution_at_a_border_pixel_matches_by_hand():
    conv = ResizeConv2d(1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
        conv.bias.fill_(0.5)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # the doubled image is [[1,1,2,2],[1,1,2,2],[3,3,4,4],[3,3,4,4]]; output (i, j) sees its rows
    # i-1..i+1 and columns j-1..j+1, reflected at the border (row -1 is row 1)
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (1, 1, 4, 4)
    windows = {(1, 2): [[1.0, 2, 2], [1, 2, 2], [3, 4, 4]], (0, 0): [[1.0, 1, 1], [1, 1, 1], [1, 1, 1]],
               (3, 3): [[4.0, 4, 4], [4, 4, 4], [4, 4, 4]], (2, 1): [[1.0, 1, 2], [3, 3, 4], [3, 3, 4]]}
    for (i, j), window in windows.items():
        expected = float((torch.tensor(window) * conv.weight[0, 0].detach()).sum()) + 0.5
        assert float(y[0, 0, i, j]) == pytest.approx(expected), (i, j)
    with torch.no_grad():
        torch.testing.assert_close(y, _direct(conv)(x))


def _as_saved_before(net):
    """The layout resize generators had before ResizeConv2d: nearest 2×, reflection pad, Conv2d."""
    for seq in [m for m in net.modules() if isinstance(m, torch.nn.Sequential)]:
        for i, m in enumerate(list(seq)):
            if isinstance(m, ResizeConv2d):
                conv = torch.nn.Conv2d(m.in_channels, m.out_channels, 3, bias=m.bias is not None).double()
                seq[i - 2], seq[i - 1], seq[i] = torch.nn.Upsample(scale_factor=2, mode="nearest"), \
                    torch.nn.ReflectionPad2d(1), conv
    return net


@pytest.mark.parametrize("kind", ["resnet", "unet"])
def test_a_resize_generator_saved_in_the_earlier_layout_loads_and_computes_the_same(kind):
    torch.manual_seed(0)
    net = define_generator(kind, 32, 4, 2, "resize").double().eval()
    before = _as_saved_before(copy.deepcopy(net))
    assert not any(isinstance(m, ResizeConv2d) for m in before.modules())
    net.load_state_dict(before.state_dict())  # strict: the same keys, the same shapes
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), before(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, field, expected", [
    ("transpose", "upsample", "transpose"),
    ("diffaugment", "diffaugment", "color,translation,cutout"),
    ("ema", "ema", 0.999),
])
def test_readme_recipe_option_commands_set_their_option_as_dvc_applies_them(name, field, expected, tmp_path,
                                                                             repo_root):
    """Each `dvc exp run -n NAME -S ...` of the README's recipe options, through DVC's own `-S`
    parser (which reads a bare comma as a sweep), sets the option it names and nothing else."""
    import shutil

    import readme_recipes
    from dvc.utils.hydra import apply_overrides

    from pipeline.params import load
    params = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", params)
    apply_overrides(params, readme_recipes.recipes()[name])
    p, default = load(params), load(repo_root / "params.yaml")
    assert getattr(p.train, field) == expected != getattr(default.train, field)
    assert dataclasses.replace(p, train=dataclasses.replace(p.train, **{field: getattr(default.train, field)})) \
        == default
    if field == "diffaugment":
        assert p.train.diffaugment_policy == ("color", "translation", "cutout")
