"""The `mds` command: run the server, and a small gRPC client for models and predictions."""

import argparse
import asyncio
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import json_format

from mds.v1.job_service_pb2 import JobState
from mds.v1.model_service_pb2 import Placement
from mds_grpc.config import RENAMED, Settings, env_name, load_settings, parse, warn_renamed
from mds_grpc.core.errors import MdsError

if TYPE_CHECKING:  # the client loads gRPC: `mds serve --processes N`'s supervisor must not
    from mds_grpc.client import Client


def _settings(args) -> Settings:
    from mds_grpc.logs import configure_logging

    settings = load_settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    configure_logging(settings.log_dir, settings.log_level)
    return settings


def _serve(args) -> None:
    settings = _settings(args)
    if settings.processes > 1:  # a lean supervisor: the server loads only in the processes it starts
        from mds_grpc.processes import serve_processes

        serve_processes(settings)
    else:
        from mds_grpc.server import serve

        asyncio.run(serve(settings))


def _gc(args) -> None:
    from mds_grpc.core.garbage import collect_garbage
    from mds_grpc.storage import open_storage

    print(json.dumps(collect_garbage(open_storage(_settings(args)), args.grace_seconds), indent=2))


def _keys(args) -> None:
    from mds_grpc.core.auth import new_key
    from mds_grpc.storage import open_storage

    store = open_storage(_settings(args)).metadata
    if args.action == "create":
        token, key = new_key(args.scope, args.prefix, args.description)
        store.create_key(key)
        print(
            json.dumps(
                {
                    "id": key.id,
                    "key": token,
                    "scopes": key.scopes,
                    "prefixes": key.prefixes,
                    "note": "the key is shown only now; MDS keeps only its hash",
                },
                indent=2,
            )
        )
    elif args.action == "list":
        for key in store.list_keys():
            print(
                f"{key.id}\t{','.join(key.scopes)}\t{','.join(key.prefixes) or '*'}\t"
                f"{'revoked' if key.revoked else 'active'}\t{key.created_at.isoformat()}\t{key.description}"
            )
    elif not args.id:
        raise SystemExit("error: mds keys revoke needs a key id")
    elif not store.revoke_key(args.id):
        raise SystemExit(f"error: no API key {args.id!r}")
    else:
        print(f"revoked {args.id}")


def _worker(args) -> None:
    from mds_grpc.server import run_worker

    run_worker(_settings(args))


def _client(args) -> "Client":
    from mds_grpc.client import Client

    return Client(args.server, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


class _Bar:
    """A progress callback `(done, total, status)` drawing a tqdm bar from its first call; closed on exit."""

    def __init__(self, **options):
        self.options, self.bar = options, None

    def __call__(self, done: int, total: int, status: str = "") -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, **self.options)
        self.bar.update(done - self.bar.n)
        if status:
            self.bar.set_postfix_str(status)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


def _state(job) -> str:
    return JobState.Name(job.state).removeprefix("JOB_STATE_")


def _print_message(message) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))


def _upload(args) -> None:
    labels = dict(kv.split("=", 1) for kv in args.label)
    metadata = json.loads(args.metadata) if args.metadata else None
    with _client(args) as client, _Bar(unit="B", unit_scale=True, desc=args.name, disable=args.quiet) as bar:
        model = client.upload(
            args.path,
            args.name,
            description=args.description,
            labels=labels,
            metadata=metadata,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            placement=Placement(
                execution_providers=[name for name in args.providers.split(",") if name],
                device_id=args.device_id,
                tensorrt_fp16=args.tensorrt_fp16,
                device_memory_bytes=args.device_memory_bytes,
            ),
            progress=bar,
        )
    _print_message(model)


def _input_array(spec: str, dtypes_by_input: dict) -> tuple[str, np.ndarray]:
    name, sep, value = spec.partition("=")
    if not sep:
        raise SystemExit(f"error: --input {spec!r} must be NAME=FILE.npy or NAME=JSON")
    if value.endswith(".npy"):
        return name, np.load(value, allow_pickle=False)
    dtype = dtypes_by_input.get(name)
    return name, np.array(json.loads(value), dtype=dtype.numpy if dtype else None)


