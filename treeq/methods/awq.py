"""AWQ as users name it: round-to-nearest after AWQ's activation-aware scale search.

The search is a scale migration (:mod:`treeq.transforms.awq`) any method can run first
(``--method gptq --migration awq``); this entry keeps ``--method awq`` meaning what AutoAWQ means.
"""

from __future__ import annotations

from .rtn import RTN


class AWQ(RTN):
    name = "awq"
    migration = "awq"


METHOD = AWQ
