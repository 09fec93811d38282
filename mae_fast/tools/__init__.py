"""The ``mae-fast`` command and what it is built from: throughput benchmarks beside the reference and
torch.compile (``bench``), mask-ratio x patch-size sweeps (``sweep``), per-category profiles
(``profile``), FLOP counts (``flops``), timing (``timing``) and result files (``report``).
The library itself (ops, nn, models) never imports this package."""
