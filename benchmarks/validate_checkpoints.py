"""Checkpoints side by side on one validation set: `elvis train`'s own round validation, on views
extracted once with one backbone setting, at each count of local descriptors.

Why: a checkpoint's stored validation figures come from views extracted with the features it
was trained on, so checkpoints trained on other features cannot be compared by them (issue
15: SIFT at 448 px against the default's 320 px).

    PYTHONPATH=$PWD python benchmarks/validate_checkpoints.py photos/train.txt photos/val.txt \
        efficientnet-lite0-rootsift other.pt --use-local 300 1000
"""

import argparse

from elvis_cli.backbones import backbone_options
from elvis_cli.model.checkpoints import load_checkpoint
from elvis_cli.training.config import VAL_VIEWS, TrainConfig
from elvis_cli.training.photos import training_photos
from elvis_cli.training.run import TrainingRun
from elvis_cli.training.validation import ValidationSet, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", help="the training photos' list (as given to elvis train)")
    parser.add_argument("val", help="the validation photos' list")
    parser.add_argument("checkpoints", nargs="+", help="names or paths")
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--use-local", type=int, nargs="+", default=[300])
    parser.add_argument("--views", type=int, default=8, help="views per photo, as trained")
    args = parser.parse_args()
    options = backbone_options(args.backbone_option)
    print("| descriptors | checkpoint | val accuracy | val mAP global | re-ranked (best fusion) "
          "| lam, temp |\n| ---: | --- | ---: | ---: | ---: | --- |")
    for count in args.use_local:
        config = TrainConfig(backbone_options=options, views_per_image=args.views,
                             num_local=count)
        _, val_photos = training_photos(args.train, args.val, None, config)
        run = TrainingRun(config, None)
        val = ValidationSet.build(run.pool(val_photos, VAL_VIEWS, 0, "validation views"),
                                  config)
        for name in args.checkpoints:
            metrics, _ = validate(load_checkpoint(name).model.eval(), val, run.device)
            print(f"| {count} | {name} | {metrics['val_accuracy']:.3f} | "
                  f"{metrics['val_map_global']:.2f} | {metrics['val_map']:.2f} | "
                  f"{metrics['lam']:g}, {metrics['temperature']:g} |", flush=True)


if __name__ == "__main__":
    main()
