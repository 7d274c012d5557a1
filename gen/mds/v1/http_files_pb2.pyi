from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from mds.v1 import job_service_pb2 as _job_service_pb2
from mds.v1 import model_service_pb2 as _model_service_pb2
from mds.v1 import options_pb2 as _options_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadModelBodyRequest(_message.Message):
    __slots__ = ("name", "description", "sha256", "body")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    sha256: str
    body: _httpbody_pb2.HttpBody
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., sha256: _Optional[str] = ..., body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class UploadJobInputBodyRequest(_message.Message):
    __slots__ = ("input", "body")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    input: str
    body: _httpbody_pb2.HttpBody
    def __init__(self, input: _Optional[str] = ..., body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ...) -> None: ...

class DownloadJobOutputRequest(_message.Message):
    __slots__ = ("id", "format", "output")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    format: str
    output: str
    def __init__(self, id: _Optional[str] = ..., format: _Optional[str] = ..., output: _Optional[str] = ...) -> None: ...
