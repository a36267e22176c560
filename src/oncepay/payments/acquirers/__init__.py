"""The client side of acquirers: what the service needs from one (``base``), the HTTP client
(``http``), its circuit breaker (``breaker``), and the pool that orders and chooses them
(``pool``). The simulated acquirer is a service of its own, :mod:`oncepay.simulator`."""
