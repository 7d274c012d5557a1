"""The `mds` command: run the server, and a small gRPC client for models and predictions."""

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from mds_grpc.config import RENAMED, Settings, env_name, load_settings, parse, warn_renamed

CHUNK_BYTES = 1 << 20


def _settings(args) -> Settings:
    from mds_grpc.logs import configure_logging

    settings = load_settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    configure_logging(settings.log_dir, settings.log_level)
    return settings


def _serve(args) -> None:
    from mds_grpc.processes import serve_processes
    from mds_grpc.server import serve

    settings = _settings(args)
    if settings.processes > 1:
        serve_processes(settings)
    else:
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
        print(json.dumps({"id": key.id, "key": token, "scopes": key.scopes, "prefixes": key.prefixes,
                          "note": "the key is shown only now; MDS keeps only its hash"}, indent=2))
    elif args.action == "list":
        for key in store.list_keys():
            print(f"{key.id}\t{','.join(key.scopes)}\t{','.join(key.prefixes) or '*'}\t"
                  f"{'revoked' if key.revoked else 'active'}\t{key.created_at.isoformat()}\t{key.description}")
    elif not args.id:
        raise SystemExit("error: mds keys revoke needs a key id")
    elif not store.revoke_key(args.id):
        raise SystemExit(f"error: no API key {args.id!r}")
    else:
        print(f"revoked {args.id}")


def _worker(args) -> None:
    from mds_grpc.server import run_worker

    run_worker(_settings(args))


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str):
        self.metadata = (("authorization", f"Bearer {key}"),)

    def _add(self, continuation, details, request):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _add


def _channel(args) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    if args.tls_ca or args.tls_cert:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        channel = grpc.secure_channel(args.server, credentials, options=options)  # no CA given: system roots
    else:
        channel = grpc.insecure_channel(args.server, options=options)
    return grpc.intercept_channel(channel, _ApiKey(args.api_key)) if args.api_key else channel


def _print_message(message) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))


