"""Fine-tune with MultiWorkerMirroredStrategy: two worker processes on this machine.

    python examples/multiworker_two_process.py [--out DIR] [--timeout 300] [--stream] [--epochs 4]

What happens:

1. This (launcher) process trains a tiny base classifier on two classes of the built-in
   synthetic shapes and saves it as ``DIR/base.keras`` — the "pretrained model" every
   worker starts from (workers must start from identical weights).
2. It starts two worker processes of this same script, each with its own ``TF_CONFIG``:
   a cluster of two workers on 127.0.0.1 (two free ports), task index 0 and 1. Nothing
   listens on other interfaces.
3. Each worker creates ``tf.distribute.MultiWorkerMirroredStrategy()`` first (before any
   other TensorFlow work), builds the same synthetic dataset (4 classes), and calls
   exactly the code a single-machine user calls::

       fine_tune(base, dataset, FineTuneOptions.top_layers(2, ...), distribution_strategy=strategy)

   tf.data shards the batches between the workers and gradients are all-reduced, so both
   workers end with the same weights. Worker 0 (the chief) writes ``DIR/result.json``
   and ``DIR/finetuned.keras``; worker 1 writes nothing.
4. The launcher waits for both, checks that their backbone fingerprints agree, and
   prints the result.

With ``--stream`` the launcher also writes the synthetic images to ``DIR/data`` (one PNG
per image, one sub-folder per class) and the workers read that folder by streaming::

       stream = stream_image_folder(DIR / "data", spec)
       fine_tune(base, stream, FineTuneOptions.top_layers(2, ...), distribution_strategy=strategy)

Each worker then reads only its own shard of the training files (every second file,
``FileSet.shard``) — for the embeddings, the backbone stage and the class statistics,
which are summed over the workers. The launcher checks that the two shards are disjoint
and together are the whole training split; the chief evaluates the test split, streamed.

On a real cluster, run the worker part on each machine with a TF_CONFIG that lists every
machine's host:port (``edgeadapt train --distribute multi-worker`` does the same from
the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_WORKERS = 2
IMAGE_SIZE = 32
SEED = 7


def _backbone_options():
    from edgeadapt.training.backbones import BackboneOptions

    return BackboneOptions(stem_filters=16, blocks=(("conv", 16, 1), ("conv", 16, 2), ("conv", 32, 1), ("conv", 32, 2),
                                                    ("separable", 64, 1)))


def _dataset():
    from edgeadapt.data.image_folders import SplitOptions
    from edgeadapt.data.synthetic import SyntheticOptions, synthetic_dataset

    return synthetic_dataset(SyntheticOptions(num_classes=4, images_per_class=100, image_size=IMAGE_SIZE, seed=SEED),
                             SplitOptions(seed=SEED))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def train_base(output: Path) -> Path:
    """The launcher's job: a small 'pretrained' model on two classes."""
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    dataset = _dataset()
    model = train_classifier(dataset.select_classes(dataset.class_names[:2]),
                             ClassifierTrainingOptions(epochs=12, seed=SEED, verbose=0, backbone=_backbone_options()))
    path = output / "base.keras"
    model.save(path)
    return path


def write_folder(output: Path) -> Path:
    """The launcher's job with --stream: the synthetic images as files, ``DIR/data/<class>/NNNN.png``."""
    from edgeadapt.data.image_folders import write_image_folder
    from edgeadapt.data.synthetic import SyntheticOptions, generate_images

    class_names, images, labels = generate_images(SyntheticOptions(num_classes=4, images_per_class=100,
                                                                   image_size=IMAGE_SIZE, seed=SEED))
    return write_image_folder(output / "data", class_names, images, labels)


def _stream(output: Path):
    from edgeadapt.data.image_folders import SplitOptions
    from edgeadapt.device.manifest import InputSpec
    from edgeadapt.data.streaming import stream_image_folder

    return stream_image_folder(output / "data", InputSpec(height=IMAGE_SIZE, width=IMAGE_SIZE), SplitOptions(seed=SEED))


