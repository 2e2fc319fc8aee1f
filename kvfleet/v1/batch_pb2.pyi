from kvfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_JOB_STATE_UNSPECIFIED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_VALIDATING: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_IN_PROGRESS: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_CANCELLING: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_CANCELLED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_COMPLETED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_EXPIRED: _ClassVar[BatchJobState]
    BATCH_JOB_STATE_FAILED: _ClassVar[BatchJobState]
BATCH_JOB_STATE_UNSPECIFIED: BatchJobState
BATCH_JOB_STATE_VALIDATING: BatchJobState
BATCH_JOB_STATE_IN_PROGRESS: BatchJobState
BATCH_JOB_STATE_CANCELLING: BatchJobState
BATCH_JOB_STATE_CANCELLED: BatchJobState
BATCH_JOB_STATE_COMPLETED: BatchJobState
BATCH_JOB_STATE_EXPIRED: BatchJobState
BATCH_JOB_STATE_FAILED: BatchJobState

class SubmitBatchChunk(_message.Message):
    __slots__ = ("data", "completion_window", "tenant", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    completion_window: str
    tenant: str
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., completion_window: _Optional[str] = ..., tenant: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class BatchCounts(_message.Message):
    __slots__ = ("total", "pending", "completed", "failed", "expired", "cancelled", "rejected")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    total: int
    pending: int
    completed: int
    failed: int
    expired: int
    cancelled: int
    rejected: int
    def __init__(self, total: _Optional[int] = ..., pending: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., expired: _Optional[int] = ..., cancelled: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class BatchJob(_message.Message):
    __slots__ = ("id", "tenant", "state", "created_unix_ms", "expires_unix_ms", "finished_unix_ms", "completion_window_s", "filename", "counts")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    state: BatchJobState
    created_unix_ms: int
    expires_unix_ms: int
    finished_unix_ms: int
    completion_window_s: int
    filename: str
    counts: BatchCounts
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[BatchJobState, str]] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., completion_window_s: _Optional[int] = ..., filename: _Optional[str] = ..., counts: _Optional[_Union[BatchCounts, _Mapping]] = ...) -> None: ...

class BatchJobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListBatchJobsRequest(_message.Message):
    __slots__ = ("tenant", "limit")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limit: int
    def __init__(self, tenant: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListBatchJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[BatchJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[BatchJob, _Mapping]]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("custom_id", "line", "model", "url", "text", "finish_reason", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "node_id", "request_id", "attempts", "completed_unix_ms")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    line: int
    model: str
    url: str
    text: str
    finish_reason: _common_pb2.FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    node_id: str
    request_id: str
    attempts: int
    completed_unix_ms: int
    def __init__(self, custom_id: _Optional[str] = ..., line: _Optional[int] = ..., model: _Optional[str] = ..., url: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., node_id: _Optional[str] = ..., request_id: _Optional[str] = ..., attempts: _Optional[int] = ..., completed_unix_ms: _Optional[int] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("line", "custom_id", "code", "message")
    LINE_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    line: int
    custom_id: str
    code: str
    message: str
    def __init__(self, line: _Optional[int] = ..., custom_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
