"""dgia-jax: dual-granularity identity association for weakly-supervised text-to-person matching."""

from dgia_jax import host_memory

# Before JAX's CPU threads exist: steps reuse their temporary buffers' pages (host_memory).
host_memory.retain_freed_memory()
