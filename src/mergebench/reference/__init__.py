"""Plain in-memory implementations of the data-free methods, written the way the papers'
reference code is: every checkpoint flattened into one vector in RAM, all task vectors
stacked, bool masks, `torch.save` artifacts.

They exist to be measured against (`scripts/bench_merge.py`) and to check that the streamed
engine gives the same numbers (`tests/reference/test_reference_equivalence.py`). They share no merge
code with `mergebench.methods`; only the option defaults come from `conf/method/`.
"""

from mergebench.reference.paper_style import (
    ReferenceResult,
    merge_reference,
    save_reference,
)

__all__ = ["ReferenceResult", "merge_reference", "save_reference"]
