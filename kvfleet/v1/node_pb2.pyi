from kvfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeGenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "tier", "stream_interval_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    tier: _common_pb2.Tier
    stream_interval_ms: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., stream_interval_ms: _Optional[int] = ...) -> None: ...

class NodeFinal(_message.Message):
    __slots__ = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "finish_reason")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    finish_reason: _common_pb2.FinishReason
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class NodeGenerateResponse(_message.Message):
    __slots__ = ("tokens", "final")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.TokenIds
    final: NodeFinal
    def __init__(self, tokens: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., final: _Optional[_Union[NodeFinal, _Mapping]] = ...) -> None: ...

class ServeRequest(_message.Message):
    __slots__ = ("stream", "start", "cancel", "more")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    stream: int
    start: NodeGenerateRequest
    cancel: bool
    more: _containers.RepeatedCompositeFieldContainer[ServeRequest]
    def __init__(self, stream: _Optional[int] = ..., start: _Optional[_Union[NodeGenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., more: _Optional[_Iterable[_Union[ServeRequest, _Mapping]]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamItem(_message.Message):
    __slots__ = ("stream", "tokens", "final", "error")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stream: int
    tokens: _common_pb2.TokenIds
    final: NodeFinal
    error: StreamError
    def __init__(self, stream: _Optional[int] = ..., tokens: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., final: _Optional[_Union[NodeFinal, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class ServeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StreamItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StreamItem, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfoResponse(_message.Message):
    __slots__ = ("node_id", "models", "ready", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    ready: bool
    load: _common_pb2.LoadSignals
    def __init__(self, node_id: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., ready: _Optional[bool] = ..., load: _Optional[_Union[_common_pb2.LoadSignals, _Mapping]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TokenizerResponse(_message.Message):
    __slots__ = ("tokenizer_json", "digest", "chat_template", "eos_token_ids", "bos_token", "eos_token")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: bytes
    digest: str
    chat_template: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token: str
    eos_token: str
    def __init__(self, tokenizer_json: _Optional[bytes] = ..., digest: _Optional[str] = ..., chat_template: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ...) -> None: ...

class WatchStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelBlocks(_message.Message):
    __slots__ = ("model", "block_size", "block_hashes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    model: str
    block_size: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., block_size: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("seq", "snapshot", "stored", "removed", "cleared_models", "load", "ready", "accepted_request_ids", "serve_level")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    SERVE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    snapshot: bool
    stored: _containers.RepeatedCompositeFieldContainer[ModelBlocks]
    removed: _containers.RepeatedCompositeFieldContainer[ModelBlocks]
    cleared_models: _containers.RepeatedScalarFieldContainer[str]
    load: _common_pb2.LoadSignals
    ready: bool
    accepted_request_ids: _containers.RepeatedScalarFieldContainer[str]
    serve_level: int
    def __init__(self, seq: _Optional[int] = ..., snapshot: _Optional[bool] = ..., stored: _Optional[_Iterable[_Union[ModelBlocks, _Mapping]]] = ..., removed: _Optional[_Iterable[_Union[ModelBlocks, _Mapping]]] = ..., cleared_models: _Optional[_Iterable[str]] = ..., load: _Optional[_Union[_common_pb2.LoadSignals, _Mapping]] = ..., ready: _Optional[bool] = ..., accepted_request_ids: _Optional[_Iterable[str]] = ..., serve_level: _Optional[int] = ...) -> None: ...
