"""What every OncePay database shares, below the payments service and the simulated acquirer
alike: the engine and its transactions (:mod:`~oncepay.storage.db`) and the shape of object
ids (:mod:`~oncepay.storage.ids`). Nothing here knows a table of either."""
