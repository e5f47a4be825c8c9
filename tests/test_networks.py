import pytest
import torch

from pipeline.cyclegan import ImagePool, Trainer, build_nets, together
from pipeline.networks import GANLoss, ResizeConv2d, define_discriminator, define_generator, to_model_input, to_uint8
from pipeline.params import parse


@pytest.mark.parametrize("kind", ["unet", "resnet"])
@pytest.mark.parametrize("size", [32, 64, 256])
def test_generator_keeps_shape_and_range(kind, size):
    g = define_generator(kind, size, 8, 2)
    y = g(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, size, size)
    assert y.abs().max() <= 1.0


@pytest.mark.parametrize("size, patches", [(64, 6), (256, 30)])
def test_patch_discriminator_shape(size, patches):
    d = define_discriminator(8)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, patches, patches)


def test_unet_uses_skip_connections():
    # the 1×1 bottleneck alone cannot carry a 32×32 image; the skips must
    g = define_generator("unet", 32, 8, 0).eval()
    x = torch.randn(1, 3, 32, 32)
    y1 = g(x)
    x2 = x.clone()
    x2[..., :16, :16] += 1.0
    y2 = g(x2)
    changed = (y1 - y2).abs().sum(1)[0]
    assert changed[:16, :16].mean() > changed[16:, 16:].mean()


def test_gan_losses():
    logits = torch.zeros(4, 1, 6, 6)
    assert GANLoss("lsgan")(logits, True).item() == pytest.approx(1.0)
    assert GANLoss("bce")(logits, False).item() == pytest.approx(0.6931, abs=1e-4)
    with pytest.raises(ValueError):
        GANLoss("wgan")


def test_image_pool_returns_past_fakes_deterministically():
    a, b = ImagePool(4, seed=1), ImagePool(4, seed=1)
    for k in range(10):
        x = torch.full((2, 3, 4, 4), float(k))
        assert torch.equal(a.query(x), b.query(x))
    out = a.query(torch.full((8, 3, 4, 4), 99.0))
    assert (out[:, 0, 0, 0] != 99.0).any()  # some swapped for stored fakes
    assert ImagePool(0, seed=1).query(x) is x


def test_uint8_round_trip():
    img = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input(img, torch.device("cpu"))
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), img)


def test_train_step_reduces_cycle_loss_and_checkpoint_resumes_exactly():
    p = parse({"image_size": 32, "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1,
                                           "batch_size": 2, "epochs": 1, "steps_per_epoch": 30,
                                           "decay_from_epoch": 1}})
    torch.manual_seed(0)
    photos = torch.rand(2, 3, 32, 32) * 2 - 1
    monets = torch.rand(2, 3, 32, 32) * 2 - 1
    t = Trainer(build_nets(p), p, torch.device("cpu"), None)
    first = t.train_step(photos, monets)["loss_cycle"]
    for _ in range(20):
        last = t.train_step(photos, monets)["loss_cycle"]
    assert last < first
    state = t.state_dict()
    t2 = Trainer(build_nets(p), p, torch.device("cpu"), None)
    t2.load_state_dict(state)
    assert t2.step == t.step
    torch.manual_seed(5)
    a = t.train_step(photos, monets)
    torch.manual_seed(5)
    b = t2.train_step(photos, monets)
    assert a == pytest.approx(b)


def test_resize_upsampling_trains_under_torch_compile():
    # the competition recipe compiles the networks: the resize upsampling's backward once stopped
    # there (aten's replication_pad2d_backward returned a layout Inductor did not predict)
    torch.manual_seed(0)
    net = ResizeConv2d(4, 4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    eager = torch.autograd.grad(net(x).square().sum(), [x, net.weight])
    compiled = torch.autograd.grad(torch.compile(net)(x).square().sum(), [x, net.weight])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net", [define_generator("resnet", 32, 8, 2, "resize"), define_generator("unet", 32, 8, 0),
                                 define_discriminator(8)], ids=["resnet", "unet", "patchgan"])
def test_networks_treat_each_image_alone(net):
    # the training step runs two batches through a network in one call (cyclegan.together): that
    # gives the same numbers only while no layer mixes images (instance norm, never batch norm)
    torch.manual_seed(0)
    a, b = torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)
    net.train()  # where batch norm would mix the images
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # the U-Net's dropout draws a different mask per call
    with torch.no_grad():
        one_call = together(net, a, b)
        torch.testing.assert_close(one_call[0], net(a), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one_call[1], net(b), rtol=1e-4, atol=1e-5)
