"""Image classification in the style of torchvision's reference script, made resumable by the harness.

    python -m harness.launch script=examples/vision/train.py name=vision trainer.max_steps=240 \
        checkpoint.every_steps=20 'script_args=["--workers=2"]'

The shape of torchvision's ``references/classification/train.py`` (its presets, transforms, RASampler,
``ExponentialMovingAverage`` and mixup/cutmix collate), written with torch alone so that it runs on
the CPU wheel of torch (torchvision's PyPI wheels need PyPI's CUDA build):

- a repeated-augmentation sampler (``RASampler``: every image 3 times per epoch, the copies on
  different ranks, ``set_epoch``), passed to ``session.loader`` as ``sampler=``;
- per-sample random augmentation in the dataset (random crop with padding, horizontal flip);
- mixup or cutmix, chosen at random per batch, in the ``collate_fn`` (as transforms.v2 recommends);
- label smoothing; SGD with momentum; a linear warm-up then cosine schedule stepped once per epoch;
  gradient clipping; bf16 autocast; an EMA of the weights, reset while warming up (gated by
  epoch), and an evaluation of the model and of its EMA at every epoch's end.

The images are generated from a seed (nothing is downloaded): each class is a pattern of its own
under noise. The harness adds only the ``session.*`` lines: every random draw above (the sampler's
epoch order, each sample's crop and flip, each batch's mixup) replays exactly after a resume, also
with another ``--workers``, so an interrupted run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

import harness

# Per-channel mean and standard deviation the generated images are normalised with (the role of
# ImageNet's statistics in torchvision's presets).
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASS_COLOURS_SEED = 1234  # the classes' colours: a property of the task, not of a dataset's seed


# ----- the data: a synthetic image set, generated from a seed --------------------------------------
class SyntheticImages(Dataset):
    """``num_samples`` RGB images of ``size`` x ``size`` pixels in ``num_classes`` classes, made once
    from ``seed``: class ``c`` is a bar at an angle and in a colour of its own (the same for every
    seed, so a training and a validation set agree), shifted at random, plus pixel noise.
    ``transform`` (per sample, e.g. ``TrainPreset``) receives a float image in [0, 1]."""

    def __init__(self, num_samples: int, size: int, num_classes: int, seed: int, transform=None):
        palette = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(CLASS_COLOURS_SEED))
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        angles = self.labels.float() * math.pi / num_classes  # one orientation per class
        offsets = torch.rand(num_samples, generator=generator) * size / 2 - size / 4
        distance = ((cols - size / 2) * torch.cos(angles)[:, None, None]
                    + (rows - size / 2) * torch.sin(angles)[:, None, None] - offsets[:, None, None]).abs()
        bar = (distance < size / 8).float()
        colours = palette[self.labels]
        noise = torch.rand(num_samples, 3, size, size, generator=generator)
        self.images = (0.6 * bar[:, None] * colours[:, :, None, None] + 0.4 * noise).clamp(0, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class TrainPreset:
    """torchvision's ``ClassificationPresetTrain`` in miniature: a random crop of the image padded
    by ``padding`` pixels, a horizontal flip with probability ``flip_p``, normalisation. It draws
    from torch's global RNG, as torchvision's transforms do; the harness seeds it per sample."""

    def __init__(self, padding: int = 2, flip_p: float = 0.5):
        self.padding, self.flip_p = padding, flip_p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        padded = F.pad(image, (self.padding,) * 4, mode="reflect")
        top, left = torch.randint(2 * self.padding + 1, (2,)).tolist()
        image = padded[:, top:top + height, left:left + width]
        if torch.rand(()) < self.flip_p:
            image = image.flip(-1)
        return normalize(image)


def normalize(image: torch.Tensor) -> torch.Tensor:
    return (image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


class RASampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; torchvision's and DeiT's ``RASampler``): each
    epoch, every index is repeated ``repetitions`` times and the copies are dealt to different ranks,
    so a batch over all ranks holds several augmentations of the same image. Like DistributedSampler,
    its order is a function of ``seed + epoch`` (``set_epoch``); each rank yields
    ``len(dataset) // num_replicas`` indices per epoch (torchvision also rounds down to a multiple
    of 256, which this small example leaves out)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 repetitions: int = 3):
        self.size, self.num_replicas, self.rank = len(dataset), num_replicas, rank
        self.shuffle, self.seed, self.repetitions, self.epoch = shuffle, seed, repetitions, 0
        self.num_samples = math.ceil(self.size * repetitions / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = self.size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.size, generator=generator).tolist()
        else:
            indices = list(range(self.size))
        indices = [index for index in indices for _ in range(self.repetitions)]
        indices += indices[:self.total_size - len(indices)]  # pad to a multiple of the ranks
        return iter(indices[self.rank:self.total_size:self.num_replicas][:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples


class RandomMixupCutmix:
    """The batch transform of torchvision's reference (``RandomChoice([MixUp, CutMix])`` applied in
    the ``collate_fn``): collate the batch, turn labels into one-hot vectors, then mix every image
    with the batch rolled by one, by mixup (a blend of whole images) or cutmix (a pasted box), each
    with probability 1/2, with ``lambda ~ Beta(alpha, alpha)``; the labels mix in proportion.

    A class, not a closure, so DataLoader workers can receive it under any start method. Its draws
    come from torch's global RNG; the harness seeds them per batch from (seed, epoch, position,
    rank), in a worker or in the main process alike."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(samples)
        targets = F.one_hot(labels, self.num_classes).float()
        if torch.rand(()) < 0.5:
            return self._mixup(images, targets)
        return self._cutmix(images, targets)

    def _mixup(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
        return (lam * images + (1 - lam) * images.roll(1, 0),
                lam * targets + (1 - lam) * targets.roll(1, 0))

    def _cutmix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(torch.distributions.Beta(self.cutmix_alpha, self.cutmix_alpha).sample())
        height, width = images.shape[-2:]
        centre_y, centre_x = torch.randint(height, ()).item(), torch.randint(width, ()).item()
        half_h, half_w = int(height * math.sqrt(1 - lam)) // 2, int(width * math.sqrt(1 - lam)) // 2
        top, bottom = max(centre_y - half_h, 0), min(centre_y + half_h, height)
        left, right = max(centre_x - half_w, 0), min(centre_x + half_w, width)
        images = images.clone()
        images[:, :, top:bottom, left:right] = images.roll(1, 0)[:, :, top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / (height * width)  # the box actually pasted
        return images, kept * targets + (1 - kept) * targets.roll(1, 0)


# ----- the model: a small ResNet ------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, a projected shortcut when the
    shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision's EMA of a model's parameters and buffers: ``decay * ema + (1 - decay) * model``.
    A module with ``state_dict()/load_state_dict()`` (its ``n_averaged`` too): register it."""

    def __init__(self, model: nn.Module, decay: float):
        def ema_average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            return decay * averaged + (1 - decay) * current

        super().__init__(model, avg_fn=ema_average, use_buffers=True)


# ----- optimisation -------------------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """torchvision's ``set_weight_decay`` with ``norm_weight_decay=0``: no decay on norm layers."""
    norm_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    norm_ids = {id(p) for p in norm_params}
    others = [p for p in model.parameters() if id(p) not in norm_ids]
    return [{"params": others, "weight_decay": weight_decay}, {"params": norm_params, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_epochs: int, epochs: int,
                   warmup_decay: float) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up over ``warmup_epochs``, then cosine annealing to the last epoch; stepped once
    per epoch, as in torchvision's reference."""
    main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup_epochs))
    if warmup_epochs == 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_decay, total_iters=warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


# ----- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(session: harness.Session, model: nn.Module, loader: DataLoader) -> float | None:
    """Top-1 accuracy over every rank's share of the validation set; None when a stop was agreed
    meanwhile (the step then ends, the harness saves it and stops)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    try:
        for images, labels in loader:
            if session.check_stop():  # a collective: every rank runs the same number of batches
                return None
            predicted = model(images.to(session.device)).argmax(dim=1).cpu()
            totals += torch.tensor([float((predicted == labels).sum()), float(len(labels))], dtype=torch.float64)
    finally:
        model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


# ----- the training loop --------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=384, help="training images")
    parser.add_argument("--val-samples", type=int, default=128, help="validation images")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--width", type=int, default=16, help="channels of the first ResNet stage")
    parser.add_argument("--batch-size", type=int, default=16, help="images per rank per step")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--ra-reps", type=int, default=3, help="repeated augmentations per image")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--mixup-alpha", type=float, default=0.2)
    parser.add_argument("--cutmix-alpha", type=float, default=1.0)
    parser.add_argument("--lr-warmup-epochs", type=int, default=1)
    parser.add_argument("--lr-warmup-decay", type=float, default=0.1)
    parser.add_argument("--clip-grad-norm", type=float, default=1.0)
    parser.add_argument("--model-ema-decay", type=float, default=0.9)
    parser.add_argument("--unseeded-collate", action="store_true",
                        help="a control for the tests: the harness does not seed the collate_fn's draws")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = harness.load_config()  # the launcher's config: trainer.max_steps, trainer.seed, checkpoint.*
    train_set = SyntheticImages(args.num_samples, args.image_size, args.num_classes, seed=cfg.trainer.seed,
                                transform=TrainPreset())
    val_set = SyntheticImages(args.val_samples, args.image_size, args.num_classes, seed=cfg.trainer.seed + 1,
                              transform=normalize)

    with harness.Session(cfg) as session:
        rank, world = session.env.rank, session.env.world_size
        model = session.prepare(SmallResNet(args.num_classes, args.width))
        model_without_ddp = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        optimizer = torch.optim.SGD(parameter_groups(model_without_ddp, args.weight_decay), lr=args.lr,
                                    momentum=args.momentum)

        sampler = RASampler(train_set, num_replicas=world, rank=rank, seed=cfg.trainer.seed, repetitions=args.ra_reps)
        train_loader = session.loader(train_set, batch_size=args.batch_size, sampler=sampler,
                                      num_workers=args.workers, collate_fn=RandomMixupCutmix(
                                          args.num_classes, args.mixup_alpha, args.cutmix_alpha),
                                      seed_collate=not args.unseeded_collate)
        # Its own generator: iter() of a DataLoader without one draws its base seed from the global
        # RNG, so a stop agreed mid-evaluation (which skips the EMA's evaluation) would leave the
        # training RNG one draw short of an uninterrupted run's.
        val_loader = DataLoader(val_set, batch_size=32, sampler=DistributedSampler(
            val_set, num_replicas=world, rank=rank, shuffle=False), generator=torch.Generator())
        epochs = math.ceil(cfg.trainer.max_steps / session.steps_per_epoch)
        scheduler = make_scheduler(optimizer, args.lr_warmup_epochs, epochs, args.lr_warmup_decay)
        model_ema = ExponentialMovingAverage(model_without_ddp, decay=args.model_ema_decay)
        session.register(optimizer=optimizer, scheduler=scheduler)
        # Each rank's EMA averages its own BatchNorm statistics (use_buffers=True: every rank's model
        # updates them from its own batch after DDP's broadcast), so the EMAs differ per rank, and the
        # evaluation averages over them: each rank's is saved and restored.
        session.register_per_rank(model_ema=model_ema)

        for images, targets in session.batches(train_loader):
            with torch.autocast(session.device.type, dtype=torch.bfloat16):
                output = model(images.to(session.device))
            loss = criterion(output.float(), targets.to(session.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            optimizer.step()
            model_ema.update_parameters(model_without_ddp)
            if session.epoch < args.lr_warmup_epochs:
                model_ema.n_averaged.fill_(0)  # the EMA restarts from the weights until warm-up ends
            session.log(loss=loss.detach(), lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm)

            if session.batch_in_epoch + 1 == session.steps_per_epoch:  # the epoch's last step
                scheduler.step()
                for name, evaluated in (("acc1", model_without_ddp), ("ema_acc1", model_ema)):
                    accuracy = evaluate(session, evaluated, val_loader)
                    if accuracy is None:
                        break
                    session.log(**{name: accuracy})


if __name__ == "__main__":
    harness.entrypoint(main)
