"""The JetStream streams kefu uses, defined once so every service sets them up the same way."""

from __future__ import annotations

import hashlib

from nats.js.api import DiscardPolicy, KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig

STREAM_CONV = "CONV"
STREAM_KB = "KB"
STREAM_LLM = "LLM"
KV_CONV_STATE = "conv_state"
OBJ_MEDIA = "media"
KV_HANDOFFS = "handoffs"
KV_LLM_BUDGET = "llm_budget"
KV_AGENTS = "agents"
KV_TENANT_KEYS = "tenant_keys"
STREAM_AUDIT = "AUDIT"
AUDIT_SUBJECT = "kefu.audit"
MAX_MEDIA_BYTES = 10 * 1024 * 1024

KB_SUBJECTS = "kefu.kb.>"
LLM_GENERATE = "kefu.llm.generate"
LLM_CANCEL = "kefu.llm.cancel"
# A TurnRequest (conversation_id, turn_id) for a turn whose visitor left before the reply: every dialogue
# replica hears it; the one running the turn stops its generation.
TURN_CANCEL = "kefu.dialogue.cancel"
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


def conv_subject(tenant: str, conversation_id: str) -> str:
    """The subject of a conversation's events in stream CONV."""
    return f"kefu.conv.{tenant}.{conversation_id}"


def arguments_sha256(arguments_json: str) -> str:
    """What a tool-call confirmation names (SHA-256 hex of the exact argument text the visitor was shown):
    dialogue records it, the plugins service checks it before a side-effecting call runs."""
    return hashlib.sha256(arguments_json.encode()).hexdigest()


def kb_subject(tenant: str, doc_id: str) -> str:
    """The subject of a document in stream KB (one message per subject)."""
    return f"kefu.kb.{tenant}.doc.{doc_id}"


def out_subject(conversation_id: str) -> str:
    """Where dialogue publishes reply deltas and agent messages for the gateway."""
    return f"kefu.out.{conversation_id}"


def conv_stream() -> StreamConfig:
    """Stream CONV: every conversation event, deduplicated by Nats-Msg-Id for two minutes."""
    return StreamConfig(name=STREAM_CONV, subjects=["kefu.conv.>"], storage=StorageType.FILE,
                        duplicate_window=120.0, max_msg_size=1024 * 1024)


def kb_stream() -> StreamConfig:
    """Stream KB: one message per document subject, so the stream is a compacted log of the KB."""
    return StreamConfig(name=STREAM_KB, subjects=[KB_SUBJECTS], max_msgs_per_subject=1, storage=StorageType.FILE,
                        discard=DiscardPolicy.OLD, max_msg_size=MAX_DOCUMENT_BYTES + 64 * 1024)


def llm_stream(max_jobs: int = 64) -> StreamConfig:
    """Work-queue stream LLM: each generation job goes to one inference replica, removed once acked.

    At most ``max_jobs`` jobs wait or run at once; the broker refuses the next publish (discard new),
    so a flood answers "busy" at once instead of piling up behind the model."""
    return StreamConfig(name=STREAM_LLM, subjects=[LLM_GENERATE], retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE, max_age=600.0, max_msg_size=1024 * 1024, max_msgs=max_jobs,
                        discard=DiscardPolicy.NEW)


def llm_budget_kv() -> KeyValueConfig:
    """KV bucket "llm_budget": "<tenant>.<unix minute>" -> tokens the tenant's jobs used in that minute."""
    return KeyValueConfig(bucket=KV_LLM_BUDGET, history=1, ttl=600.0, storage=StorageType.FILE)


def handoff_subject(tenant: str) -> str:
    """Where a conversation that starts waiting for an agent is announced."""
    return f"kefu.handoff.{tenant}"


def handoffs_kv() -> KeyValueConfig:
    """KV bucket "handoffs": conversation id -> HandoffNotice, for every conversation in human mode."""
    return KeyValueConfig(bucket=KV_HANDOFFS, history=1, storage=StorageType.FILE)


def handoff_context(conversation_id: str) -> str:
    """What a sealed HandoffNotice in KV "handoffs" is bound to (kefu.shared.crypto)."""
    return f"handoffs/{conversation_id}"


def media_context(media_id: str) -> str:
    """What a sealed image in object store "media" is bound to (kefu.shared.crypto)."""
    return f"media/{media_id}"


def agents_kv() -> KeyValueConfig:
    """KV bucket "agents": "<tenant>.<agent_id>" -> AgentAccount (the gateway's agent accounts)."""
    return KeyValueConfig(bucket=KV_AGENTS, history=1, storage=StorageType.FILE)


def media_store() -> ObjectStoreConfig:
    """Object store "media": images visitors send (OCR reads them from here)."""
    return ObjectStoreConfig(bucket=OBJ_MEDIA, storage=StorageType.FILE, description="visitor media")


def tenant_keys_kv() -> KeyValueConfig:
    """KV bucket "tenant_keys": tenant -> TenantKeys (its data keys, wrapped by the master key)."""
    return KeyValueConfig(bucket=KV_TENANT_KEYS, history=5, storage=StorageType.FILE)


def audit_stream() -> StreamConfig:
    """Stream AUDIT: the hash-chained log of admin actions, kept forever; the API may not delete from it
    (an operator who turns that off first still leaves a gap that ``kefu audit verify`` reports)."""
    return StreamConfig(name=STREAM_AUDIT, subjects=[AUDIT_SUBJECT], storage=StorageType.FILE,
                        deny_delete=True, deny_purge=True, max_msg_size=64 * 1024)
