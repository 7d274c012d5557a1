"""The benchmark suite: MDS side by side with in-process onnxruntime, the Python gRPC floor and the peers
(KServe, MLServer) on the same model files and the same load generator (ghz), in one run.
MDS runs with its production features on: access log, Prometheus metrics, API keys.

    python bench/run.py [--smoke] [--only a,b,...] [--no-peers] [--duration 5] [--out bench/results] [--publish]

Workloads: (a) MLP unary, (b) bidi streams, (c) a compute-heavy real model, (d) a 1 GiB external-data upload
and a 512 MiB single-file one, (e) a 1M-row bulk job, (f) cold start, against the floor's too, (g) replicas:
the 1 GiB model's memory and speed in two serving processes, weights shared or prepacked. Writes results.json,
results.md (one table per workload, with ratios to the floor, the peers and in-process onnxruntime, then each
target of GOALS met or missed) and results.png into --out (bench/results/, ignored by git). `--publish` also merges
the run into the committed snapshot, bench/published/: the workloads run replace their earlier rows there.
`--smoke` is a short run of the harness (about a minute): 1 s per point, no peers, no heavy model,
16 MiB instead of 1 GiB.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
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

PUBLISHED = REPO / "bench" / "published"


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
            "MDS_WEBSOCKET_PORT": str(free_port()),  # not the default 50052: runs may share the machine
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
            ("model", "model", ""),
            ("MiB", "mib", ",.0f"),
            ("seconds", "seconds", ".2f"),
            ("MB/s", "mb_per_s", ",.0f"),
            ("server peak RSS growth MiB", "rss_growth_mib", ",.0f"),
            ("helper process peak RSS MiB", "helper_peak_mib", ",.0f"),
            ("helper process seconds", "helper_seconds", ".2f"),
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
    "g": Workload(
        f"(g) replicas: `mds serve --processes {lifecycle.REPLICA_PROCESSES}` with the big model, weights prepacked "
        "in each process or shared (PSS of the serving processes; predictions/s in turns, 2 connections a process)",
        lifecycle.replicas,
        [
            ("target", "target", ""),
            ("weights", "way", ""),
            ("processes", "processes", "d"),
            ("PSS MiB", "pss_mib", ",.0f"),
            ("× one process", "times_one_process", ".2f"),
            ("supervisor PSS MiB", "supervisor_pss_mib", ",.0f"),
            ("batch", "batch", "d"),
            ("predictions/s", "predictions_per_s", ",.1f"),
            ("shared ÷ prepacked", "shared_over_prepacked", ".2f"),
        ],
        "pss_mib",
        [],
    ),
}


@dataclass(frozen=True)
class Goal:
    """A target (issue 15), checked on figures taken from a run's rows; none: not measured in that run."""

    workload: str
    text: str
    figures: Callable[[list[dict]], list[float]]
    limit: float
    at_most: bool = False  # figures must be ≤ limit; otherwise ≥
    unit: str = "×"
    elsewhere: str = ""  # what measures it when this suite does not
    also: str = ""  # the other workloads whose rows it reads: it counts only when they ran in the same run


def pick(rows: list[dict], workload: str, target: str, key: str, **match) -> list[float]:
    """KEY (a row's field or one of its ratio columns) of WORKLOAD's rows for TARGET whose fields match MATCH."""
    return [
        value
        for r in rows
        if r["workload"] == workload and r["target"] == target and all(r.get(k) == v for k, v in match.items())
        for value in [r.get(key, r.get("ratios", {}).get(key))]
        if value is not None
    ]


def upload_then_predict(rows: list[dict]) -> list[float]:
    """(f) upload → first prediction of the big model over (d)'s minio client put of its files plus
    onnxruntime's read + load."""
    put = pick(rows, "d", lifecycle.RAW_PUT, "seconds", model=lifecycle.EXTERNAL_DATA)
    load = pick(rows, "f", lifecycle.ORT_LOAD, "seconds", model="big")
    mds = pick(rows, "f", "MDS upload → first prediction", "seconds", model="big")
    return [mds[0] / (put[0] + load[0])] if put and load and mds else []


