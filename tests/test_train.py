import dataclasses
import json
import shutil

import pytest
import torch
from tqdm import tqdm

from pipeline import runtime
from pipeline import train as train_stage
from pipeline.cyclegan import NonFiniteLoss, Trainer, build_nets
from pipeline.distributed import World
from pipeline.errors import PipelineError, brief
from pipeline.params import parse

P = parse({"image_size": 32, "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "batch_size": 2,
                                       "epochs": 3, "steps_per_epoch": 2, "decay_from_epoch": 1, "pool_size": 3}})


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g))


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    photos, monets = _data()
    whole, _ = train_stage.train(P, photos, monets, tmp_path / "a.pt", "key", print_fn=lambda *_: None)

    real_step = Trainer.train_step
    calls = {"n": 0}

    def dying_step(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:  # in the second epoch: the checkpoint holds epoch 1
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage.train(P, photos, monets, tmp_path / "b.pt", "key", print_fn=lambda *_: None)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    said = []
    resumed, history = train_stage.train(P, photos, monets, tmp_path / "b.pt", "key", print_fn=said.append)
    assert any("resuming" in s and "step 2" in s for s in said)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for name, net in whole.nets.modules().items():
        other = resumed.nets.modules()[name].state_dict()
        for k, v in net.state_dict().items():
            assert torch.allclose(v, other[k], atol=1e-6), (name, k)


def test_a_resumed_trainings_seconds_count_the_epochs_before_the_kill(tmp_path, monkeypatch):
    # train.json's `seconds` is the model's training time: a finished checkpoint resumed by a rerun
    # (a logging change) trains 0 s, and `dvc exp show` said 0.1 s for a model that took 92 s
    import argparse

    checkpoint = _interrupted(tmp_path, monkeypatch, at_call=4)  # epoch 1 of 3 kept
    before = torch.load(checkpoint, weights_only=True)["history"]
    photos, monets = _data()
    trainer, history = train_stage.train(P, photos, monets, checkpoint, "key", print_fn=lambda *_: None)
    assert history[0] == before[0] and len(history) == 3
    args = argparse.Namespace(**{k: tmp_path / f"{k}.out" for k in ("generator", "reverse_generator", "grid",
                                                                      "curve", "metrics")})
    train_stage.save_outputs(P, args, trainer, history, photos[:2], 6, 4, 1)
    seconds = json.loads(args.metrics.read_text())["seconds"]
    assert seconds == round(sum(h["seconds"] for h in history), 1)  # epoch 1's, from before the kill, too


def test_checkpoint_for_other_params_is_not_resumed(tmp_path):
    photos, monets = _data()
    train_stage.train(P, photos, monets, tmp_path / "c.pt", "key-1", print_fn=lambda *_: None)
    said = []
    train_stage.train(P, photos, monets, tmp_path / "c.pt", "key-2", print_fn=said.append)
    assert any("starting afresh" in s for s in said)


def test_fingerprint_follows_training_params_and_data(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("a\n")
    base = train_stage.fingerprint(P, m, "cpu None")
    assert train_stage.fingerprint(dataclasses.replace(P, lambda_cycle=5.0), m, "cpu None") != base
    other_generate = dataclasses.replace(P, generate=dataclasses.replace(P.generate, batch_size=7))
    assert train_stage.fingerprint(other_generate, m, "cpu None") == base  # not a training param
    # `device: auto` and `precision: auto` resolve per machine: a CPU checkpoint did not load on CUDA
    assert train_stage.fingerprint(P, m, "cuda torch.bfloat16") != base
    m.write_text("b\n")
    assert train_stage.fingerprint(P, m, "cpu None") != base


def test_fingerprint_follows_the_training_code_but_not_the_mlflow_code(tmp_path):
    # DVC reruns train when its code changes: a finished checkpoint of the old training code must
    # not be "resumed" as the new run (it was: 0 steps, the old weights saved as the new ones)
    m = tmp_path / "manifest.csv"
    m.write_text("a\n")
    code = tmp_path / "pipeline"
    shutil.copytree(train_stage.CODE_DIR, code, ignore=shutil.ignore_patterns("__pycache__"))
    base = train_stage.fingerprint(P, m, "cpu None", code)
    assert base == train_stage.fingerprint(P, m, "cpu None")
    with open(code / "tracking.py", "a") as f:
        f.write("# logging changed\n")
    assert train_stage.fingerprint(P, m, "cpu None", code) == base
    with open(code / "cyclegan.py", "a") as f:
        f.write("# the loss changed\n")
    assert train_stage.fingerprint(P, m, "cpu None", code) != base


def test_learning_rate_is_constant_then_linear_to_zero_at_the_end():
    p = dataclasses.replace(P, train=dataclasses.replace(P.train, epochs=3, steps_per_epoch=2, decay_from_epoch=1))
    trainer = Trainer(build_nets(p), p, torch.device("cpu"), None)
    photos, monets = (torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2))
    lrs = []
    for _ in range(6):
        lrs.append((trainer.opt_G.param_groups[0]["lr"], trainer.opt_D.param_groups[0]["lr"]))
        trainer.train_step(photos, monets)
    lr = p.train.lr
    # the lr each of the 6 steps used: constant for the first epoch, then down by lr/4 a step ...
    assert [g for g, _ in lrs] == pytest.approx([lr, lr, lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])
    assert [d for _, d in lrs] == [g for g, _ in lrs]
    # ... reaching zero after the last one
    assert trainer.opt_G.param_groups[0]["lr"] == 0 and trainer.opt_D.param_groups[0]["lr"] == 0


def test_no_decay_keeps_the_learning_rate(tmp_path):
    p = dataclasses.replace(P, train=dataclasses.replace(P.train, epochs=1, steps_per_epoch=3, decay_from_epoch=1))
    trainer = Trainer(build_nets(p), p, torch.device("cpu"), None)
    photos, monets = (torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2))
    for _ in range(3):
        trainer.train_step(photos, monets)
    assert trainer.opt_G.param_groups[0]["lr"] == p.train.lr


