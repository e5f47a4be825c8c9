"""The generator as a file: saved by train, loaded and applied by generate (and bench/)."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import generator_file, shards
from pipeline.errors import DataError
from pipeline.generate import generate
from pipeline.networks import to_model_input, to_uint8
from pipeline.params import parse
from pipeline.runtime import autocast

CPU = torch.device("cpu")
P = parse({"image_size": 32, "train": {"gen_filters": 4, "resnet_blocks": 1}})


def _photos(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = generator_file.build(generator_file.config_of(P))
    path = tmp_path / "photo2monet.pt"
    generator_file.save(net, generator_file.config_of(P), path)
    return net.eval(), path


def test_saved_generator_loads_back_identical(saved):
    net, path = saved
    loaded, config = generator_file.load(path, CPU)
    assert config == {"kind": "resnet", "image_size": 32, "filters": 4, "resnet_blocks": 1, "upsample": "resize"}
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_compiled_wrapper_saves_the_plain_module(tmp_path):
    net = generator_file.build(generator_file.config_of(P))
    wrapper = torch.nn.Module()
    wrapper._orig_mod = net  # what torch.compile's OptimizedModule holds
    generator_file.save(wrapper, generator_file.config_of(P), tmp_path / "g.pt")
    keys = torch.load(tmp_path / "g.pt", weights_only=True)["state_dict"].keys()
    assert keys == net.state_dict().keys()


@pytest.mark.parametrize("content, needle", [(None, "generator not found"),
                                             (b"garbage", "not a generator saved by the train stage"),
                                             (b"", "not a generator saved by the train stage"),
                                             ({"config": {"kind": "resnet"}}, "not a generator"),
                                             (torch.zeros(3), "not a generator .*TypeError"),  # IndexError's traceback
                                             ([1, 2], "not a generator .*TypeError")])
def test_bad_generator_file_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "g.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(DataError, match=needle) as e:
        generator_file.load(path, CPU)
    assert str(path) in str(e.value)


def test_translate_is_the_net_at_its_size_then_upscaled(saved):
    net, _ = saved
    photos = _photos(5, size=32)
    with torch.no_grad():
        expected = to_uint8(net(to_model_input(photos, CPU)))
    same = generator_file.translate(net, photos, 32, CPU, autocast(CPU, None), batch_size=2)
    assert same.dtype == torch.uint8 and torch.equal(same, expected)  # batching changes nothing
    big = generator_file.translate(net, photos, 32, CPU, autocast(CPU, None), out_size=256)
    # upscaled before rounding: one quantisation, of the bicubic upscale of the net's output
    with torch.no_grad():
        y = torch.nn.functional.interpolate(net(to_model_input(photos, CPU)), size=(256, 256), mode="bicubic")
    diff = (big.int() - to_uint8(y).int()).abs()
    assert big.shape == (5, 256, 256, 3) and diff.max() <= 1 and (diff > 0).float().mean() < 1e-4
    # photos of another size are brought to the generator's size first; by default the paintings
    # come back at the photos' size
    photos64 = _photos(2, size=64)
    out64 = generator_file.translate(net, photos64, 32, CPU, autocast(CPU, None))
    via32 = generator_file.translate(net, shards.resize_uint8(photos64, 32), 32, CPU, autocast(CPU, None), out_size=64)
    assert out64.shape == (2, 64, 64, 3) and torch.equal(out64, via32)


def test_a_photo_is_painted_alike_whatever_batch_it_falls_in(saved):
    # a batch of one is convolved with other kernels: on an AVX2 CPU in fp32 a lone photo (the last
    # of a shard, or one sent to the served model) came out one level apart in a few values, and
    # `-S generate.batch_size=5` made other JPEGs, so DVC reran evaluate and package
    net, _ = saved
    photos = _photos(24)

    def painted(photos, batch_size):
        return generator_file.translate(net, photos, 32, CPU, autocast(CPU, None), out_size=256, batch_size=batch_size)

    whole = painted(photos, 24)
    for batch_size in (1, 5, 16):
        assert torch.equal(painted(photos, batch_size), whole), batch_size
    assert torch.equal(painted(photos[7:8], 64), whole[7:8])


@pytest.mark.parametrize("size, out_size", [(32, 256), (64, 256), (64, 128), (7, 20)])
def test_upscale_is_torch_bicubic(size, out_size):
    y = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    expected = torch.nn.functional.interpolate(y, size=(out_size, out_size), mode="bicubic", align_corners=False)
    torch.testing.assert_close(generator_file.upscale(y, out_size), expected, rtol=0, atol=2e-6)
    assert generator_file.upscale(y, size) is y


def test_translate_gives_training_mode_back(saved):
    net, _ = saved
    net.train()
    generator_file.translate(net, _photos(2, size=32), 32, CPU, autocast(CPU, None))
    assert net.training


def test_generate_stage_writes_every_photo_as_its_translation(tmp_path, saved):
    net, path = saved
    photos = _photos(7)
    names = [f"p{i:02d}" for i in range(7)]
    rows = shards.write_domain(((({"image_name": n, "tfrecord": "x", "record": i}), photos[i].numpy())
                                for i, n in enumerate(names)), tmp_path / "shards", "photo", shard_size=3)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=shards.MANIFEST_COLUMNS).to_csv(manifest, index=False)

    count = generate(tmp_path / "shards", manifest, path, tmp_path / "out", "cpu", "fp32", batch_size=2, quality=95)
    assert count == 7
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{n}.jpg" for n in names]
    expected = generator_file.translate(net, photos, 32, CPU, autocast(CPU, None), out_size=256)
    for i, name in enumerate(names):
        with Image.open(tmp_path / "out" / f"{name}.jpg") as img:
            assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
            err = np.abs(np.asarray(img).astype(int) - expected[i].numpy().astype(int)).mean()
        assert err < 4, (name, err)  # JPEG loss only: each file is its own photo's translation


@pytest.mark.parametrize("kept", [0.02, 0.1, 0.5, 0.9, 0.999])
def test_a_generator_file_cut_short_is_one_clear_error(saved, tmp_path, kept):
    # some lengths sent torch's reader to seek before the file's start: an OSError traceback
    _, path = saved
    short = tmp_path / "short.pt"
    data = path.read_bytes()
    short.write_bytes(data[:int(len(data) * kept)])
    with pytest.raises(DataError, match=r"not a generator saved by the train stage \(\w+\)$"):
        generator_file.load(short, CPU)
    with pytest.raises(DataError, match="a folder, not a generator file"):
        generator_file.load(tmp_path, CPU)
