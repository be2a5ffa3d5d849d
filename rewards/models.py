"""Model rewards (filled in below)."""