def test_checkpoint_loads_with_weights_only_and_holds_the_rng_states(tmp_path):
    photos, monets = _data()
    train_stage.train(P, photos, monets, tmp_path / "c.pt", "key", print_fn=lambda *_: None, row="run-1")
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # plain tensors and containers only
    assert set(state) == {"fingerprint", "processes", "trainer", "ranks", "history", "row"}
    # the MLflow row it logs into: the one a resumed training takes up
    assert train_stage.resumed_row(tmp_path / "c.pt", "key", World(), 6) == "run-1"
    assert train_stage.resumed_row(tmp_path / "c.pt", "other params", World(), 6) is None
    assert state["processes"] == 1 and len(state["ranks"]) == 1 and state["trainer"]["step"] == 6
    mine = state["ranks"][0]  # what is this process's own: RNGs and pools
    assert mine["rng"]["cpu"].dtype == torch.uint8 and mine["data_rng"].dtype == torch.uint8
    assert len(mine["pool_M"]["images"]) == 3


def _interrupted(tmp_path, monkeypatch, at_call: int):
    """A training of P killed at its `at_call`-th step; returns the checkpoint path."""
    photos, monets = _data()
    real_step = Trainer.train_step
    calls = {"n": 0}

    def dying_step(self, *a):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage.train(P, photos, monets, tmp_path / "k.pt", "key", print_fn=lambda *_: None)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return tmp_path / "k.pt"