def run_worker(output: Path, stream: bool = False, epochs: int = 4, head_epochs: int = 15) -> int:
    """One worker: TF_CONFIG is already set by the launcher."""
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first: collectives are configured at start-up
    from edgeadapt.training.finetune import FineTuneOptions, fine_tune

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    options = FineTuneOptions.top_layers(2, head_learning_rate=5e-3, head_epochs=head_epochs, epochs=epochs,
                                         batch_size=32, seed=SEED, verbose=0)
    dataset = _stream(output) if stream else _dataset()
    start = time.perf_counter()
    result = fine_tune(output / "base.keras", dataset, options, distribution_strategy=strategy)
    report = {
        "worker": task["index"],
        "replicas": strategy.num_replicas_in_sync,
        "backbone_fingerprint": result.backbone_fingerprint,
        "backbone_changed": result.backbone_changed,
        "class_stats_count": int(result.class_stats.counts.sum()),
        "seconds": time.perf_counter() - start,
    }
    if stream:  # each worker read only its shard of the training files; the chief evaluates the test split
        num_workers, index = result.worker_shard
        report["shard"] = [num_workers, index]
        report["train_files"] = list(dataset.train.shard(num_workers, index).paths)
        report["test_accuracy"] = result.evaluate_stream(dataset, "test") if task["index"] == 0 else None
    else:
        report["test_accuracy"] = result.evaluate(dataset.test.images, dataset.test.labels)
    (output / f"worker{task['index']}.json").write_text(json.dumps(report, indent=2))
    if task["index"] == 0:  # the chief writes the outputs
        result.save_model(output / "finetuned.keras")
        (output / "result.json").write_text(json.dumps(report, indent=2))
    return 0


def launch(output: Path, timeout: float, stream: bool = False, epochs: int = 4, head_epochs: int = 15) -> dict:
    """Train the base model, run two workers on 127.0.0.1, return the chief's report."""
    output.mkdir(parents=True, exist_ok=True)
    train_base(output)
    if stream:
        write_folder(output)
    ports = _free_ports(NUM_WORKERS)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index in range(NUM_WORKERS):
        environment = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                           TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        log = open(output / f"worker{index}.log", "w")
        command = [sys.executable, __file__, "--worker", "--out", str(output), "--epochs", str(epochs),
                   "--head-epochs", str(head_epochs)] + (["--stream"] if stream else [])
        processes.append((subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    failures = []
    try:
        for index, (process, _log) in enumerate(processes):
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failures.append(f"worker {index} did not finish within {timeout:.0f} s")
                continue
            if code != 0:
                failures.append(f"worker {index} exited with status {code} (see {output / f'worker{index}.log'})")
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    if failures:
        raise RuntimeError("; ".join(failures))
    reports = [json.loads((output / f"worker{index}.json").read_text()) for index in range(NUM_WORKERS)]
    fingerprints = {report["backbone_fingerprint"] for report in reports}
    if len(fingerprints) != 1:
        raise RuntimeError(f"the workers ended with different backbones: {sorted(fingerprints)}")
    if stream:
        _check_shards(output, reports)
    return json.loads((output / "result.json").read_text())


def _check_shards(output: Path, reports: list[dict]) -> None:
    """The workers' training files are disjoint and together are the whole training split."""
    shards = [set(report["train_files"]) for report in reports]
    expected = set(_stream(output).train.paths)
    if any(shards[i] & shards[j] for i in range(len(shards)) for j in range(i + 1, len(shards))):
        raise RuntimeError("two workers read the same training file")
    if set().union(*shards) != expected:
        raise RuntimeError(f"the workers read {sum(map(len, shards))} training files, the split has {len(expected)}")
    if any(report["class_stats_count"] != len(expected) for report in reports):
        raise RuntimeError("the summed class statistics do not count every training file once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers")
    parser.add_argument("--stream", action="store_true",
                        help="write the images to DIR/data and let each worker stream only its shard of the files")
    parser.add_argument("--epochs", type=int, default=4, help="backbone-stage epochs (default 4)")
    parser.add_argument("--head-epochs", type=int, default=15, help="head-stage epochs (default 15)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if arguments.worker:
        return run_worker(arguments.out, arguments.stream, arguments.epochs, arguments.head_epochs)
    output = arguments.out or Path(tempfile.mkdtemp(prefix="edgeadapt-multiworker-"))
    start = time.perf_counter()
    report = launch(output, arguments.timeout, arguments.stream, arguments.epochs, arguments.head_epochs)
    report.pop("train_files", None)
    print(json.dumps(report, indent=2))
    print(f"two workers agreed on the fine-tuned backbone; outputs in {output} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
