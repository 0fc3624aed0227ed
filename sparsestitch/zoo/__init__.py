"""Model zoos: one folder holding a base reference and many fine-tunes stored as deltas.

::

    from sparsestitch import zoo
    zoo.init("my-zoo", "meta-llama/Llama-3.1-8B")           # a path or a Hub id
    zoo.add("my-zoo", ["runs/math", "runs/code"], density=0.01)  # local processes
    zoo.add("my-zoo", fine_tunes, ray=True)                  # one Ray task per fine-tune
    zoo.ls("my-zoo"); zoo.verify("my-zoo").ok
    zoo.get("my-zoo", "math", "math-restored/")
    zoo.merge("my-zoo", ["math", "code"], "merged/", rule="ties", density=0.2)
    zoo.rm("my-zoo", ["code"])

The manifest format and the locking protocol are specified in docs/zoo.md.
"""

from .api import AddResult, VerifyReport, ZooAddError, add, get, init, ls, merge, rm, verify
from .manifest import ManifestError, MemberConflictError, UnknownMemberError, ZooError

__all__ = ["init", "add", "ls", "get", "merge", "verify", "rm", "AddResult", "VerifyReport",
           "ZooError", "ZooAddError", "ManifestError", "MemberConflictError", "UnknownMemberError"]
