"""OncePay's benchmarks: scenario scripts (``drivers/``, ``overhead/``, ``e2e/``) over one
harness (``harness/``). Not shipped; type-checked and linted with the rest of the tree."""
