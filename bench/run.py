"""The benchmark suite: MDS side by side with in-process onnxruntime, the Python gRPC floor and the peers
(KServe, MLServer) on the same model files and the same load generator (ghz), in one run.
MDS runs with its production features on: access log, Prometheus metrics, API keys.

    python bench/run.py [--smoke] [--only a,b,...] [--no-peers] [--duration 5] [--out bench/results]

Workloads: (a) MLP unary, (b) bidi streams, (c) a compute-heavy real model, (d) a 1 GiB upload,
(e) a 1M-row bulk job, (f) cold start. Writes results.json, results.md (one table per workload, with
ratios to the floor, the peers and in-process onnxruntime) and results.png. `--smoke` is a short run of
the harness (about half a minute): 1 s per point, no peers, no heavy model, 16 MiB instead of 1 GiB.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import lifecycle  # noqa: E402
import peers  # noqa: E402
import serving  # noqa: E402
from harness import REPO, Target, upload  # noqa: E402
from local_machine import free_port  # noqa: E402
from models import mlp  # noqa: E402


class Bench:
    """One run's settings, and the servers its workloads share (started when first asked for, stopped at exit)."""

    def __init__(self, args, work: Path, stack: contextlib.ExitStack):
        self.work, self.stack, self.smoke = work, stack, args.smoke
        self.duration = 1.0 if args.smoke else args.duration
        self.concurrencies = [1] if args.smoke else [1, 8, 64]
        self.peer_names = () if args.smoke or args.no_peers else peers.NAMES
        self.mlp_path = work / "mlp.onnx"
        self.mlp_path.write_bytes(mlp())
        self.servers: dict[tuple, Target] = {}
        self.uploaded: set[tuple] = set()

    def server(self, key: tuple, start: Callable[[], Target]) -> Target:
        """The server KEY, started by START the first time it is asked for."""
        if key not in self.servers:
            self.servers[key] = start()
            self.stack.callback(self.servers[key].stop)
        return self.servers[key]

    def floor(self, load) -> Target:
        def start() -> Target:
            port = free_port()
            return Target(
                "floor", [sys.executable, str(REPO / "bench" / "floor_server.py"), str(port), str(load.path)], port
            )

        return self.server(("floor", load.path), start)

    def peer(self, name: str, load) -> Target:
        return self.server((name, load.path), lambda: peers.start(name, load.model, load.path, self.work))

    def mds_server(self, name: str, env: dict[str, str], label: str = "MDS") -> Target:
        """An MDS server with API keys on, its own data folder and the settings in ENV."""
        folder = self.work / name
        folder.mkdir()
        env = {
            **env,
            "MDS_DATA_DIR": str(folder / "data"),
            "MDS_LOG_DIR": str(folder / "logs"),
            "MDS_AUTH": "on",
            "MDS_ORT_INTRA_OP_THREADS": "1",
            "MDS_METRICS_PORT": str(free_port()),
            "MDS_DRAIN_SECONDS": "0",  # nothing balances across the targets
        }
        created = subprocess.run(
            [sys.executable, "-m", "mds_grpc", "keys", "create", "--scope", "admin"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        port = free_port()
        return Target(
            label,
            [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(port)],
            port,
            env=env,
            api_key=json.loads(created)["key"],
            log=folder / "server.log",
        )

    def mds(self, load, processes: int = 1) -> Target:
        """MDS on its embedded storage (with `processes` serving processes), serving LOAD's model."""
        target = self.server(
            ("MDS", processes),
            lambda: self.mds_server(
                f"mds-{processes}",
                {"MDS_PROCESSES": str(processes)},
                "MDS" if processes == 1 else f"MDS ×{processes} processes",
            ),
        )
        if (processes, load.model, load.path) not in self.uploaded:
            upload(target, load.model, load.path, batching=load.batching)
            self.uploaded.add((processes, load.model, load.path))
        return target


@dataclass(frozen=True)
class Workload:
    title: str
    run: Callable[[Bench], list[dict]]
    columns: list[tuple[str, str, str]]  # header, row key, format
    value: str  # the figure that ratios compare and the chart shows
    ratios: list[tuple[str, str]]  # column, baseline target


REQUESTS = [
    ("target", "target", ""),
    ("call", "call", ""),
    ("concurrency", "concurrency", "d"),
    ("req/s", "requests_per_s", ",.0f"),
    ("p50 ms", "p50_ms", ".3f"),
    ("p99 ms", "p99_ms", ".3f"),
    ("server CPU µs/req", "cpu_us_per_request", ",.0f"),
]
FLOOR = ("× floor req/s", "floor")
WORKLOADS = {
    "a": Workload(
        "(a) MLP 784-256-10, batch 1, unary",
        serving.unary,
        REQUESTS,
        "requests_per_s",
        [FLOOR, ("× KServe", "KServe"), ("× MLServer", "MLServer")],
    ),
    "b": Workload(
        f"(b) MLP batch 1 over bidi streams of {serving.STREAM_MESSAGES} requests (concurrency: streams)",
        serving.streams,
        REQUESTS,
        "requests_per_s",
        [FLOOR, ("× MLServer", "MLServer")],
    ),
    "c": Workload(
        "(c) PP-OCRv4 text detector, one 3x160x160 image per request (req/s: images/s; in-process and "
        "the floor run one image at a time, MDS one per core)",
        serving.heavy,
        REQUESTS,
        "requests_per_s",
        [FLOOR, ("× in-process batched", f"onnxruntime in-process (batch {serving.HEAVY_BATCH})")],
    ),
    "d": Workload(
        "(d) model upload to MDS on MinIO + FerretDB",
        lifecycle.upload_rate,
        [
            ("target", "target", ""),
            ("MiB", "mib", ",.0f"),
            ("seconds", "seconds", ".2f"),
            ("MB/s", "mb_per_s", ",.0f"),
            ("server peak RSS growth MiB", "rss_growth_mib", ",.0f"),
        ],
        "mb_per_s",
        [("× minio client", lifecycle.RAW_PUT)],
    ),
    "e": Workload(
        "(e) bulk job on MDS (MinIO + FerretDB)",
        lifecycle.bulk_job,
        [
            ("target", "target", ""),
            ("rows", "rows", ",d"),
            ("batch rows", "batch_rows", ",d"),
            ("seconds", "seconds", ".2f"),
            ("rows/s", "rows_per_s", ",.0f"),
        ],
        "rows_per_s",
        [("× in-process", lifecycle.IN_PROCESS_JOB)],
    ),
    "f": Workload(
        "(f) cold start to the first prediction (lower is better)",
        lifecycle.cold_start,
        [("target", "target", ""), ("model", "model", ""), ("seconds", "seconds", ".3f")],
        "seconds",
        [("× onnxruntime read + load", lifecycle.ORT_LOAD)],
    ),
}


def add_ratios(rows: list[dict], workload: Workload) -> None:
    """Each MDS row's figure over its baseline's, at the same concurrency and model (peers get × floor too)."""
    for row in rows:
        row["ratios"] = {}
        for column, baseline in workload.ratios:
            if row["target"] == baseline or not (
                row["target"].startswith("MDS") or (baseline == "floor" and row["target"] in peers.NAMES)
            ):
                continue
            candidates = [r for r in rows if r["target"] == baseline]
            same = [
                r
                for r in candidates
                if (r.get("concurrency"), r.get("model")) == (row.get("concurrency"), row.get("model"))
            ]
            base = same[0] if same else candidates[0] if len(candidates) == 1 else None
            if base and base[workload.value]:
                row["ratios"][column] = row[workload.value] / base[workload.value]


def markdown(rows: list[dict], workload: Workload) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    headers = [h for h, _, _ in workload.columns] + [c for c, _ in workload.ratios]
    lines = [
        f"### {workload.title}",
        "",
        "| " + " | ".join(headers) + " |",
        "|"
        + "|".join(["---:" if spec else "---" for _, _, spec in workload.columns] + ["---:"] * len(workload.ratios))
        + "|",
    ]
    for r in rows:
        cells = [fmt(r.get(key), spec) for _, key, spec in workload.columns]
        cells += [fmt(r["ratios"].get(column), ".2f") for column, _ in workload.ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(12, 5 * len(results)), squeeze=False)
    for ax, (key, rows) in zip(axes[:, 0], results.items(), strict=True):
        workload = WORKLOADS[key]
        labels = [
            " ".join(str(r[k]) for k in ("target", "call", "model") if r.get(k))
            + (f" c={r['concurrency']}" if "concurrency" in r else "")
            for r in rows
        ]
        values = [r[workload.value] for r in rows]
        bars = ax.bar(
            range(len(rows)), values, color=["#e8772e" if r["target"].startswith("MDS") else "#3b7dd8" for r in rows]
        )
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(dict((k, h) for h, k, _ in workload.columns)[workload.value])
        ax.set_yscale("log" if max(values) > 20 * min(values) else "linear")
        ax.set_title(workload.title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a short run proving the harness: one 1 s point "
        "per target, small sizes, no peers, no heavy model (workloads a, b, d, e, f)",
    )
    parser.add_argument("--only", help="comma-separated workloads to run, e.g. a,b (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="leave KServe and MLServer out")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else [k for k in WORKLOADS if not (args.smoke and k == "c")]
    if unknown := set(chosen) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.smoke or args.no_peers) and {"a", "b"} & set(chosen):
        peers.install()

    results = {}
    with contextlib.ExitStack() as stack:
        bench = Bench(args, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mds-bench-"))), stack)
        for key in chosen:
            start = time.monotonic()
            results[key] = WORKLOADS[key].run(bench)
            print(f"{WORKLOADS[key].title}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
            add_ratios(results[key], WORKLOADS[key])
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}"
    )
    rows = [{"workload": key, **row} for key, rows in results.items() for row in rows]
    (args.out / "results.json").write_text(
        json.dumps({"machine": machine, "duration_s": bench.duration, "smoke": args.smoke, "rows": rows}, indent=2)
    )
    (args.out / "results.md").write_text(
        f"Machine: {machine}; {bench.duration:g} s per point.\n\n"
        + "\n".join(markdown(rows, WORKLOADS[key]) for key, rows in results.items())
    )
    chart(results, args.out / "results.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
