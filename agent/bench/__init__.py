"""meshagent benchmarks: ``python -m agent.bench [--quick] [--out DIR] [scenario ...]``
(or ``scripts/bench.sh``). Builds labs, measures, and writes report.md, PNG
plots and raw JSON to ``bench-results/<timestamp>/``. See docs/performance.md."""
