"""Acquirers: the simulated acquirer service and the clients that call acquirers."""
