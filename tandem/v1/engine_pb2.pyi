from tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole

class SubmitRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.RequestSpec
    def __init__(self, request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("request_id", "stage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: str
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("worker_id", "role", "num_blocks", "num_free_blocks", "num_running", "num_waiting", "block_size", "max_num_seqs", "timestamp", "num_steps", "max_model_len", "max_num_batched_tokens", "received_request_ids", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "num_kv_blocks_received", "num_kv_transfers", "kv_transfer_seconds", "kv_transfer_bytes", "draining", "num_kv_file_transfers", "vocab_size", "kv_cache_dtype", "lora_adapters")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_FILE_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    block_size: int
    max_num_seqs: int
    timestamp: float
    num_steps: int
    max_model_len: int
    max_num_batched_tokens: int
    received_request_ids: _containers.RepeatedScalarFieldContainer[str]
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_kv_blocks_received: int
    num_kv_transfers: int
    kv_transfer_seconds: float
    kv_transfer_bytes: int
    draining: bool
    num_kv_file_transfers: int
    vocab_size: int
    kv_cache_dtype: str
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., block_size: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., timestamp: _Optional[float] = ..., num_steps: _Optional[int] = ..., max_model_len: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., received_request_ids: _Optional[_Iterable[str]] = ..., num_preemptions: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., num_kv_blocks_received: _Optional[int] = ..., num_kv_transfers: _Optional[int] = ..., kv_transfer_seconds: _Optional[float] = ..., kv_transfer_bytes: _Optional[int] = ..., draining: _Optional[bool] = ..., num_kv_file_transfers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., lora_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class ScheduledChunk(_message.Message):
    __slots__ = ("request_id", "num_tokens", "request", "decode_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    request: _common_pb2.RequestSpec
    decode_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ..., decode_worker_id: _Optional[str] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("worker_id", "step_id", "chunks", "local")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[ScheduledChunk]
    local: bool
    def __init__(self, worker_id: _Optional[str] = ..., step_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ScheduledChunk, _Mapping]]] = ..., local: _Optional[bool] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("worker_id", "step_id", "prefilled_request_ids", "failed_request_ids", "heartbeat", "finished_request_ids", "refused", "local")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step_id: int
    prefilled_request_ids: _containers.RepeatedScalarFieldContainer[str]
    failed_request_ids: _containers.RepeatedScalarFieldContainer[str]
    heartbeat: Heartbeat
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedRequest]
    local: bool
    def __init__(self, worker_id: _Optional[str] = ..., step_id: _Optional[int] = ..., prefilled_request_ids: _Optional[_Iterable[str]] = ..., failed_request_ids: _Optional[_Iterable[str]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., finished_request_ids: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[_Union[RefusedRequest, _Mapping]]] = ..., local: _Optional[bool] = ...) -> None: ...

