"""Client: every mds.v1 call of MDS with numpy arrays in and out, failures raised as MdsError subclasses."""

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from mds.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from mds_grpc.api.tensors import from_array
from mds_grpc.client.errors import error_for, error_of, typed_errors
from mds_grpc.client.replies import Prediction, ResultBatch
from mds_grpc.client.uploads import ModelUpload, Progress, job_input_requests
from mds_grpc.core.errors import MdsError

Pem = str | os.PathLike | bytes  # a PEM file's path, or its content


def _pem(value: Pem | None) -> bytes | None:
    return value if isinstance(value, bytes) or value is None else Path(value).read_bytes()


class Client:
    """A connection to an MDS server. Use it as a context manager, or call close().

    TLS is on when `tls` is set or a CA or client certificate is given; without `tls_ca` the system's roots
    are trusted. `api_key` is sent as `authorization: Bearer <key>` with every call. Messages of any size
    are allowed both ways.
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
    ):
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(_pem(tls_ca), _pem(tls_key), _pem(tls_cert))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._inference = inference_service_pb2_grpc.InferenceServiceStub(self.channel)
        self._jobs = job_service_pb2_grpc.JobServiceStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        with typed_errors():
            return method(request, metadata=self._metadata)

    def _replies(self, method, request) -> Iterator:
        """The replies of a server stream; stopping early cancels the call."""
        call = method(request, metadata=self._metadata)
        try:
            with typed_errors():
                yield from call
        finally:
            call.cancel()

    def _pages(self, method, request, field: str) -> Iterator:
        """The items in `field` of every page of a List call, asking for the next page as they run out."""
        while True:
            page = self._call(method, request)
            yield from getattr(page, field)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # Models

    def upload(
        self,
        model: str | os.PathLike | bytes,
        name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_batch_size: int = 0,
        max_queue_delay_us: int = 0,
        placement: model_service_pb2.Placement | None = None,
        progress: Progress | None = None,
    ) -> model_service_pb2.Model:
        """Upload an .onnx file (with the external-data files it references, found beside it) or a model's
        bytes as a new version of `name`. `max_batch_size` > 1 turns on dynamic batching; `placement` says
        where it runs (e.g. `Placement(execution_providers=["cuda", "cpu"])`). `progress(sent, total)` is called,
        from the thread that sends, as bytes go out."""
        upload = ModelUpload(model)
        header = upload.header(
            name=name,
            description=description,
            labels=labels or {},
            batching=model_service_pb2.Batching(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us),
            placement=placement,
        )
        if metadata:
            header.metadata.update(metadata)
        stored = self._call(self._models.UploadModel, upload.requests(header, progress))
        if stored.sha256 != upload.digest.hexdigest():
            raise error_for(
                "DATA_LOSS", f"server stored sha256 {stored.sha256}, the file hashes to {upload.digest.hexdigest()}"
            )
        return stored

    def get_model(self, name: str, version: int = 0, *, alias: str = "") -> model_service_pb2.Model:
        """One version of a model (0: the latest; or the main version `alias` points at), with its inputs,
        outputs, files and the aliases that point at it."""
        request = model_service_pb2.GetModelRequest(name=name, version=version, alias=alias)
        return self._call(self._models.GetModel, request)

    def list_models(self, name: str = "") -> Iterator[model_service_pb2.Model]:
        """Every stored version (of `name` only, when given), by name then version, page after page."""
        return self._pages(self._models.ListModels, model_service_pb2.ListModelsRequest(name=name), "models")

    def delete_model(
        self, name: str, version: int = 0, *, remove_aliases: bool = False
    ) -> model_service_pb2.DeleteModelResponse:
        """Delete one version, or every version (0), of a model. An alias pointing at one of them makes this
        FailedPrecondition, unless `remove_aliases`: then those aliases are deleted too."""
        request = model_service_pb2.DeleteModelRequest(name=name, version=version, remove_aliases=remove_aliases)
        return self._call(self._models.DeleteModel, request)

    # Aliases

    def set_alias(
        self, model: str, alias: str, version: int, canary_version: int = 0, canary_percent: int = 0
    ) -> model_service_pb2.Alias:
        """Point `alias` at `version` (moving it when it exists), sending `canary_percent` of its requests to
        `canary_version`. Returns once the server has loaded and warmed the targets."""
        request = model_service_pb2.SetAliasRequest(
            model=model, alias=alias, version=version, canary_version=canary_version, canary_percent=canary_percent
        )
        return self._call(self._models.SetAlias, request)

    def list_aliases(self, model: str) -> list[model_service_pb2.Alias]:
        """A model's aliases, by name."""
        return list(self._call(self._models.ListAliases, model_service_pb2.ListAliasesRequest(model=model)).aliases)

    def delete_alias(self, model: str, alias: str) -> model_service_pb2.Alias:
        """Delete an alias; returns it as it was."""
        return self._call(self._models.DeleteAlias, model_service_pb2.DeleteAliasRequest(model=model, alias=alias))

    def alias_history(self, model: str, alias: str) -> list[model_service_pb2.AliasChange]:
        """Every change of an alias, oldest first: action, targets, when (`at`) and who (an API key id)."""
        request = model_service_pb2.ListAliasHistoryRequest(model=model, alias=alias)
        return list(self._call(self._models.ListAliasHistory, request).changes)

    # Predictions

    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int = 0,
        alias: str = "",
        outputs: Sequence[str] = (),
        request_id: str = "",
    ) -> Prediction:
        """Run a model (version 0: the latest; or through `alias`) on named arrays; only `outputs` when given.
        Through an alias with a canary, `request_id` picks the version, so a retry lands on the same one."""
        request = _predict_request(model, inputs, version, alias, outputs, request_id)
        return Prediction.of(self._call(self._inference.Predict, request))

    def stream(
        self,
        model: str,
        inputs: Iterable[Mapping[str, np.ndarray]],
        *,
        version: int = 0,
        alias: str = "",
        outputs: Sequence[str] = (),
    ) -> Iterator[Prediction | MdsError]:
        """Run a model on each set of inputs over one stream, as they come. Yields one item per set, in order:
        its Prediction, or the MdsError it failed with (the stream goes on). A failure of the stream itself
        is raised."""
        requests = (_predict_request(model, arrays, version, alias, outputs) for arrays in inputs)
        for reply in self._replies(self._inference.PredictStream, requests):
            yield error_of(reply.error) if reply.HasField("error") else Prediction.of(reply.response)

    # Jobs

    def create_job(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int = 0,
        alias: str = "",
        outputs: Sequence[str] = (),
        batch_rows: int = 0,
        chunk_rows: int = 0,
    ) -> job_service_pb2.Job:
        """Upload inputs (rows along dimension 0; memory-mapped arrays are read as they are sent, `chunk_rows`
        per message, default ~16 MiB) and queue a job running `model` on them, `batch_rows` per run
        (0: the server's default). Through `alias`, the job keeps the version the alias points at now
        (`Job.version`). Returns the job, QUEUED."""
        uploaded = self._call(self._jobs.UploadJobInput, job_input_requests(inputs, chunk_rows))
        request = job_service_pb2.CreateJobRequest(
            model=model,
            version=version,
            alias=alias,
            input_id=uploaded.id,
            output_names=outputs,
            batch_rows=batch_rows,
        )
        return self._call(self._jobs.CreateJob, request)

    def get_job(self, job_id: str) -> job_service_pb2.Job:
        return self._call(self._jobs.GetJob, job_service_pb2.GetJobRequest(id=job_id))

    def list_jobs(
        self, *, state: int = job_service_pb2.JOB_STATE_UNSPECIFIED, model: str = ""
    ) -> Iterator[job_service_pb2.Job]:
        """Jobs newest first, only in `state` (a JobState) and of `model` when given, page after page."""
        request = job_service_pb2.ListJobsRequest(state=cast(job_service_pb2.JobState, state), model=model)
        return self._pages(self._jobs.ListJobs, request, "jobs")

    def watch_job(self, job_id: str) -> Iterator[job_service_pb2.Job]:
        """The job now, then again at each change of state or progress, until it has ended."""
        return self._replies(self._jobs.WatchJob, job_service_pb2.WatchJobRequest(id=job_id))

    def cancel_job(self, job_id: str) -> job_service_pb2.Job:
        return self._call(self._jobs.CancelJob, job_service_pb2.CancelJobRequest(id=job_id))

    def job_results(self, job_id: str) -> Iterator[ResultBatch]:
        """A succeeded job's outputs in row order, batch by batch."""
        return map(
            ResultBatch.of, self._replies(self._jobs.GetJobResults, job_service_pb2.GetJobResultsRequest(id=job_id))
        )


def _predict_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    version: int,
    alias: str,
    outputs: Sequence[str],
    request_id: str = "",
) -> inference_service_pb2.PredictRequest:
    return inference_service_pb2.PredictRequest(
        model=model,
        version=version,
        alias=alias,
        request_id=request_id,
        output_names=outputs,
        inputs=[from_array(name, array, raw=True) for name, array in inputs.items()],
    )