def restart_over_floor(rows: list[dict]) -> list[float]:
    """(f) MDS restart → first prediction over the floor's, per model."""
    seconds = {
        (r["target"], r["model"]): r["seconds"]
        for r in rows
        if r["workload"] == "f" and r["target"] in (lifecycle.MDS_RESTART, lifecycle.FLOOR_RESTART)
    }
    return [
        mds / seconds[lifecycle.FLOOR_RESTART, model]
        for (target, model), mds in seconds.items()
        if target == lifecycle.MDS_RESTART and (lifecycle.FLOOR_RESTART, model) in seconds
    ]


def of(workload: str, target: str, key: str, **match) -> Callable[[list[dict]], list[float]]:
    return lambda rows: pick(rows, workload, target, key, **match)


MINIO, UPLOAD = WORKLOADS["d"].ratios[0][0], "MDS UploadModel"
GOALS = [
    Goal("a", "Predict ≥ 0.95× the floor at concurrency 1 / 8 / 64", of("a", "MDS", FLOOR[0], call="Predict"), 0.95),
    Goal("a", "ModelInfer ≥ 0.95× the floor", of("a", "MDS", FLOOR[0], call="ModelInfer"), 0.95),
    Goal("b", "streams ≥ 1.0× the floor at 1 / 8 streams", of("b", "MDS", FLOOR[0]), 1.0),
    *[
        goal
        for model, size in ((lifecycle.EXTERNAL_DATA, "1 GiB"), (lifecycle.SINGLE_FILE, "512 MiB"))
        for goal in (
            Goal("d", f"{size} {model} upload ≥ 0.8× the minio client", of("d", UPLOAD, MINIO, model=model), 0.8),
            Goal(
                "d",
                f"{size} {model}: server RSS growth ≤ 64 MiB",
                of("d", UPLOAD, "rss_growth_mib", model=model),
                64,
                at_most=True,
                unit=" MiB",
            ),
        )
    ],
    Goal(
        "e",
        "1M rows, CreateJob → SUCCEEDED ≥ 0.7× in-process",
        of("e", "MDS job: CreateJob → SUCCEEDED", "× in-process"),
        0.7,
    ),
    Goal(
        "e",
        "1M rows, input upload → results read ≥ 0.4× in-process",
        of("e", "MDS job: input upload → results read", "× in-process"),
        0.4,
    ),
    Goal("f", "restart → first prediction ≤ 1.3× the floor's, both models", restart_over_floor, 1.3, at_most=True),
    Goal(
        "f",
        "upload → first prediction (1 GiB) ≤ 1.5× minio client put + onnxruntime read + load",
        upload_then_predict,
        1.5,
        at_most=True,
        also="d",
    ),
    Goal(
        "g",
        "two serving processes with the big model ≤ 1.3× the PSS of one (weights shared)",
        of("g", lifecycle.MEMORY, "times_one_process", way="shared", processes=lifecycle.REPLICA_PROCESSES),
        1.3,
        at_most=True,
    ),
    Goal(
        "g",
        "shared weights' predictions/s ≥ 0.9× prepacked at batch 1 / 8",
        of("g", lifecycle.THROUGHPUT, "shared_over_prepacked", way="shared"),
        0.9,
    ),
]


def check(runs: dict[str, dict], rows: list[dict]) -> list[dict]:
    """Each goal of the workloads in RUNS: its figures and whether all of them meet it (None: not measured)."""
    checked = []
    for goal in GOALS:
        if goal.workload in runs:
            same_run = all(
                runs.get(key, {}).get("started", 0) == runs[goal.workload].get("started") for key in goal.also
            )
            figures = goal.figures(rows) if same_run else []
            met = all(f <= goal.limit if goal.at_most else f >= goal.limit for f in figures) if figures else None
            checked.append(
                {
                    "workload": goal.workload,
                    "target": goal.text,
                    "figures": figures,
                    "unit": goal.unit,
                    "met": met,
                    "elsewhere": goal.elsewhere,
                }
            )
    return checked


def targets_markdown(checked: list[dict]) -> str:
    lines = ["### Targets", "", "| workload | target | measured | met? |", "|---|---|---|---|"]
    for c in checked:
        measured = " / ".join(
            f"{f:.2f}{c['unit']}" if c["unit"] == "×" else f"{f:+.1f}{c['unit']}" for f in c["figures"]
        )
        verdict = {
            True: "met",
            False: "missed",
            None: f"not in this run ({c['elsewhere']})" if c["elsewhere"] else "not in this run",
        }[c["met"]]
        lines.append(f"| ({c['workload']}) | {c['target']} | {measured or '–'} | {verdict} |")
    return "\n".join(lines) + "\n"


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