def _model_ref(text: str) -> tuple[str, str]:
    """MODEL or MODEL@ALIAS as (model, alias); a model name never holds an '@'."""
    name, _, alias = text.partition("@")
    return name, alias


def _predict(args) -> None:
    from mds_grpc.api.tensors import BY_WIRE
    from mds_grpc.core import dtypes

    name, alias = _model_ref(args.name)
    with _client(args) as client:
        model = client.get_model(name, args.version, alias=alias)
        wanted = {spec.name: BY_WIRE.get(spec.dtype) for spec in model.inputs}
        arrays = dict(_input_array(spec, wanted) for spec in args.input)
        # Through an alias the server picks the version (its canary too); else the one whose dtypes were read.
        version = 0 if alias else model.version
        prediction = client.predict(name, arrays, version=version, alias=alias, outputs=args.output)
    result = {
        name: {"dtype": dtypes.of_output(name, a).name, "shape": list(a.shape), "data": a.tolist()}
        for name, a in prediction.outputs.items()
    }
    result.update(prediction.structured_outputs)
    print(json.dumps({"model": prediction.model, "version": prediction.version, "outputs": result}, default=str))


def _models(args) -> None:
    with _client(args) as client:
        if args.action == "list":
            for model in client.list_models(args.name or ""):
                print(f"{model.name}\t{model.version}\t{model.size_bytes}\t{model.created_at.ToJsonString()}")
        elif args.action == "get":
            name, alias = _model_ref(args.name)
            _print_message(client.get_model(name, args.version, alias=alias))
        else:
            _print_message(client.delete_model(args.name, args.version, remove_aliases=args.remove_aliases))


def _canary(version: int, percent: int) -> str:
    return f"canary {version} at {percent}%" if version else "-"


def _alias(args) -> None:
    with _client(args) as client:
        if args.action == "set":
            _print_message(client.set_alias(args.model, args.alias, args.version, args.canary, args.percent))
        elif args.action == "list":
            for a in client.list_aliases(args.model):
                canary = _canary(a.canary_version, a.canary_percent)
                print(f"{a.alias}\t{a.version}\t{canary}\t{a.updated_at.ToJsonString()}")
        elif args.action == "delete":
            _print_message(client.delete_alias(args.model, args.alias))
        else:
            for change in client.alias_history(args.model, args.alias):
                canary = _canary(change.canary_version, change.canary_percent)
                who = change.who or "-"
                print(f"{change.at.ToJsonString()}\t{change.action}\t{change.version}\t{canary}\t{who}")


def _jobs(args) -> None:
    with _client(args) as client:
        if args.action == "create":
            arrays = {}
            for spec in args.input:
                name, _, path = spec.partition("=")
                if not path.endswith(".npy"):
                    raise SystemExit(f"error: --input {spec!r} must be NAME=FILE.npy (rows along dimension 0)")
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            name, alias = _model_ref(args.target)
            _print_message(
                client.create_job(
                    name,
                    arrays,
                    version=args.version,
                    alias=alias,
                    outputs=args.output,
                    batch_rows=args.batch_rows,
                    chunk_rows=args.chunk_rows,
                )
            )
        elif args.action == "list":
            state = JobState.Value("JOB_STATE_" + args.state.upper()) if args.state else 0
            for job in client.list_jobs(state=state, model=args.target or ""):
                print(f"{job.id}\t{job.model}\t{job.version}\t{_state(job)}\t{job.rows_done}/{job.rows_total}")
        elif args.action == "get":
            _print_message(client.get_job(args.target))
        elif args.action == "cancel":
            _print_message(client.cancel_job(args.target))
        elif args.action == "watch":
            with _Bar(unit="rows", disable=args.quiet) as bar:
                for job in client.watch_job(args.target):
                    bar(job.rows_done, job.rows_total, _state(job))
            if job.state != JobState.JOB_STATE_SUCCEEDED:
                raise SystemExit(f"error: job {job.id} ended {_state(job)}: {job.error}")
            print(f"job {job.id} SUCCEEDED: {job.rows_done} rows")
        else:
            _save_results(client, args.target, Path(args.out))


