"""``python -m skin.kindsim``: run a rendered overlay's pods with podman (``make kind-sim``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from skin.errors import ConfigError
from skin.kindsim.pods import render
from skin.kindsim.simulator import SimOptions, Simulator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m skin.kindsim",
        description="Run the experiment of a kustomize overlay (default k8s/kind) from its "
                    "rendered YAML alone: its Deployments and Jobs as podman pods, with the "
                    "Job controller's restarts and a minimal Kubernetes API for the chief.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--overlay", default="k8s/kind", help="kustomize folder (default k8s/kind)")
    where.add_argument("--manifests", type=Path, help="already rendered YAML instead")
    p.add_argument("--image", action="append", default=[], metavar="FROM=TO",
                   help="run image TO where the YAML names FROM (repeatable; FROM without a "
                        "tag matches every tag)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME/KEY",
                   help="a Secret users create by hand before kubectl apply: made here with a "
                        "random value under KEY (repeatable)")
    p.add_argument("--out", type=Path, default=Path("build/kind-sim"),
                   help="rendered YAML, played pods, logs, model (default build/kind-sim)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds (default 3600)")
    p.add_argument("--backoff-scale", type=float, default=0.1,
                   help="times the Job controller's 10 s, 20 s, ... back-off (default 0.1)")
    p.add_argument("--keep", action="store_true", help="leave the pods and the network")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    images = {}
    for pair in args.image:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            p.error(f"--image {pair!r}: expected FROM=TO")
        images[src] = dst
    try:
        text = args.manifests.read_text() if args.manifests else render(args.overlay)
        sim = Simulator(text, SimOptions(out=args.out, images=images, timeout_s=args.timeout,
                                         backoff_scale=args.backoff_scale, keep=args.keep,
                                         secrets=args.secret))
        return sim.run()
    except (ConfigError, RuntimeError, OSError) as e:
        print(f"kind-sim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
