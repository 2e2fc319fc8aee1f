from kvfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("token", "node_id", "credential", "address", "models", "hostname")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    node_id: str
    credential: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    hostname: str
    def __init__(self, token: _Optional[str] = ..., node_id: _Optional[str] = ..., credential: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., hostname: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "credential", "lease_ttl_s", "heartbeat_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    credential: str
    lease_ttl_s: int
    heartbeat_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., credential: _Optional[str] = ..., lease_ttl_s: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("load", "ready", "summaries")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    load: _common_pb2.LoadSignals
    ready: bool
    summaries: _containers.RepeatedCompositeFieldContainer[_common_pb2.CacheSummary]
    def __init__(self, load: _Optional[_Union[_common_pb2.LoadSignals, _Mapping]] = ..., ready: _Optional[bool] = ..., summaries: _Optional[_Iterable[_Union[_common_pb2.CacheSummary, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.NodeState
    def __init__(self, state: _Optional[_Union[_common_pb2.NodeState, str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeRef(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class NodeRecord(_message.Message):
    __slots__ = ("node_id", "address", "state", "models", "load", "joined_unix_ms", "last_heartbeat_unix_ms", "summaries", "alive", "hostname")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    JOINED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: _common_pb2.NodeState
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    load: _common_pb2.LoadSignals
    joined_unix_ms: int
    last_heartbeat_unix_ms: int
    summaries: _containers.RepeatedCompositeFieldContainer[_common_pb2.CacheSummary]
    alive: bool
    hostname: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., load: _Optional[_Union[_common_pb2.LoadSignals, _Mapping]] = ..., joined_unix_ms: _Optional[int] = ..., last_heartbeat_unix_ms: _Optional[int] = ..., summaries: _Optional[_Iterable[_Union[_common_pb2.CacheSummary, _Mapping]]] = ..., alive: _Optional[bool] = ..., hostname: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRecord]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeRecord, _Mapping]]] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("ttl_s", "description")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ttl_s: int
    description: str
    def __init__(self, ttl_s: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class JoinTokenInfo(_message.Message):
    __slots__ = ("id", "description", "created_unix_ms", "expires_unix_ms", "revoked", "uses")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    id: str
    description: str
    created_unix_ms: int
    expires_unix_ms: int
    revoked: bool
    uses: int
    def __init__(self, id: _Optional[str] = ..., description: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., revoked: _Optional[bool] = ..., uses: _Optional[int] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: JoinTokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[JoinTokenInfo, _Mapping]] = ...) -> None: ...

class ListJoinTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJoinTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[JoinTokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[JoinTokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeJoinTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListRoutersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterRecord(_message.Message):
    __slots__ = ("router_id", "address", "started_unix_ms", "queue_depth", "inflight")
    class QueueDepthEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class InflightEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    address: str
    started_unix_ms: int
    queue_depth: _containers.ScalarMap[str, int]
    inflight: _containers.ScalarMap[str, int]
    def __init__(self, router_id: _Optional[str] = ..., address: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., queue_depth: _Optional[_Mapping[str, int]] = ..., inflight: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListRoutersResponse(_message.Message):
    __slots__ = ("routers",)
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    routers: _containers.RepeatedCompositeFieldContainer[RouterRecord]
    def __init__(self, routers: _Optional[_Iterable[_Union[RouterRecord, _Mapping]]] = ...) -> None: ...
