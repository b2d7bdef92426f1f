"""The FUSE frontend: guest_memfd files served through libfuse3's low-level API (docs/design.md §2, §3).

``server`` mounts and runs libfuse's multi-threaded loop, ``lowlevel`` is the cffi binding (built by
``_build``) and the one place requests become replies, ``ops`` answers requests, ``files`` holds what each
file does, ``inodes`` the namespace, lifetimes and locks, ``revoke`` the ranged invalidation.
docs/architecture.md walks through one request.
"""
