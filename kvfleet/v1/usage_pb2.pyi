from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUP_BY_TENANT: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_MODEL: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_TIER: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_TENANT_MODEL_TIER: _ClassVar[UsageGroupBy]
USAGE_GROUP_BY_TENANT: UsageGroupBy
USAGE_GROUP_BY_MODEL: UsageGroupBy
USAGE_GROUP_BY_TIER: UsageGroupBy
USAGE_GROUP_BY_TENANT_MODEL_TIER: UsageGroupBy

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since_unix_ms", "until_unix_ms", "group_by")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since_unix_ms: int
    until_unix_ms: int
    group_by: UsageGroupBy
    def __init__(self, tenant: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., group_by: _Optional[_Union[UsageGroupBy, str]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "model", "tier", "requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "cost", "savings")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    SAVINGS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    tier: str
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost: str
    savings: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[str] = ..., savings: _Optional[str] = ...) -> None: ...

class TierPrice(_message.Message):
    __slots__ = ("model", "tier", "prompt", "cached_prompt", "completion")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: str
    prompt: str
    cached_prompt: str
    completion: str
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[str] = ..., prompt: _Optional[str] = ..., cached_prompt: _Optional[str] = ..., completion: _Optional[str] = ...) -> None: ...

class PriceTableInfo(_message.Message):
    __slots__ = ("currency", "prices")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    currency: str
    prices: _containers.RepeatedCompositeFieldContainer[TierPrice]
    def __init__(self, currency: _Optional[str] = ..., prices: _Optional[_Iterable[_Union[TierPrice, _Mapping]]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total", "prices", "since_unix_ms", "until_unix_ms")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total: UsageRow
    prices: PriceTableInfo
    since_unix_ms: int
    until_unix_ms: int
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total: _Optional[_Union[UsageRow, _Mapping]] = ..., prices: _Optional[_Union[PriceTableInfo, _Mapping]] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ...) -> None: ...

class GetPricesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPricesResponse(_message.Message):
    __slots__ = ("prices",)
    PRICES_FIELD_NUMBER: _ClassVar[int]
    prices: PriceTableInfo
    def __init__(self, prices: _Optional[_Union[PriceTableInfo, _Mapping]] = ...) -> None: ...
