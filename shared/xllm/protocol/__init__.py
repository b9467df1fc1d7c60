"""The contract between xLLM's services: NATS subjects, message types, errors, one codec.

    subjects.py   every subject / queue group / stream name, with sender → receiver and kind
    codec.py      @message registry, encode / decode (msgpack envelope {t, v, d}), DecodeError
    errors.py     ErrorCode, ErrorInfo, ProtocolError, RequestRejected, http_status
    types.py      SamplingParams, StructuredOutput, Logprob, Role, ImageData, RequestSpec: the
                  value types every layer shares
    gateway.py    SubmitRequest, SubmitReply, ClusterStateRequest, ClusterState, InstanceLost
    instance.py   GenerateCmd, DecodeCmd, PrefillCmd, KvReady, AbortCmd, SetRoleCmd, Heartbeat
    supervisor.py InstanceExited: a supervisor saw an instance's process exit
    encoder.py    EncodeRequest, EncodeReply (descriptors of embeddings; bytes go by Mooncake)
    expert_group.py  ExpertGroupStep: an expert-parallel instance's rank 0 → its followers
                  (over torch.distributed, not NATS)
    stream.py     TokenDelta, FinishReason, DraftCounts
    kv_peer.py    KvPeer, KvLayout (a KV pool as a write target, inside PrefillCmd)
    stats.py      LoadStats, KvCacheStats, StepStats, PreemptionStats, SpeculationStats,
                  KvTransferStats, KvTierStats, ExpertStats, EncoderStats: the stats
                  groups a Heartbeat carries
    kv.py         KvEvents, KvEvent, KvSnapshotRequest, KvMatchRequest, KvMatchReply
    dispatch.py   TypeDispatcher, make_callback

Importing this package imports every message module, so `decode` knows every tag no matter
which submodule a service imported first.
"""

from xllm.protocol import subjects
from xllm.protocol.codec import DecodeError, decode, decode_as, encode, message, registry
from xllm.protocol.dispatch import TypeDispatcher, make_callback
from xllm.protocol.encoder import EncodeReply, EncodeRequest
from xllm.protocol.errors import (
    ErrorCode,
    ErrorInfo,
    ProtocolError,
    RequestRejected,
    http_status,
)
from xllm.protocol.expert_group import ExpertGroupStep, GroupRequest
from xllm.protocol.gateway import (
    ClusterState,
    ClusterStateRequest,
    InstanceLost,
    SubmitReply,
    SubmitRequest,
)
from xllm.protocol.instance import (
    AbortCmd,
    DecodeCmd,
    GenerateCmd,
    Heartbeat,
    KvReady,
    PrefillCmd,
    SetRoleCmd,
)
from xllm.protocol.kv import KvEvent, KvEvents, KvMatchReply, KvMatchRequest, KvSnapshotRequest
from xllm.protocol.kv_peer import KvLayout, KvPeer
from xllm.protocol.stats import (
    EncoderStats,
    ExpertStats,
    KvCacheStats,
    KvTierCounters,
    KvTierStats,
    KvTransferStats,
    LoadStats,
    PreemptionStats,
    SpeculationStats,
    StepStats,
)
from xllm.protocol.stream import DraftCounts, FinishReason, TokenDelta
from xllm.protocol.supervisor import InstanceExited
from xllm.protocol.types import (
    EmbeddingRef,
    ImageData,
    Logprob,
    RequestSpec,
    Role,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
)

__all__ = [
    "AbortCmd",
    "ClusterState",
    "ClusterStateRequest",
    "DecodeCmd",
    "DecodeError",
    "DraftCounts",
    "EmbeddingRef",
    "EncodeReply",
    "EncodeRequest",
    "EncoderStats",
    "ErrorCode",
    "ErrorInfo",
    "ExpertGroupStep",
    "ExpertStats",
    "FinishReason",
    "GenerateCmd",
    "GroupRequest",
    "Heartbeat",
    "ImageData",
    "InstanceExited",
    "InstanceLost",
    "KvCacheStats",
    "KvEvent",
    "KvEvents",
    "KvLayout",
    "KvMatchReply",
    "KvMatchRequest",
    "KvPeer",
    "KvReady",
    "KvSnapshotRequest",
    "KvTierCounters",
    "KvTierStats",
    "KvTransferStats",
    "LoadStats",
    "Logprob",
    "PreemptionStats",
    "PrefillCmd",
    "ProtocolError",
    "RequestRejected",
    "RequestSpec",
    "Role",
    "SamplingParams",
    "SetRoleCmd",
    "SpeculationStats",
    "StepStats",
    "StructuredKind",
    "StructuredOutput",
    "SubmitReply",
    "SubmitRequest",
    "TokenDelta",
    "TypeDispatcher",
    "decode",
    "decode_as",
    "encode",
    "http_status",
    "make_callback",
    "message",
    "registry",
    "subjects",
]