def _save_results(client: "Client", job_id: str, out: Path) -> None:
    """One NAME.npy per output of a job, filled batch by batch."""
    out.mkdir(parents=True, exist_ok=True)
    total = client.get_job(job_id).rows_total
    files = {}
    for batch in client.job_results(job_id):
        for name, array in batch.outputs.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise SystemExit(f"error: output name {name!r} cannot be a file name")
            if name not in files:
                files[name] = np.lib.format.open_memmap(
                    out / f"{name}.npy", mode="w+", dtype=array.dtype, shape=(total, *array.shape[1:])
                )
            files[name][batch.row_offset : batch.row_offset + batch.rows] = array
    for name, array in files.items():
        array.flush()
        print(out / f"{name}.npy")


class _Renamed(argparse.Action):
    """A deprecated settings flag: warns, and sets its new name unless that flag was given first."""

    def __call__(self, parser, namespace, value, option_string=None):
        new_flag = "--" + self.dest.replace("_", "-")
        warn_renamed(option_string, new_flag, ignored=getattr(namespace, self.dest) is not None)
        if getattr(namespace, self.dest) is None:
            setattr(namespace, self.dest, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mds", description="MDS, the Model Deployment Service")
    sub = parser.add_subparsers(dest="command", required=True)

    settings = argparse.ArgumentParser(add_help=False)
    for f in dataclasses.fields(Settings):
        settings.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=functools.partial(parse, type(f.default)),
            help=f"{f.metadata['doc']} Default: ${env_name(f.name)} or {f.default}.",
        )
    for old, new in RENAMED.items():
        settings.add_argument(
            "--" + old.replace("_", "-"),
            dest=new,
            action=_Renamed,
            help=argparse.SUPPRESS,
            type=functools.partial(parse, type(getattr(Settings, new))),
        )
    sub.add_parser(
        "serve", parents=[settings], help="run the gRPC server (settings: MDS_* variables, .env, these flags)"
    ).set_defaults(run=_serve)
    sub.add_parser("worker", parents=[settings], help="run bulk jobs from Redis (needs MDS_REDIS_URL)").set_defaults(
        run=_worker
    )
    gc = sub.add_parser(
        "gc",
        parents=[settings],
        help="remove blobs no record references and interrupted writes (same storage settings as the server)",
    )
    gc.add_argument(
        "--grace-seconds",
        type=float,
        default=3600,
        help="only what is older than this (default: an hour; uploads in flight are younger)",
    )
    gc.set_defaults(run=_gc)
    keys = sub.add_parser(
        "keys",
        parents=[settings],
        help="API keys: create (shown once), list, revoke (same storage settings as the server)",
    )
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("id", nargs="?", help="the key to revoke")
    keys.add_argument(
        "--scope",
        action="append",
        default=[],
        choices=["admin", "predict"],
        help="admin: upload, delete and everything predict may do; predict: inference and jobs",
    )
    keys.add_argument("--prefix", action="append", default=[], help="limit the key to model names with this prefix")
    keys.add_argument("--description", default="")
    keys.set_defaults(run=_keys)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--server",
        default=os.environ.get("MDS_SERVER", "localhost:50051"),
        help="host:port of the server (default: $MDS_SERVER or localhost:50051)",
    )
    client.add_argument(
        "--api-key",
        default=os.environ.get("MDS_API_KEY"),
        help="API key sent as 'authorization: Bearer <key>' (default: $MDS_API_KEY)",
    )
    client.add_argument(
        "--tls-ca",
        default=os.environ.get("MDS_TLS_CA"),
        help="connect over TLS, trusting this CA (PEM; default: $MDS_TLS_CA)",
    )
    client.add_argument(
        "--tls-cert",
        default=os.environ.get("MDS_TLS_CERT"),
        help="client certificate for mutual TLS (PEM; default: $MDS_TLS_CERT)",
    )
    client.add_argument(
        "--tls-key", default=os.environ.get("MDS_TLS_KEY"), help="its private key (PEM; default: $MDS_TLS_KEY)"
    )

    upload = sub.add_parser("upload", parents=[client], help="upload an .onnx file (and its external data)")
    upload.add_argument("path")
    upload.add_argument("--name", required=True)
    upload.add_argument("--description", default="")
    upload.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    upload.add_argument("--metadata", help="free-form JSON object")
    upload.add_argument(
        "--max-batch-size", type=int, default=0, help="dynamic batching: most rows per run (default 0: off)"
    )
    upload.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching: how long a batch waits for more requests, in µs",
    )
    upload.add_argument(
        "--providers",
        default="",
        metavar="NAME,...",
        help="execution providers, preferred first: tensorrt, cuda, cpu (default: the server's)",
    )
    upload.add_argument("--device-id", type=int, default=0, help="the GPU of the cuda and tensorrt providers")
    upload.add_argument("--tensorrt-fp16", action="store_true", help="let TensorRT build FP16 kernels")
    upload.add_argument(
        "--device-memory-bytes", type=int, default=0, help="the session's device memory limit (default: the server's)"
    )
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    upload.set_defaults(run=_upload)

    predict = sub.add_parser("predict", parents=[client], help="run a model on inputs and print its outputs")
    predict.add_argument("name", metavar="MODEL[@ALIAS]")
    predict.add_argument("--version", type=int, default=0)
    predict.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy|NAME=JSON")
    predict.add_argument("--output", action="append", default=[], metavar="NAME", help="only these outputs")
    predict.set_defaults(run=_predict)

    models = sub.add_parser("models", parents=[client], help="list, get or delete models")
    models.add_argument("action", choices=["list", "get", "delete"])
    models.add_argument("name", nargs="?", help="the model (get: MODEL@ALIAS too)")
    models.add_argument("--version", type=int, default=0)
    models.add_argument(
        "--remove-aliases", action="store_true", help="delete: also delete the aliases that point at what is deleted"
    )
    models.set_defaults(run=_models)

    alias = sub.add_parser("alias", help="aliases such as prod: set (with a canary), list, delete, history")
    actions = alias.add_subparsers(dest="action", required=True)
    set_alias = actions.add_parser("set", parents=[client], help="point an alias at a version (moves it)")
    set_alias.add_argument("model")
    set_alias.add_argument("alias")
    set_alias.add_argument("version", type=int)
    set_alias.add_argument("--canary", type=int, default=0, metavar="VERSION", help="send a share to this version")
    set_alias.add_argument("--percent", type=int, default=0, help="the canary's share of requests, 0-100")
    actions.add_parser("list", parents=[client], help="a model's aliases").add_argument("model")
    for action, what in (("delete", "delete an alias"), ("history", "every change of an alias: when, what, who")):
        named = actions.add_parser(action, parents=[client], help=what)
        named.add_argument("model")
        named.add_argument("alias")
    alias.set_defaults(run=_alias)

    jobs = sub.add_parser("jobs", parents=[client], help="bulk jobs: create, list, get, watch, cancel, results")
    jobs.add_argument("action", choices=["create", "list", "get", "watch", "cancel", "results"])
    jobs.add_argument("target", nargs="?", help="the model (create: MODEL@ALIAS too; list) or the job id")
    jobs.add_argument("--version", type=int, default=0)
    jobs.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    jobs.add_argument("--output", action="append", default=[], metavar="NAME", help="only these outputs")
    jobs.add_argument("--batch-rows", type=int, default=0, help="rows per batch (default: the server's)")
    jobs.add_argument("--chunk-rows", type=int, default=0, help="rows per uploaded message (default: ~16 MiB)")
    jobs.add_argument("--state", help="list only jobs in this state")
    jobs.add_argument("--out", default=".", help="folder for the results' NAME.npy files")
    jobs.add_argument("--quiet", action="store_true", help="no progress bar")
    jobs.set_defaults(run=_jobs)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.name:
        raise SystemExit(f"error: mds models {args.action} needs a model name")
    if args.command == "jobs" and args.action != "list" and not args.target:
        raise SystemExit(f"error: mds jobs {args.action} needs a {'model' if args.action == 'create' else 'job id'}")
    try:
        args.run(args)
    except MdsError as error:
        raise SystemExit(f"error: {error.status}: {error}") from None
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
