"""dgia-jax: dual-granularity identity association for weakly-supervised text-to-person matching."""