def test_an_unfinished_checkpoint_of_another_process_count_is_a_clear_error(tmp_path, monkeypatch):
    ckpt = _interrupted(tmp_path, monkeypatch, at_call=4)
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "processes": 2, "ranks": state["ranks"] * 2}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(PipelineError, match=r"step 2 of a run with 2 processes, and this run has 1: "
                                            r"set train.processes=2 to resume it"):
        train_stage.train(P, *_data(), ckpt, "key", print_fn=lambda *_: None)
    assert ckpt.read_bytes() == before  # kept for the resume the message offers
    # the stage refuses it before opening the MLflow row, with the same line
    with pytest.raises(PipelineError, match=r"step 2 of a run with 2 processes, and this run has 1: "):
        train_stage.resumed_row(ckpt, "key", World(), 6)
    # a state of another layout that names another process count is not taken for a finished run
    # (a KeyError traceback before the row, or a fresh start over it in training): loading says so
    torch.save({**state, "processes": 2, "trainer": {"weights": 1}}, ckpt)
    assert train_stage.resumed_row(ckpt, "key", World(), 6) == ""
    with pytest.raises(PipelineError, match=r"does not load into this code's training state"):
        train_stage.train(P, *_data(), ckpt, "key", print_fn=lambda *_: None)


@pytest.mark.parametrize("spoil, needle", [
    (lambda path: path.write_bytes(path.read_bytes()[:1000]), "does not read back as a checkpoint"),
    (lambda path: torch.save([1, 2], path), "does not read back as a checkpoint .*holds a list"),
    (lambda path: torch.save({**torch.load(path, weights_only=True), "ranks": []}, path),  # an IndexError from the loader
     "does not load into this code's training state \\(IndexError: list index out of range\\)"),
    (lambda path: torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "trainer"}, path),
     "does not load into this code's training state \\(KeyError: 'trainer'\\)"),
    (lambda path: torch.save(_with_wider_first_conv(torch.load(path, weights_only=True)), path),
     "matches these params and data but does not load into this code's training state"),
])
def test_a_checkpoint_that_does_not_load_is_a_clear_error_and_kept(tmp_path, monkeypatch, spoil, needle):
    ckpt = _interrupted(tmp_path, monkeypatch, at_call=4)
    spoil(ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(PipelineError, match=needle):
        train_stage.train(P, *_data(), ckpt, "key", print_fn=lambda *_: None)
    assert ckpt.read_bytes() == before


def test_an_exception_is_one_short_line_even_without_a_message():
    assert brief(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert brief(AssertionError()) == "AssertionError: "
    assert len(brief(ValueError("x" * 500))) == len("ValueError: ") + 120


def _with_wider_first_conv(state):
    # what a checkpoint written by other network code looks like: a layer of another shape
    nets = state["trainer"]["nets"]["G"]
    key = next(k for k in nets if k.endswith("weight") and nets[k].ndim == 4)
    nets[key] = torch.zeros(nets[key].shape[0] + 1, *nets[key].shape[1:])
    return state


def test_a_finished_checkpoint_of_another_process_count_starts_afresh_and_says_so(tmp_path):
    photos, monets = _data()
    train_stage.train(P, photos, monets, tmp_path / "f.pt", "key", print_fn=lambda *_: None)
    state = torch.load(tmp_path / "f.pt", weights_only=True)
    torch.save({**state, "processes": 4}, tmp_path / "f.pt")
    said = []
    _, history = train_stage.train(P, photos, monets, tmp_path / "f.pt", "key", print_fn=said.append)
    assert any("finished run with 4 processes; starting afresh" in s for s in said)
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    photos, monets = _data()
    real_step = Trainer.train_step

    def poisoning_step(self, *a):
        if self.step == 3:  # the first step of epoch 2 (step 4) runs on poisoned weights
            with torch.no_grad():
                next(self.nets.G.parameters()).fill_(float("nan"))
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "train_step", poisoning_step)
    p = dataclasses.replace(P, train=dataclasses.replace(P.train, steps_per_epoch=3, log_every=100))
    with pytest.raises(NonFiniteLoss, match=r"^train: loss_G_adv is not finite at step 4; stopped") as e:
        train_stage.train(p, photos, monets, tmp_path / "n.pt", "key", print_fn=lambda *_: None)
    assert "\n" not in str(e.value)
    # the progress bar is closed now, not left to print itself again after the stage's error line
    assert not [bar for bar in tqdm._instances if bar.desc == "train"]
    state = torch.load(tmp_path / "n.pt", weights_only=True)
    assert state["trainer"]["step"] == 3  # epoch 1's checkpoint, untouched by the failed epoch
    assert all(torch.isfinite(v).all() for v in state["trainer"]["nets"]["G"].values())


def test_loss_meter_names_the_first_non_finite_step_and_loss():
    # a PipelineError: the stage's cli() turns it into one `error: ...` line and exit code 2
    from pipeline.cyclegan import LossMeter

    meter = LossMeter(torch.device("cpu"))
    meter.add(1, {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)})
    meter.add(2, {"loss_a": torch.tensor(float("inf")), "loss_b": torch.tensor(float("nan"))})
    meter.add(3, {"loss_a": torch.tensor(float("nan")), "loss_b": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLoss, match="loss_a is not finite at step 2"):
        meter.check()
    assert isinstance(NonFiniteLoss("x"), PipelineError)


CPUINFO = """processor\t: {n}
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma {extra}
bugs\t\t: sysret_ss_attrs spectre_v1 {bug}
"""


@pytest.mark.parametrize("extra, bug, bf16", [("", "", False), ("avx512f avx512_bf16", "", True),
                                              ("amx_tile amx_bf16", "", True), ("avx512f", "avx512_bf16", False)])
def test_auto_precision_uses_bf16_on_the_cpu_only_where_its_flags_list_bf16_instructions(
        tmp_path, monkeypatch, extra, bug, bf16):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(CPUINFO.format(n=n, extra=extra, bug=bug) for n in range(2)))
    assert runtime.cpu_has_bf16(cpuinfo) is bf16
    assert runtime.cpu_has_bf16(tmp_path / "missing") is False  # no /proc (another OS): fp32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: bf16)
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("auto", cpu) == (torch.bfloat16 if bf16 else None)
    assert runtime.autocast_dtype("fp32", cpu) is None and runtime.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_auto_precision_is_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    # torch's is_bf16_supported() says yes on a V100 or T4 by default (emulation): auto took bf16 there
    gpu = torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
        assert runtime.autocast_dtype("auto", gpu) == (torch.bfloat16 if native else None)
    assert runtime.autocast_dtype("bf16", gpu) == torch.bfloat16  # asked for: as asked