def markdown(rows: list[dict], workload: Workload, note: str = "") -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    headers = [h for h, _, _ in workload.columns] + [c for c, _ in workload.ratios]
    lines = [
        f"### {workload.title}",
        "",
        *([note, ""] if note else []),
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
        rows = [r for r in rows if r.get(workload.value) is not None]  # (g): the memory rows, not the speed ones
        if not rows:
            ax.set_axis_off()
            continue
        labels = [
            " ".join(str(r[k]) for k in ("target", "call", "model", "way") if r.get(k))
            + (f" c={r['concurrency']}" if "concurrency" in r else "")
            + (f" ×{r['processes']}" if "processes" in r else "")
            + (f" batch {r['batch']}" if "batch" in r else "")
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
        ax.set_title(textwrap.fill(workload.title, 160), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a short run proving the harness: one 1 s point "
        "per target, small sizes, no peers, no heavy model (workloads a, b, d, e, f, g)",
    )
    parser.add_argument("--only", help="comma-separated workloads to run, e.g. a,b (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="leave KServe and MLServer out")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results", help="where the results go (ignored by git)"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"also merge the run into the committed snapshot, {PUBLISHED.relative_to(REPO)}/ (the workloads run "
        "replace their earlier rows)",
    )
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else [k for k in WORKLOADS if not (args.smoke and k == "c")]
    if unknown := set(chosen) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    if args.publish and args.smoke:
        parser.error("a smoke run is not published")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.smoke or args.no_peers) and {"a", "b"} & set(chosen):
        peers.install()

    results = {}
    started = time.strftime("%Y-%m-%d %H:%M")
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
    run = {"machine": machine, "duration_s": bench.duration, "smoke": args.smoke, "started": started}
    runs = {key: run for key in results}
    rows = [{"workload": key, **row} for key, rows in results.items() for row in rows]
    print(write(args.out, runs, rows))
    if args.publish:
        earlier_runs, earlier_rows = published()
        rows = [r for r in earlier_rows if r["workload"] not in results] + rows
        write(PUBLISHED, {**earlier_runs, **runs}, sorted(rows, key=lambda r: list(WORKLOADS).index(r["workload"])))
        print(f"published: {', '.join(results)} into {PUBLISHED}", file=sys.stderr)


def write(folder: Path, runs: dict[str, dict], rows: list[dict]) -> str:
    """results.json, results.md and results.png into FOLDER for ROWS (each naming its workload), measured in
    RUNS (each workload's machine, seconds per point, smoke flag and start); returns the Markdown."""
    results = {key: [r for r in rows if r["workload"] == key] for key in WORKLOADS if key in runs}
    checked = check(runs, rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"runs": runs, "rows": rows, "targets": checked}, indent=2))
    settings = {
        key: f"Machine: {run['machine']}; {run['duration_s']:g} s per point"
        + (f"; run {run['started']}." if run.get("started") else ".")
        for key, run in runs.items()
    }
    shared = set(settings.values())
    text = (f"{next(iter(shared))}\n\n" if len(shared) == 1 else "") + "\n".join(
        markdown(rows, WORKLOADS[key], "" if len(shared) == 1 else settings[key]) for key, rows in results.items()
    )
    (folder / "results.md").write_text(text + "\n" + targets_markdown(checked))
    chart(results, folder / "results.png")
    return (folder / "results.md").read_text()


def published() -> tuple[dict[str, dict], list[dict]]:
    """The committed snapshot's runs and rows (a snapshot from before runs were kept per workload was one run)."""
    path = PUBLISHED / "results.json"
    if not path.exists():
        return {}, []
    snapshot = json.loads(path.read_text())
    rows = snapshot["rows"]
    run = {key: snapshot.get(key) for key in ("machine", "duration_s", "smoke")}
    return snapshot.get("runs") or {r["workload"]: run for r in rows}, rows


if __name__ == "__main__":
    main()
