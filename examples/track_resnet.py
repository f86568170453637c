"""Your own model and loop, measured by spherelab: a small CNN with BatchNorm trained with a learning
rate and weight decay on synthetic CIFAR-shaped data (3x32x32, 10 classes), which shows the periodic
behaviour of BN + weight decay on a CPU within minutes: the loss falls, weight decay shrinks the SI
norm so the effective learning rate lr / rho^2 grows, until a step is too large — a loss spike, the
norm jumps, the ELR drops — and the cycle starts again.

    python examples/track_resnet.py                 # into the default store (SPHERELAB_DB, else ~/.spherelab)
    python examples/track_resnet.py --db /tmp/mine.db --epochs 60
    spherelab app                                   # then open the run: Run, Periodic, Live pages

With the defaults (1,024 images, batch 128, lr 0.5, weight decay 0.05, 40 epochs = 320 steps) the run
read `periodic`: 5 loss spikes, each with a jump of the SI norm and a drop of the ELR, about every 60
steps; 132 s of training on a 2-core CPU shared with other work.

Nothing here is spherelab but the lines marked "spherelab".
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import spherelab                                                   # spherelab


def block(cin, cout):
    # bias-free conv into an affine-free BatchNorm: the conv's weight is scale-invariant
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, affine=False), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.features = nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, classes)
        with torch.no_grad():                # a fixed random classifier, as the lab's models have
            self.head.weight.mul_(10 / self.head.weight.norm())
        self.head.requires_grad_(False)

    def forward(self, x):
        return self.head(self.features(x))


def synthetic(n, classes=10, seed=0, noise=0.5):
    """Gaussian classes around fixed random 3x32x32 means: learnable, no download."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + noise * torch.randn(n, 3, 32, 32, generator=g), y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None,
                        help="store URL or SQLite path (default: SPHERELAB_DB, else ~/.spherelab)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--wd", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--sweep", default=None, help="group runs into a sweep (the Regime map draws it)")
    parser.add_argument("--sharpness-every", type=int, default=0, help="steps between sharpness measurements")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = synthetic(args.samples)
    x_test, y_test = synthetic(args.samples // 4, seed=1)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.wd)
    steps = args.samples // args.batch_size
    probe = (x[:256], y[:256])
    with spherelab.track(model, optimizer, db=args.db, name=f"SmallCNN lr={args.lr} wd={args.wd}",  # spherelab
                         sweep=args.sweep, config={"dataset": "synthetic", "synthetic_classes": 10,
                                                   "batch_size": args.batch_size, "epochs": args.epochs},
                         probe=probe, sharpness_every=args.sharpness_every, log_every=2,
                         steps_per_epoch=steps) as run:
        for epoch in range(args.epochs):
            order = torch.randperm(args.samples)
            for i in range(steps):
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad()
                loss.backward()
                run.before_step()                                  # spherelab
                optimizer.step()
                run.after_step(train_loss=loss, train_acc=(logits.argmax(1) == y[idx]).float().mean())  # spherelab
            model.eval()
            with torch.no_grad():
                logits = model(x_test)
            model.train()
            test_acc = (logits.argmax(1) == y_test).float().mean()
            run.log(test_loss=F.cross_entropy(logits, y_test), test_acc=test_acc)      # spherelab
    print(f"run {run.run_id}: {run.store.get_run(run.run_id).status}, regime {run.store.get_run(run.run_id).regime}")


if __name__ == "__main__":
    main()
