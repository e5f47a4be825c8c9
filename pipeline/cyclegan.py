"""The CycleGAN: two generators, two discriminators, one optimisation step that reads like the
paper (Zhu et al. 2017), the pool of past fakes, and checkpoints that resume everything."""
from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline import generator_file
from pipeline.diffaugment import Augment
from pipeline.networks import GANLoss, define_discriminator, to_model_input
from pipeline.params import Params
from pipeline.errors import PipelineError
from pipeline.runtime import autocast, describe, local, uncompiled


class ImagePool:
    """Past fakes for the discriminator (Shrivastava et al.): with probability 1/2 a new fake is
    swapped for a stored one, which damps oscillation. Its own seeded RNG, saved with the checkpoint."""

    def __init__(self, size: int, seed: int):
        self.size, self.images, self.rng = size, [], random.Random(seed)

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for img in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self.rng.random() < 0.5:
                k = self.rng.randrange(self.size)
                out.append(self.images[k].clone())
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"images": [i.cpu() for i in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.images = [i.to(device) for i in state["images"]]
        self.rng.setstate(state["rng"])


@dataclass
class Nets:
    G: nn.Module    # photo -> Monet
    F: nn.Module    # Monet -> photo
    D_M: nn.Module  # is this a Monet?
    D_P: nn.Module  # is this a photo?

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "F": self.F, "D_M": self.D_M, "D_P": self.D_P}

    def map(self, fn: Callable[[nn.Module], nn.Module]) -> "Nets":
        return Nets(**{name: fn(m) for name, m in self.modules().items()})


def build_nets(p: Params) -> Nets:
    cfg = generator_file.config_of(p)
    return Nets(G=generator_file.build(cfg), F=generator_file.build(cfg),
                D_M=define_discriminator(p.train.disc_filters), D_P=define_discriminator(p.train.disc_filters))


class WeightAverage:
    """An exponential moving average of both generators' weights (`train.ema` is its decay), kept
    beside the trained ones; the saved generators are the averages. The decay ramps up as
    min(decay, (1 + step) / (10 + step)) so the random initial weights fade within the first
    steps instead of weighing 0.999^steps at the end."""

    def __init__(self, nets: Nets, decay: float):
        self.decay = decay
        self.G = copy.deepcopy(uncompiled(nets.G)).requires_grad_(False)
        self.F = copy.deepcopy(uncompiled(nets.F)).requires_grad_(False)

    def pairs(self, nets: Nets):
        return ((self.G, uncompiled(nets.G)), (self.F, uncompiled(nets.F)))

    @torch.no_grad()
    def update(self, nets: Nets, step: int) -> None:
        """Move the averages towards `nets`' generators after optimiser step number `step` (from 1)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, net in self.pairs(nets):
            for a, w in zip(average.parameters(), net.parameters()):
                a.lerp_(w, 1 - decay)
            for a, w in zip(average.buffers(), net.buffers()):
                a.copy_(w)

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "F": self.F.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.F.load_state_dict(state["F"])


def lr_factor(step: int, total: int, decay_start: int) -> float:
    """The paper's schedule: constant, then linear to zero, reached after the last of `total` steps."""
    return 1.0 - max(0, step - decay_start) / max(1, total - decay_start)


