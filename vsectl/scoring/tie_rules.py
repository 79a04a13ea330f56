"""The tie rules of retrieval ranking and the one default every command uses (no torch: the CLI reads it for --help).

A candidate that scores exactly what the ground truth scores is a tie. The default is `expected`: it is the expectation
over a random order of the tied items, which is what a ranking by sort gives on average (the order of equal keys is
arbitrary there), so it neither rewards nor punishes a tie; and on data without ties it equals `optimistic`, the
strict-rank rule of the published protocols, so numbers on tie-free data (real-valued features of distinct captions)
are unchanged. `optimistic` flatters a model exactly where identical captions sit on different images (docs/data.md).
"""

from __future__ import annotations

TIE_RULES = ("optimistic", "pessimistic", "expected")
DEFAULT_TIE_RULE = "expected"
LEGACY_TIE_RULE = "optimistic"  # what results written before the rule was recorded (no `tie_rule` key) used
TIE_RULE_HELP = ("Exact ties with the ground truth: expected (the default: the average over a random order of the "
                 "tied items) | optimistic (never count) | pessimistic (always count)")