class RefusedRequest(_message.Message):
    __slots__ = ("request_id", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    error: str
    def __init__(self, request_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class KVBlockChunk(_message.Message):
    __slots__ = ("request_id", "chunk_index", "num_chunks", "first_block", "num_blocks", "dtype", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_index: int
    num_chunks: int
    first_block: int
    num_blocks: int
    dtype: str
    data: bytes
    def __init__(self, request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVHandoff(_message.Message):
    __slots__ = ("request", "num_computed_tokens", "num_chunks", "num_cached_tokens", "prefill_worker_id", "num_reused_blocks", "kv_file", "kv_scales")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_REUSED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_FILE_FIELD_NUMBER: _ClassVar[int]
    KV_SCALES_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.RequestSpec
    num_computed_tokens: int
    num_chunks: int
    num_cached_tokens: int
    prefill_worker_id: str
    num_reused_blocks: int
    kv_file: KVFile
    kv_scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ..., num_computed_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ..., num_reused_blocks: _Optional[int] = ..., kv_file: _Optional[_Union[KVFile, _Mapping]] = ..., kv_scales: _Optional[_Iterable[float]] = ...) -> None: ...

class KVFile(_message.Message):
    __slots__ = ("name", "num_blocks", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_blocks: int
    dtype: str
    def __init__(self, name: _Optional[str] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class LocalPrefill(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.RequestSpec
    def __init__(self, request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ...) -> None: ...

class KVProbe(_message.Message):
    __slots__ = ("request", "shm_domain")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SHM_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.RequestSpec
    shm_domain: str
    def __init__(self, request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ..., shm_domain: _Optional[str] = ...) -> None: ...

class KVProbeReply(_message.Message):
    __slots__ = ("num_cached_blocks", "shared_memory")
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    num_cached_blocks: int
    shared_memory: bool
    def __init__(self, num_cached_blocks: _Optional[int] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("stored", "removed", "cleared")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    stored: BlockStored
    removed: BlockRemoved
    cleared: AllBlocksCleared
    def __init__(self, stored: _Optional[_Union[BlockStored, _Mapping]] = ..., removed: _Optional[_Union[BlockRemoved, _Mapping]] = ..., cleared: _Optional[_Union[AllBlocksCleared, _Mapping]] = ...) -> None: ...

class BlockStored(_message.Message):
    __slots__ = ("block_hashes", "parent_block_hash", "block_size")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    parent_block_hash: int
    block_size: int
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ..., parent_block_hash: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class BlockRemoved(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class AllBlocksCleared(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("worker_id", "seq", "events", "full_resync")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FULL_RESYNC_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    seq: int
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    full_resync: bool
    def __init__(self, worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ..., full_resync: _Optional[bool] = ...) -> None: ...

class KVResyncRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ResetPrefixCache(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoRAAdapterUpdate(_message.Message):
    __slots__ = ("lora_name", "lora_path", "unload")
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    lora_name: str
    lora_path: str
    unload: bool
    def __init__(self, lora_name: _Optional[str] = ..., lora_path: _Optional[str] = ..., unload: _Optional[bool] = ...) -> None: ...

class KVHandoffAck(_message.Message):
    __slots__ = ("accepted", "error", "kv_file_unreadable", "place_elsewhere")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KV_FILE_UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    PLACE_ELSEWHERE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    error: str
    kv_file_unreadable: bool
    place_elsewhere: bool
    def __init__(self, accepted: _Optional[bool] = ..., error: _Optional[str] = ..., kv_file_unreadable: _Optional[bool] = ..., place_elsewhere: _Optional[bool] = ...) -> None: ...

class Preempted(_message.Message):
    __slots__ = ("request", "worker_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.RequestSpec
    worker_id: str
    def __init__(self, request: _Optional[_Union[_common_pb2.RequestSpec, _Mapping]] = ..., worker_id: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_id", "done")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    done: bool
    def __init__(self, worker_id: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("known", "num_pending")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_FIELD_NUMBER: _ClassVar[int]
    known: bool
    num_pending: int
    def __init__(self, known: _Optional[bool] = ..., num_pending: _Optional[int] = ...) -> None: ...

class WorkerLost(_message.Message):
    __slots__ = ("worker_id", "request_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestTokens(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish_reason", "stop_reason", "stop_token_id", "num_prompt_tokens", "num_cached_tokens", "reply_subject", "logprobs", "prompt_logprobs", "error_code", "first_output_index", "pooled", "dropped")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLY_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    FIRST_OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stop_reason: str
    stop_token_id: int
    num_prompt_tokens: int
    num_cached_tokens: int
    reply_subject: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    error_code: int
    first_output_index: int
    pooled: PooledOutput
    dropped: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stop_reason: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., reply_subject: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., error_code: _Optional[int] = ..., first_output_index: _Optional[int] = ..., pooled: _Optional[_Union[PooledOutput, _Mapping]] = ..., dropped: _Optional[bool] = ...) -> None: ...

class PooledOutput(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("worker_id", "step_id", "requests", "timestamp")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step_id: int
    requests: _containers.RepeatedCompositeFieldContainer[RequestTokens]
    timestamp: float
    def __init__(self, worker_id: _Optional[str] = ..., step_id: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[RequestTokens, _Mapping]]] = ..., timestamp: _Optional[float] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "stop_reason", "num_prompt_tokens", "num_cached_tokens", "error", "error_code", "produced_at", "logprobs", "prompt_logprobs", "stop_token_id", "pooled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stop_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str
    error_code: int
    produced_at: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    stop_token_id: int
    pooled: PooledOutput
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stop_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., produced_at: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., stop_token_id: _Optional[int] = ..., pooled: _Optional[_Union[PooledOutput, _Mapping]] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("num_waiting", "num_prefilling", "num_waiting_tokens", "index_available", "index_lookup_p50_ms", "num_index_lookups")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILLING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_LOOKUP_P50_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_INDEX_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_prefilling: int
    num_waiting_tokens: int
    index_available: bool
    index_lookup_p50_ms: float
    num_index_lookups: int
    def __init__(self, num_waiting: _Optional[int] = ..., num_prefilling: _Optional[int] = ..., num_waiting_tokens: _Optional[int] = ..., index_available: _Optional[bool] = ..., index_lookup_p50_ms: _Optional[float] = ..., num_index_lookups: _Optional[int] = ...) -> None: ...

class MetricsSnapshot(_message.Message):
    __slots__ = ("instance", "stage", "timestamp", "exposition")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EXPOSITION_FIELD_NUMBER: _ClassVar[int]
    instance: str
    stage: str
    timestamp: float
    exposition: str
    def __init__(self, instance: _Optional[str] = ..., stage: _Optional[str] = ..., timestamp: _Optional[float] = ..., exposition: _Optional[str] = ...) -> None: ...