def test_the_cpu_description_names_the_threads_that_shape_the_arithmetic():
    """The same params train other bytes on 1 thread than on 2 (sums split across threads round
    differently), so the log line and the run's tag train.device_description say how many."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert runtime.describe(torch.device("cpu"), None).endswith(", 1 thread), fp32")
        torch.set_num_threads(2)
        assert runtime.describe(torch.device("cpu"), torch.bfloat16).endswith(", 2 threads), bf16 autocast")
    finally:
        torch.set_num_threads(before)


def test_each_rank_draws_its_batches_and_random_ops_from_streams_of_their_own():
    # seeds of seed + rank made rank 0's batches replay the weights' init and rank r's batches the
    # dropout and DiffAugment draws of rank r (with DDP on the CPU; on CUDA of every rank): the
    # first batch's flips and the saturation draws came out the same bits
    seed = 5
    streams = [runtime.stream_seed(seed, rank, s) for rank in range(8)
               for s in (train_stage.RANDOM_OPS, train_stage.BATCHES)]
    assert len(set(streams)) == len(streams) and not set(streams) & set(range(seed, seed + 9))
    assert all(0 <= s < 2**32 for s in streams)  # torch keeps 32 bits of a CPU seed
    init = torch.rand(8, generator=torch.Generator().manual_seed(seed))
    batches = torch.rand(8, generator=torch.Generator().manual_seed(runtime.stream_seed(seed, 0, train_stage.BATCHES)))
    assert not torch.equal(init, batches)
    assert runtime.stream_seed(seed, 1, 0) == runtime.stream_seed(seed, 1, 0)  # reproducible
