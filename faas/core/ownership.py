"""Which namespace a shared name belongs to: a Redis stream or an object-store bucket.

Streams and buckets are not inside a namespace (one Redis, one object store), so without an owner a
function of namespace B could write its results into a stream namespace A's function reads, read A's
destination stream, or subscribe to A's bucket.  Guarantee: the first namespace that names a stream
(a destination, a queue subscription) or a bucket (an object-store subscription) owns it, recorded in
etcd at ``/faas/owners/{kind}s/{name}`` in one transaction (two racing namespaces: one wins); any
other namespace naming it gets 409 ``conflict``.  Ownership is never given up (deleting the function
or subscription keeps it): an admin deletes the key to hand a name over.
"""

from __future__ import annotations

from typing import Literal

from faas.core import keys
from faas.core.errors import Conflict
from faas.core.etcd import Etcd

Kind = Literal["stream", "bucket"]


async def claim(etcd: Etcd, kind: Kind, name: str, ns: str) -> None:
    """Make ``ns`` the owner of ``name`` unless another namespace is: then ``Conflict``."""
    key = keys.owner(kind, name)
    for _ in range(3):  # the owner's key deleted between the two steps: try again
        created, _ = await etcd.txn([etcd.create_revision(key) == 0], [etcd.op_put(key, ns.encode())])
        if created:
            return
        kv = await etcd.get(key)
        if kv is None:
            continue
        if kv.value.decode() != ns:
            raise Conflict(f"{kind} {name!r} belongs to another namespace; use another name")
        return
    raise Conflict(f"{kind} {name!r}: its owner keeps changing; try again")
