"""``payments``: charges cards (Django), deduplicated by ``Idempotency-Key``, in SQLite."""
