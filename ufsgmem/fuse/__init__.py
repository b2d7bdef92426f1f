"""The FUSE frontend: a pyfuse3/trio filesystem of guest_memfd files (design §2, §3).

``server`` mounts and runs the loop, ``ops`` adapts pyfuse3 requests, ``files`` holds what each file
does, ``inodes`` the namespace and lifetimes, ``revoke`` the ranged /dev/fuse invalidation.
"""