def _side_files(model_path: Path) -> list[str]:
    """Locations of external data the model references, relative to its folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    graph = onnx.load(str(model_path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in _get_all_tensors(graph) if uses_external_data(t)})


def _upload(args) -> None:
    from tqdm import tqdm

    from mds.v1 import model_service_pb2 as pb
    from mds.v1 import model_service_pb2_grpc

    path = Path(args.path)
    side = [(name, path.parent / name) for name in _side_files(path)]
    header = pb.ModelHeader(
        name=args.name, description=args.description, labels=dict(kv.split("=", 1) for kv in args.label),
        size_bytes=path.stat().st_size,
        external_files=[pb.ModelFile(path=name, size_bytes=file.stat().st_size) for name, file in side],
        batching=pb.Batching(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us),
    )
    if args.metadata:
        header.metadata.update(json.loads(args.metadata))
    total = path.stat().st_size + sum(file.stat().st_size for _, file in side)
    progress = tqdm(total=total, unit="B", unit_scale=True, desc=args.name, disable=args.quiet)
    digest = hashlib.sha256()

    def requests():
        yield pb.UploadModelRequest(header=header)
        for name, file in [(None, path), *side]:
            with open(file, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    progress.update(len(chunk))
                    if name is None:
                        digest.update(chunk)
                        yield pb.UploadModelRequest(chunk=chunk)
                    else:
                        yield pb.UploadModelRequest(file_chunk=pb.FileChunk(path=name, data=chunk))

    model = model_service_pb2_grpc.ModelServiceStub(_channel(args)).UploadModel(requests())
    progress.close()
    if model.sha256 != digest.hexdigest():
        raise SystemExit(f"error: server stored sha256 {model.sha256}, the file hashes to {digest.hexdigest()}")
    _print_message(model)


def _input_array(spec: str, dtypes_by_input: dict) -> tuple[str, np.ndarray]:
    name, sep, value = spec.partition("=")
    if not sep:
        raise SystemExit(f"error: --input {spec!r} must be NAME=FILE.npy or NAME=JSON")
    if value.endswith(".npy"):
        return name, np.load(value, allow_pickle=False)
    dtype = dtypes_by_input.get(name)
    return name, np.array(json.loads(value), dtype=dtype.numpy if dtype else None)


def _predict(args) -> None:
    from mds.v1 import inference_service_pb2, inference_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc
    from mds_grpc.api.tensors import PREFIX, DataType, from_array, to_array
    from mds_grpc.core import dtypes

    channel = _channel(args)
    model = model_service_pb2_grpc.ModelServiceStub(channel).GetModel(
        model_service_pb2.GetModelRequest(name=args.name, version=args.version)
    )
    wanted = {spec.name: dtypes.BY_NAME.get(DataType.Name(spec.dtype).removeprefix(PREFIX)) for spec in model.inputs}
    arrays = dict(_input_array(spec, wanted) for spec in args.input)
    request = inference_service_pb2.PredictRequest(
        model=args.name, version=model.version, output_names=args.output,
        inputs=[from_array(name, array, raw=True) for name, array in arrays.items()],
    )
    response = inference_service_pb2_grpc.InferenceServiceStub(channel).Predict(request)
    result = {t.name: {"dtype": dtypes.of_array(a := to_array(t)).name, "shape": list(a.shape), "data": a.tolist()}
              for t in response.outputs}
    result.update(json_format.MessageToDict(response)["structuredOutputs"] if response.structured_outputs else {})
    print(json.dumps({"model": response.model, "version": response.version, "outputs": result}, default=str))


def _models(args) -> None:
    from mds.v1 import model_service_pb2 as pb
    from mds.v1 import model_service_pb2_grpc

    stub = model_service_pb2_grpc.ModelServiceStub(_channel(args))
    if args.action == "list":
        token = ""
        while True:
            page = stub.ListModels(pb.ListModelsRequest(name=args.name or "", page_token=token))
            for model in page.models:
                print(f"{model.name}\t{model.version}\t{model.size_bytes}\t{model.created_at.ToJsonString()}")
            if not (token := page.next_page_token):
                break
    elif args.action == "get":
        _print_message(stub.GetModel(pb.GetModelRequest(name=args.name, version=args.version)))
    else:
        _print_message(stub.DeleteModel(pb.DeleteModelRequest(name=args.name, version=args.version)))


def _job_requests(arrays: dict[str, np.ndarray], chunk_rows: int):
    """UploadJobInput messages: the header, then chunks of rows read from memory-mapped arrays."""
    from mds.v1 import job_service_pb2 as jobs
    from mds.v1 import tensor_pb2
    from mds_grpc.api.tensors import PREFIX, DataType, from_array
    from mds_grpc.core import dtypes

    specs = [tensor_pb2.TensorSpec(name=name, dtype=DataType.Value(PREFIX + dtypes.of_array(a).name), shape=a.shape)
             for name, a in arrays.items()]
    yield jobs.UploadJobInputRequest(header=jobs.JobInputHeader(inputs=specs))
    rows = next(iter(arrays.values())).shape[0]
    for start in range(0, rows, chunk_rows):
        chunk = [from_array(name, np.asarray(a[start:start + chunk_rows]), raw=True) for name, a in arrays.items()]
        yield jobs.UploadJobInputRequest(chunk=jobs.JobInputChunk(inputs=chunk))


def _jobs(args) -> None:
    from tqdm import tqdm

    from mds.v1 import job_service_pb2 as pb
    from mds.v1 import job_service_pb2_grpc
    from mds_grpc.api.tensors import to_array

    stub = job_service_pb2_grpc.JobServiceStub(_channel(args))
    if args.action == "create":
        arrays = {}
        for spec in args.input:
            name, _, path = spec.partition("=")
            if not path.endswith(".npy"):
                raise SystemExit(f"error: --input {spec!r} must be NAME=FILE.npy (rows along dimension 0)")
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        row_bytes = sum(a[:1].nbytes for a in arrays.values()) or 1
        chunk_rows = args.chunk_rows or max(1, CHUNK_BYTES * 16 // row_bytes)  # ~16 MiB messages
        job_input = stub.UploadJobInput(_job_requests(arrays, chunk_rows))
        job = stub.CreateJob(pb.CreateJobRequest(model=args.target, version=args.version, input_id=job_input.id,
                                                 output_names=args.output, batch_rows=args.batch_rows))
        _print_message(job)
    elif args.action == "list":
        state = pb.JobState.Value("JOB_STATE_" + args.state.upper()) if args.state else 0
        page = stub.ListJobs(pb.ListJobsRequest(state=state, model=args.target or ""))
        for job in page.jobs:
            print(f"{job.id}\t{job.model}\t{job.version}\t{pb.JobState.Name(job.state)[10:]}\t"
                  f"{job.rows_done}/{job.rows_total}")
    elif args.action == "get":
        _print_message(stub.GetJob(pb.GetJobRequest(id=args.target)))
    elif args.action == "cancel":
        _print_message(stub.CancelJob(pb.CancelJobRequest(id=args.target)))
    elif args.action == "watch":
        progress = None
        for job in stub.WatchJob(pb.WatchJobRequest(id=args.target)):
            progress = progress or tqdm(total=job.rows_total, unit="rows", disable=args.quiet)
            progress.update(job.rows_done - progress.n)
            progress.set_postfix_str(pb.JobState.Name(job.state)[10:])
        progress.close()
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise SystemExit(f"error: job {job.id} ended {pb.JobState.Name(job.state)[10:]}: {job.error}")
        print(f"job {job.id} SUCCEEDED: {job.rows_done} rows")
    else:  # results: one NAME.npy per output, filled batch by batch
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        total = stub.GetJob(pb.GetJobRequest(id=args.target)).rows_total
        files = {}
        for batch in stub.GetJobResults(pb.GetJobResultsRequest(id=args.target)):
            for tensor in batch.outputs:
                array = to_array(tensor)
                if Path(tensor.name).name != tensor.name or tensor.name in ("", ".", ".."):
                    raise SystemExit(f"error: output name {tensor.name!r} cannot be a file name")
                if tensor.name not in files:
                    files[tensor.name] = np.lib.format.open_memmap(
                        out / f"{tensor.name}.npy", mode="w+", dtype=array.dtype, shape=(total, *array.shape[1:]))
                files[tensor.name][batch.row_offset:batch.row_offset + batch.rows] = array
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
        settings.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                              type=functools.partial(parse, type(f.default)),
                              help=f"{f.metadata['doc']} Default: ${env_name(f.name)} or {f.default}.")
    for old, new in RENAMED.items():
        settings.add_argument("--" + old.replace("_", "-"), dest=new, action=_Renamed, help=argparse.SUPPRESS,
                              type=functools.partial(parse, type(getattr(Settings, new))))
    sub.add_parser("serve", parents=[settings], help="run the gRPC server (settings: MDS_* variables, .env, "
                   "these flags)").set_defaults(run=_serve)
    sub.add_parser("worker", parents=[settings], help="run bulk jobs from Redis (needs MDS_REDIS_URL)"
                   ).set_defaults(run=_worker)
    gc = sub.add_parser("gc", parents=[settings], help="remove blobs no record references and interrupted "
                        "writes (same storage settings as the server)")
    gc.add_argument("--grace-seconds", type=float, default=3600,
                    help="only what is older than this (default: an hour; uploads in flight are younger)")
    gc.set_defaults(run=_gc)
    keys = sub.add_parser("keys", parents=[settings], help="API keys: create (shown once), list, revoke "
                          "(same storage settings as the server)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("id", nargs="?", help="the key to revoke")
    keys.add_argument("--scope", action="append", default=[], choices=["admin", "predict"],
                      help="admin: upload, delete and everything predict may do; predict: inference and jobs")
    keys.add_argument("--prefix", action="append", default=[], help="limit the key to model names with this prefix")
    keys.add_argument("--description", default="")
    keys.set_defaults(run=_keys)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--server", default=os.environ.get("MDS_SERVER", "localhost:50051"),
                        help="host:port of the server (default: $MDS_SERVER or localhost:50051)")
    client.add_argument("--api-key", default=os.environ.get("MDS_API_KEY"),
                        help="API key sent as 'authorization: Bearer <key>' (default: $MDS_API_KEY)")
    client.add_argument("--tls-ca", default=os.environ.get("MDS_TLS_CA"),
                        help="connect over TLS, trusting this CA (PEM; default: $MDS_TLS_CA)")
    client.add_argument("--tls-cert", default=os.environ.get("MDS_TLS_CERT"),
                        help="client certificate for mutual TLS (PEM; default: $MDS_TLS_CERT)")
    client.add_argument("--tls-key", default=os.environ.get("MDS_TLS_KEY"),
                        help="its private key (PEM; default: $MDS_TLS_KEY)")

    upload = sub.add_parser("upload", parents=[client], help="upload an .onnx file (and its external data)")
    upload.add_argument("path")
    upload.add_argument("--name", required=True)
    upload.add_argument("--description", default="")
    upload.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    upload.add_argument("--metadata", help="free-form JSON object")
    upload.add_argument("--max-batch-size", type=int, default=0,
                        help="dynamic batching: most rows per run (default 0: off)")
    upload.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="dynamic batching: how long a batch waits for more requests, in µs")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    upload.set_defaults(run=_upload)

    predict = sub.add_parser("predict", parents=[client], help="run a model on inputs and print its outputs")
    predict.add_argument("name")
    predict.add_argument("--version", type=int, default=0)
    predict.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy|NAME=JSON")
    predict.add_argument("--output", action="append", default=[], metavar="NAME", help="only these outputs")
    predict.set_defaults(run=_predict)

    models = sub.add_parser("models", parents=[client], help="list, get or delete models")
    models.add_argument("action", choices=["list", "get", "delete"])
    models.add_argument("name", nargs="?")
    models.add_argument("--version", type=int, default=0)
    models.set_defaults(run=_models)

    jobs = sub.add_parser("jobs", parents=[client], help="bulk jobs: create, list, get, watch, cancel, results")
    jobs.add_argument("action", choices=["create", "list", "get", "watch", "cancel", "results"])
    jobs.add_argument("target", nargs="?", help="the model (create, list) or the job id")
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
    except grpc.RpcError as error:
        raise SystemExit(f"error: {error.code().name}: {error.details()}") from None
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
