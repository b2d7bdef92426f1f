/*
 * idmap: a small open-addressing hash map uint64 -> uint64 (idmap.c says how), for the compiled hot path's
 * per-session tables. Zero-initialised is empty. The caller locks.
 */
#ifndef UFSGMEM_IDMAP_H
#define UFSGMEM_IDMAP_H

#include <stddef.h>
#include <stdint.h>

struct ufs_map {
    uint64_t *keys, *vals;
    size_t cap, used;            /* used counts removed slots too, until the next rebuild */
};

int ufs_map_find(const struct ufs_map *m, uint64_t key, uint64_t *val);   /* 1 found, 0 not */
int ufs_map_put(struct ufs_map *m, uint64_t key, uint64_t val);           /* 0 or -ENOMEM */
int ufs_map_del(struct ufs_map *m, uint64_t key, uint64_t *val);          /* 1 removed, 0 not there */
/* slot i (i < m->cap) holds a live entry: 1 and its key and value, else 0 (to walk every entry) */
int ufs_map_live(const struct ufs_map *m, size_t i, uint64_t *key, uint64_t *val);
void ufs_map_free(struct ufs_map *m);

#endif
