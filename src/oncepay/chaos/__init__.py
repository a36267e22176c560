"""``oncepay chaos``: the whole stack as real processes under faults, then an exactly-once
audit of what happened (SPEC §5-6; docs/guarantees.md)."""
