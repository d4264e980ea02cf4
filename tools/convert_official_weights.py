#!/usr/bin/env python
"""Convert an officially released RedNet checkpoint for Detectron2 / d2_involution.

  python tools/convert_official_weights.py SRC DST [--target auto|model|backbone|classifier]
      [--depth D] [--stem-kernel K] [--config-file CFG [--opts KEY VALUE ...]]

SRC: an OpenMMLab ``.pth`` (mmcls classifier, mmdet Faster/Mask R-CNN or RetinaNet, mmseg semantic
FPN or UPerNet) or a PaddleClas ``.pdparams``. DST: a ``.pth`` for ``MODEL.WEIGHTS``. Prints what
was converted, what had no counterpart and any shape mismatch; nothing is written on error.
"""

import argparse
import sys
from typing import List, Optional

import d2_involution  # noqa: F401  (compat fixes and registrations before detectron2 use)
from d2_involution.checkpoint import TARGETS, convert_official_checkpoint


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("src", help="official checkpoint (.pth or .pdparams)")
    parser.add_argument("dst", help="output .pth for Detectron2's DetectionCheckpointer")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="auto",
        help="auto: detectors/segmenters -> their model, classifiers -> backbone weights; "
        "backbone: RedNet weights for any config; classifier: RedNetClassifier (backbone + fc)",
    )
    parser.add_argument("--depth", type=int, help="expected RedNet depth (error if different)")
    parser.add_argument(
        "--stem-kernel",
        type=int,
        help="stem involution kernel of the model you will load into (7: detectors, 3: classifier)",
    )
    parser.add_argument(
        "--retinanet-num-scales",
        type=int,
        default=3,
        help="anchor sizes per location of a RetinaNet (mmdet scales_per_octave, official: 3)",
    )
    parser.add_argument(
        "--config-file", help="check the result against this config (depth, names, shapes)"
    )
    parser.add_argument(
        "--opts", nargs="+", default=[], metavar="KEY VALUE", help="overrides for --config-file"
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = None
    if args.config_file:
        from detectron2.config import get_cfg

        cfg = get_cfg()
        d2_involution.add_involution_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    try:
        report = convert_official_checkpoint(
            args.src,
            args.dst,
            target=args.target,
            depth=args.depth,
            stem_kernel=args.stem_kernel,
            cfg=cfg,
            retinanet_num_scales=args.retinanet_num_scales,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"nothing written to {args.dst}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
