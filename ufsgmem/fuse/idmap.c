/*
 * idmap: a small open-addressing hash map from uint64 to uint64, for the compiled hot path's tables of a
 * session (mem inode -> struct ufs_file, handle -> inode and mode). Key 0 is never used (inodes and
 * handles start at 1); removed slots are skipped until the next rebuild, which happens when the map is
 * half full. Nothing here locks: the session's rwlock does (fastpath.c).
 */
#include <errno.h>
#include <stdlib.h>

#include "idmap.h"

#define MAP_EMPTY 0ull
#define MAP_GONE UINT64_MAX

static size_t map_slot(uint64_t key, size_t cap)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    return key & (cap - 1);
}

/* The slot holding key, or -1: probe from its hash slot to the first never-used one (removed slots are
   passed over, so a key put after a removal is still found). */
static long map_index(const struct ufs_map *m, uint64_t key)
{
    if (m->cap == 0)
        return -1;
    for (size_t i = map_slot(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == MAP_EMPTY)
            return -1;
        if (m->keys[i] == key)
            return (long)i;
    }
}

int ufs_map_find(const struct ufs_map *m, uint64_t key, uint64_t *val)
{
    long i = map_index(m, key);
    if (i < 0)
        return 0;
    *val = m->vals[i];
    return 1;
}

static int map_rebuild(struct ufs_map *m, size_t cap)
{
    uint64_t *keys = calloc(cap, sizeof(*keys)), *vals = calloc(cap, sizeof(*vals));
    if (keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return -ENOMEM;
    }
    size_t used = 0;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->keys[i] == MAP_EMPTY || m->keys[i] == MAP_GONE)
            continue;
        size_t j = map_slot(m->keys[i], cap);
        while (keys[j] != MAP_EMPTY)
            j = (j + 1) & (cap - 1);
        keys[j] = m->keys[i];
        vals[j] = m->vals[i];
        used++;
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;
    m->used = used;
    return 0;
}

int ufs_map_put(struct ufs_map *m, uint64_t key, uint64_t val)
{
    if ((m->used + 1) * 2 > m->cap) {
        size_t live = 0;
        for (size_t i = 0; i < m->cap; i++)
            live += m->keys[i] != MAP_EMPTY && m->keys[i] != MAP_GONE;
        size_t cap = 64;
        while ((live + 1) * 4 > cap)
            cap *= 2;
        int err = map_rebuild(m, cap);
        if (err)
            return err;
    }
    size_t i = map_slot(key, m->cap);
    for (;; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key) {
            m->vals[i] = val;
            return 0;
        }
        if (m->keys[i] == MAP_EMPTY)
            break;
    }
    m->keys[i] = key;
    m->vals[i] = val;
    m->used++;
    return 0;
}

int ufs_map_del(struct ufs_map *m, uint64_t key, uint64_t *val)
{
    long i = map_index(m, key);
    if (i < 0)
        return 0;
    *val = m->vals[i];
    m->keys[i] = MAP_GONE;
    return 1;
}

void ufs_map_free(struct ufs_map *m)
{
    free(m->keys);
    free(m->vals);
    m->keys = m->vals = NULL;
    m->cap = m->used = 0;
}

int ufs_map_live(const struct ufs_map *m, size_t i, uint64_t *key, uint64_t *val)
{
    if (m->keys[i] == MAP_EMPTY || m->keys[i] == MAP_GONE)
        return 0;
    *key = m->keys[i];
    *val = m->vals[i];
    return 1;
}
