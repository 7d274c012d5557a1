"""Limits on what one request may ask for, checked before anything is allocated."""

from dataclasses import dataclass

from mds_grpc.core.errors import InvalidArgument, ResourceExhausted


@dataclass(frozen=True)
class TensorLimits:
    max_inputs: int = 64  # tensors per request
    max_rank: int = 16  # dimensions per tensor
    max_elements: int = 1 << 28  # elements per request, all tensors together
    max_string_bytes: int = 1 << 20  # bytes per STRING element

    def check_inputs(self, count: int) -> None:
        if count > self.max_inputs:
            raise ResourceExhausted(f"{count} input tensors exceed the limit of {self.max_inputs} (MDS_MAX_INPUTS)")

    def check_rank(self, name: str, shape) -> None:
        if len(shape) > self.max_rank:
            raise ResourceExhausted(
                f"tensor {name!r} has rank {len(shape)}, over the limit of {self.max_rank} (MDS_MAX_RANK)"
            )

    def check_elements(self, name: str, shape, count: int, elements_so_far: int) -> None:
        """Every dimension (even of an empty tensor) and the request's running total within the limit."""
        if max(shape, default=0) > self.max_elements or elements_so_far + count > self.max_elements:
            raise ResourceExhausted(
                f"tensor {name!r} with shape {list(shape)} takes the request over the limit "
                f"of {self.max_elements} elements (MDS_MAX_ELEMENTS)"
            )

    def check_string(self, name: str, length: int) -> None:
        if length > self.max_string_bytes:
            raise ResourceExhausted(
                f"tensor {name!r} has a {length}-byte STRING element, over the limit of "
                f"{self.max_string_bytes} bytes (MDS_MAX_STRING_BYTES)"
            )


@dataclass(frozen=True)
class JobLimits:
    default_batch_rows: int = 4096  # rows per onnxruntime run when a job does not say
    max_batch_rows: int = 1 << 20  # the most a job may ask for
    max_input_bytes: int = 16 << 30  # one uploaded job input, all columns together
    # Outputs per GetJobResults message, roughly: most gRPC clients accept 4 MiB by default.
    result_message_bytes: int = 3 << 20
    tensors: TensorLimits = TensorLimits()  # max_inputs and max_rank hold for a job input's columns

    def check_batch_rows(self, batch_rows: int) -> None:
        if not 0 <= batch_rows <= self.max_batch_rows:
            raise InvalidArgument(
                f"batch_rows must be between 0 (the server's default, {self.default_batch_rows}) "
                f"and {self.max_batch_rows} (MDS_MAX_JOB_BATCH_ROWS), got {batch_rows}"
            )