def sample_batch(images: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch (with replacement) of uint8 N×H×W×3 images, each flipped left-right with p=1/2,
    drawn on the images' device with `gen` (a generator of that device): no host round trip."""
    idx = torch.randint(len(images), (batch_size,), generator=gen, device=images.device)
    batch = images[idx]
    flip = torch.rand(batch_size, generator=gen, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(2), batch)


def together(net: nn.Module, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`net` of each batch, in one call on their concatenation. The same numbers as one call per
    batch, since every layer of these networks works on each image alone (instance norm, no batch
    norm; tested), but fewer and larger kernels: the training step 8% faster on 2 cores."""
    return net(torch.cat(batches)).split([len(b) for b in batches])


class Trainer:
    """Optimisers, schedules, losses and the pools around a set of Nets (plain, compiled, or
    DistributedDataParallel). `rank` gives each process its own pool RNG streams."""

    def __init__(self, nets: Nets, p: Params, device: torch.device, autocast_dtype: torch.dtype | None,
                 rank: int = 0):
        t = p.train
        self.nets, self.p, self.device = nets, p, device
        # one fused kernel per parameter group on CUDA instead of a loop of small ones
        adam = functools.partial(torch.optim.Adam, lr=t.lr, betas=(t.beta1, 0.999), fused=device.type == "cuda")
        self.opt_G = adam(list(nets.G.parameters()) + list(nets.F.parameters()))
        self.opt_D = adam(list(nets.D_M.parameters()) + list(nets.D_P.parameters()))
        total, decay_start = t.epochs * t.steps_per_epoch, t.decay_from_epoch * t.steps_per_epoch
        schedule = functools.partial(lr_factor, total=total, decay_start=decay_start)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, schedule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, schedule)
        self.gan = GANLoss(t.gan_loss)
        self.l1 = nn.L1Loss()
        self.pool_M = ImagePool(t.pool_size, p.seed + 1 + 2 * rank)
        self.pool_P = ImagePool(t.pool_size, p.seed + 2 + 2 * rank)
        # a mode that is off does nothing: the step never asks which precision it runs in
        self.autocast = autocast(device, autocast_dtype)
        self.dtype = autocast_dtype
        self.augment = Augment(t.diffaugment_policy)
        self.average = WeightAverage(nets, t.ema) if t.ema > 0 else None
        self.step = 0

    def generators(self) -> tuple[nn.Module, nn.Module]:
        """The photo→Monet and Monet→photo generators to save and use: the weight averages when on."""
        if self.average:
            return self.average.G, self.average.F
        return uncompiled(self.nets.G), uncompiled(self.nets.F)

    def describe(self) -> str:
        return describe(self.device, self.dtype)

    def train_on(self, photos: torch.Tensor, monets: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One step on batches drawn from uint8 N×H×W×3 photos and paintings (best kept on the device)."""
        t = self.p.train
        real_P = to_model_input(sample_batch(photos, t.batch_size, gen), self.device, t.channels_last)
        real_M = to_model_input(sample_batch(monets, t.batch_size, gen), self.device, t.channels_last)
        return self.train_step(real_P, real_M)

    def train_step(self, real_P: torch.Tensor, real_M: torch.Tensor) -> dict[str, torch.Tensor]:
        """One CycleGAN step on a batch of photos (P) and paintings (M), both N×3×H×W in [-1, 1].
        Returns the losses as 0-d tensors on the device: reading them is the caller's (rare) sync."""
        n, p = self.nets, self.p
        lam_cyc, lam_idt = p.lambda_cycle, p.lambda_identity * p.lambda_cycle
        # the generators' step looks through the discriminators without training them: their
        # forward outside DDP, so no gradient sync is set up for weights that get no gradient
        D_M, D_P = local(n.D_M), local(n.D_P)
        # DiffAugment: one draw per step, the same for every batch a discriminator sees in it
        aug = self.augment.draw(len(real_P), real_P.shape[-1], real_P.device) if self.augment else None
        seen = (lambda x: self.augment(x, aug)) if aug else (lambda x: x)

        # generators: fool both discriminators, reconstruct both cycles, keep identities
        for d in (n.D_M, n.D_P):
            d.requires_grad_(False)
        with self.autocast():
            if lam_idt > 0:  # the identity images G(M) ≈ M and F(P) ≈ P preserve colour composition
                fake_M, idt_M = together(n.G, real_P, real_M)  # G(P), G(M)
                fake_P, idt_P = together(n.F, real_M, real_P)  # F(M), F(P)
            else:
                fake_M, fake_P = n.G(real_P), n.F(real_M)
            rec_P = n.F(fake_M)    # F(G(P)) ≈ P
            rec_M = n.G(fake_P)    # G(F(M)) ≈ M
            loss_G_adv = self.gan(D_M(seen(fake_M)), True)
            loss_F_adv = self.gan(D_P(seen(fake_P)), True)
            loss_cyc = self.l1(rec_P.float(), real_P) + self.l1(rec_M.float(), real_M)
            loss_idt = torch.zeros((), device=real_P.device)
            if lam_idt > 0:
                loss_idt = self.l1(idt_M.float(), real_M) + self.l1(idt_P.float(), real_P)
            loss_gen = loss_G_adv + loss_F_adv + lam_cyc * loss_cyc + lam_idt * loss_idt
        self.opt_G.zero_grad(set_to_none=True)
        loss_gen.backward()
        self.opt_G.step()

        # discriminators: real vs. a pooled past fake, halved as in the paper
        for d in (n.D_M, n.D_P):
            d.requires_grad_(True)
        with self.autocast():
            pooled_M = self.pool_M.query(fake_M.detach())
            pooled_P = self.pool_P.query(fake_P.detach())
            on_real_M, on_fake_M = together(n.D_M, seen(real_M), seen(pooled_M))
            on_real_P, on_fake_P = together(n.D_P, seen(real_P), seen(pooled_P))
            loss_D_M = 0.5 * (self.gan(on_real_M, True) + self.gan(on_fake_M, False))
            loss_D_P = 0.5 * (self.gan(on_real_P, True) + self.gan(on_fake_P, False))
        self.opt_D.zero_grad(set_to_none=True)
        (loss_D_M + loss_D_P).backward()
        self.opt_D.step()

        self.sched_G.step()
        self.sched_D.step()
        self.step += 1
        if self.average:
            self.average.update(self.nets, self.step)
        losses = {"loss_G_adv": loss_G_adv, "loss_F_adv": loss_F_adv, "loss_cycle": loss_cyc,
                  "loss_identity": loss_idt, "loss_D_M": loss_D_M, "loss_D_P": loss_D_P}
        return {k: v.detach() for k, v in losses.items()}

    def state_dict(self) -> dict:
        """What every rank shares: the plain modules' weights (no `module.` or `_orig_mod.`
        prefixes), the optimisers, the schedules and the step."""
        return {
            "nets": {k: uncompiled(m).state_dict() for k, m in self.nets.modules().items()},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "step": self.step, **({"average": self.average.state_dict()} if self.average else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.nets.modules().items():
            uncompiled(m).load_state_dict(state["nets"][k])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])
        self.step = state["step"]
        if self.average:
            self.average.load_state_dict(state["average"])

    def pools_state(self) -> dict:
        """What is this rank's own: its pools of past fakes and their RNGs."""
        return {"pool_M": self.pool_M.state_dict(), "pool_P": self.pool_P.state_dict()}

    def load_pools_state(self, state: dict) -> None:
        self.pool_M.load_state_dict(state["pool_M"], self.device)
        self.pool_P.load_state_dict(state["pool_P"], self.device)


class NonFiniteLoss(PipelineError):
    """A loss went NaN or infinite: training stops, and the last checkpoint stays as it was."""


class LossMeter:
    """Losses summed on the device step after step, with the first non-finite one remembered there
    too: nothing waits on the host until `check` or `means` is called (every log_every steps)."""

    def __init__(self, device: torch.device):
        self.device, self.names = device, []
        self.reset()

    def reset(self) -> None:
        self.sums, self.count = None, 0
        self.first_bad = torch.full((), _NONE, dtype=torch.long, device=self.device)  # step * 8 + loss index

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.names = list(losses)
        values = torch.stack([v.float() for v in losses.values()])  # (losses,)
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1
        index = torch.arange(len(values), device=values.device)
        code = torch.where(torch.isfinite(values), _NONE, step * 8 + index).min()
        self.first_bad = torch.minimum(self.first_bad, code)

    def check(self, reduce_min=lambda t: t) -> None:
        """Raise NonFiniteLoss naming the first bad step and loss (over all ranks via `reduce_min`)."""
        code = int(reduce_min(self.first_bad.clone()).item())
        if code != _NONE:
            step, which = divmod(code, 8)
            raise NonFiniteLoss(f"train: {self.names[which]} is not finite at step {step}; stopped there, "
                                f"and the checkpoint keeps the last good epoch (a lower train.lr may help)")

    def means(self, reduce_sum=lambda t: t, world_size: int = 1) -> dict[str, float]:
        """Mean of each loss since the last reset (over all ranks via `reduce_sum`)."""
        sums = reduce_sum(self.sums.clone()) / (self.count * world_size)
        return dict(zip(self.names, sums.tolist()))


_NONE = torch.iinfo(torch.long).max  # "no non-finite loss yet"
