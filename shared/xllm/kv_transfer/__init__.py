"""KV blocks between instances (PD disaggregation): `layout` maps block ids to byte runs of an
engine's KV pool; `mooncake` moves them with the Mooncake Transfer Engine (TCP, one-sided
writes into blocks the receiver reserved). Import `mooncake` only where a transfer happens:
it loads the native library."""
