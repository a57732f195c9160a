"""Signing figures: verify time on open, sign time, install size of the ``signing`` extra.

    python benchmarks/bench_signing.py [--bundle OUT/model.eab ...] [--repeats 15] [--pip-target]

It measures the ImageNet MobileNet v1 0.75/192 bundle (imported with ``edgeadapt import`` from
$EDGEADAPT_DATA or ../shared/data/imagenet_mobilenet into a temporary folder; --no-mobilenet
skips it) and each --bundle (e.g. the demo bundle, `edgeadapt demo --out OUT`); without
--bundle, the tiny test bundle ($EDGEADAPT_TEST_FIXTURES/tiny.eab, else built by
tests/build_fixtures.py, which needs TensorFlow). Each bundle is copied, a fresh key signs it,
then:

- sign: ``edgeadapt.device.signing.sign_bundle`` (hashes every file, signs), median;
- warm open: ``Runtime.open`` without keys vs with the trusted key, in this process, alternating,
  median of --repeats each; the difference is what verification adds; "check" is the signature
  check alone on an opened bundle (``check_bundle_signature``: manifest hash, Ed25519, tables);
- cold open: the same in a fresh Python process each time (includes importing ``cryptography``).

Install size: files of the installed ``cryptography``, ``cffi`` and ``pycparser`` distributions
(what the extra adds to a device environment); with --pip-target also a real
``pip install --target`` of ``cryptography`` into a temporary folder, measured with ``du``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLD_CHILD = """
import sys, time, json
start = time.perf_counter()
from edgeadapt.device import Runtime
keys = sys.argv[2:] or None
runtime = Runtime.open(sys.argv[1], trusted_keys=keys)
print(json.dumps({"open_s": time.perf_counter() - start, "state": getattr(runtime.bundle.signature, "state", None)}))
"""


def mobilenet_bundle(folder: Path) -> Path | None:
    data = Path(os.environ.get("EDGEADAPT_DATA", ROOT.parent / "shared" / "data")) / "imagenet_mobilenet"
    model = data / "mobilenet_v1_0.75_192_quant.tflite"
    if not model.is_file():
        print(f"no {model}: skipping the MobileNet bundle")
        return None
    output = folder / "mobilenet.eab"
    command = [str(Path(sys.executable).with_name("edgeadapt")), "import", str(model), "--labels",
               str(data / "imagenet_labels.txt"), "--out", str(output)]
    subprocess.run(command, check=True, capture_output=True)
    return output


def tiny_bundle(folder: Path) -> Path | None:
    given = os.environ.get("EDGEADAPT_TEST_FIXTURES")
    if given and (Path(given) / "tiny.eab").is_dir():
        return Path(given) / "tiny.eab"
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from build_fixtures import build_fixtures
    except ImportError:
        print("no EDGEADAPT_TEST_FIXTURES and no TensorFlow: skipping the tiny bundle")
        return None
    return build_fixtures(folder / "fixtures") / "tiny.eab"


def bundle_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def measure(bundle: Path, folder: Path, repeats: int) -> dict:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.keys import generate_keypair
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.signing import check_bundle_signature, sign_bundle
    from edgeadapt.device.trust import TrustedKeys

    copy = folder / f"signed-{bundle.name}"
    shutil.copytree(bundle, copy)
    private, public = generate_keypair(folder / f"keys-{bundle.stem}", "publisher")
    sign_times = []
    for _ in range(max(3, repeats // 3)):
        start = time.perf_counter()
        sign_bundle(copy, private)
        sign_times.append(time.perf_counter() - start)
    Runtime.open(copy, trusted_keys=[public])  # warm caches and imports once
    plain, verified = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        Runtime.open(copy).close()
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        runtime = Runtime.open(copy, trusted_keys=[public])
        verified.append(time.perf_counter() - start)
        assert runtime.bundle.signature.state == "signed"
        runtime.close()
    opened, trusted = Bundle.open(copy), TrustedKeys.from_files([public])
    checks = []
    for _ in range(repeats):
        start = time.perf_counter()
        check_bundle_signature(opened, trusted)
        checks.append(time.perf_counter() - start)
    cold_plain, cold_verified = [], []
    for _ in range(max(3, repeats // 3)):
        for keys, sink in (([], cold_plain), ([str(public)], cold_verified)):
            result = subprocess.run([sys.executable, "-c", COLD_CHILD, str(copy), *keys], check=True,
                                    capture_output=True, text=True)
            sink.append(json.loads(result.stdout.strip().splitlines()[-1])["open_s"])
    median = statistics.median
    return {
        "bundle": bundle.name, "bytes": bundle_bytes(copy), "sign_ms": 1000 * median(sign_times),
        "signature_check_ms": 1000 * median(checks),
        "open_unsigned_ms": 1000 * median(plain), "open_verified_ms": 1000 * median(verified),
        "verify_overhead_ms": 1000 * (median(verified) - median(plain)),
        "cold_open_unsigned_ms": 1000 * median(cold_plain), "cold_open_verified_ms": 1000 * median(cold_verified),
        "cold_verify_overhead_ms": 1000 * (median(cold_verified) - median(cold_plain)),
    }


def installed_size() -> dict:
    sizes = {}
    for name in ("cryptography", "cffi", "pycparser"):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        total = 0
        for entry in files:
            path = Path(entry.locate())
            if path.is_file():
                total += path.stat().st_size
        sizes[f"{name} {metadata.version(name)}"] = total
    return sizes


def pip_target_size(folder: Path) -> str:
    target = folder / "pip-target"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                             "cryptography>=42"], capture_output=True, text=True)
    if result.returncode != 0:
        return f"pip install failed: {result.stderr.strip()[-200:]}"
    du = subprocess.run(["du", "-sh", str(target)], capture_output=True, text=True).stdout.split()[0]
    packages = sorted(entry.name for entry in target.glob("*.dist-info"))
    return f"{du} ({', '.join(packages)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bundle", action="append", type=Path, help="bundle to measure (repeatable)")
    parser.add_argument("--repeats", type=int, default=15, help="timed opens per variant")
    parser.add_argument("--pip-target", action="store_true", help="also pip install --target the extra and du it")
    parser.add_argument("--no-mobilenet", action="store_true", help="do not import and measure the MobileNet bundle")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as name:
        folder = Path(name)
        candidates = [None if arguments.no_mobilenet else mobilenet_bundle(folder)]
        candidates += list(arguments.bundle) if arguments.bundle else [tiny_bundle(folder)]
        bundles = [path for path in candidates if path is not None]
        rows = [measure(bundle, folder, arguments.repeats) for bundle in bundles]
        print(f"{'bundle':<16} {'MB':>6} {'sign ms':>8} {'check ms':>9} {'open ms':>8} {'+verify':>8} {'overhead':>9} "
              f"{'cold open':>10} {'+verify':>8} {'overhead':>9}")
        for row in rows:
            print(f"{row['bundle']:<16} {row['bytes'] / 1e6:>6.2f} {row['sign_ms']:>8.1f} "
                  f"{row['signature_check_ms']:>9.2f} {row['open_unsigned_ms']:>8.1f} "
                  f"{row['open_verified_ms']:>8.1f} {row['verify_overhead_ms']:>8.1f}  "
                  f"{row['cold_open_unsigned_ms']:>10.1f} {row['cold_open_verified_ms']:>8.1f} "
                  f"{row['cold_verify_overhead_ms']:>8.1f}")
        sizes = installed_size()
        print("signing extra, installed files: " + ", ".join(f"{key} {value / 1e6:.1f} MB" for key, value in sizes.items())
              + f"; total {sum(sizes.values()) / 1e6:.1f} MB")
        if arguments.pip_target:
            print(f"pip install --target cryptography>=42: {pip_target_size(folder)}")
        print(json.dumps({"bundles": rows, "installed_bytes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
