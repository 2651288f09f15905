"""The binaries: gin-configured (T5X-style flags) entry points.

  python -m tiered_routing.cli.train     (= python -m tiered_routing.train)
  python -m tiered_routing.cli.eval      (= python -m tiered_routing.eval)
  python -m tiered_routing.cli.tradeoff  (= python scripts/tradeoff.py)
  python -m tiered_routing.cli.analyze_routing, generate, moefy,
      finetune_experts, add_expert, count_params, rewrite_report,
      compare_reports, false_discoveries

Modules besides the binaries: `gin_flags` (the flags every binary shares),
`configurables` (gin registrations of the library's configs) and
`benchmark_timing` (timing and tables of the benchmark scripts).
"""

import os

# Before a binary imports TensorFlow: on a machine without an NVIDIA driver
# TensorFlow's first device query logs "failed call to cuInit" as an error
# in every run; only its C++ log level hides it. Data errors still arrive
# as Python exceptions with their messages; set TF_CPP_MIN_LOG_LEVEL to see
# the C++ log.
if not os.path.exists("/proc/driver/nvidia"):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
