/*
 * runmap: a run-length map from page index to a 64-bit value, for the page ranges of one file.
 *
 * The attribute, pin, allocation and "possibly cached" maps of a guest_memfd are all of this kind: a
 * few runs where a VMM converts in big ranges, up to millions where it converts page by page. Runs are
 * kept merged (no two neighbours hold the same value) in chunks of at most RUNMAP_CHUNK_RUNS runs, with
 * an index of every chunk's first page, so a lookup is two binary searches and a change moves at most
 * one chunk's runs. The page count per value is kept too, so "how many pages are private" is O(1).
 *
 * Ranges are half-open page ranges [start, end). Nothing here locks: the owner does (gmem.h says which
 * lock guards which map). Errors are negative errno values: -EINVAL for a range outside the map,
 * -ENOMEM when growing a chunk fails, -EOVERFLOW when runmap_add would take a value past int64 (the map
 * is unchanged in every error case).
 */
#ifndef UFSGMEM_RUNMAP_H
#define UFSGMEM_RUNMAP_H

#include <stddef.h>
#include <stdint.h>

#define RUNMAP_CHUNK_RUNS 512

struct runmap;

/* one run: where it starts and its value (it ends where the next begins); 16 bytes, what P5 counts */
struct runmap_run {
    uint64_t start;
    int64_t value;
};

/* one entry of the per-value page counts */
struct runmap_count {
    int64_t value;
    uint64_t pages;
};

/* which values runmap_first looks for */
enum runmap_op { RUNMAP_EQ, RUNMAP_NE, RUNMAP_GT };

struct runmap *runmap_new(uint64_t npages, int64_t value);   /* NULL: npages == 0 or out of memory */
struct runmap *runmap_new_chunked(uint64_t npages, int64_t value, uint32_t chunk_runs);  /* tests */
void runmap_free(struct runmap *map);

uint64_t runmap_npages(const struct runmap *map);
uint64_t runmap_len(const struct runmap *map);                          /* number of runs */
int64_t runmap_value_at(const struct runmap *map, uint64_t page);       /* page < npages */
/* every page of [start, end) maps to value (true when empty) */
int runmap_is_uniform(const struct runmap *map, uint64_t start, uint64_t end, int64_t value);
/* the first page of [start, end) whose value v satisfies (v op value), or -1 */
int64_t runmap_first(const struct runmap *map, uint64_t start, uint64_t end, enum runmap_op op, int64_t value);
/* pages of [start, end) mapping to value; O(1) for the whole map */
uint64_t runmap_count(const struct runmap *map, int64_t value, uint64_t start, uint64_t end);
/* runs intersecting [start, end) */
uint64_t runmap_count_runs(const struct runmap *map, uint64_t start, uint64_t end);
/*
 * Copy out the runs intersecting [start, end), clipped to it, from the run that holds page *cursor
 * (start it at `start`): at most `max` of them into starts[] / values[] (ends are the next start, the
 * last one's is *cursor afterwards). Returns how many were copied; *cursor is where the next call goes on
 * (end when done). So a long map is read in pieces without holding all of it twice.
 */
uint64_t runmap_runs(const struct runmap *map, uint64_t *cursor, uint64_t end, uint64_t *starts,
                     int64_t *values, uint64_t max);

int runmap_set(struct runmap *map, uint64_t start, uint64_t end, int64_t value);
int runmap_add(struct runmap *map, uint64_t start, uint64_t end, int64_t delta);

uint64_t runmap_metadata_bytes(const struct runmap *map);   /* 16 bytes a run: what P5 counts */
uint64_t runmap_footprint_bytes(const struct runmap *map);  /* everything malloc'd for it */
/* 0 if every invariant holds, else a positive code naming the first that does not (for tests) */
int runmap_check(const struct runmap *map);
const char *runmap_check_message(int code);                 /* what a runmap_check code means */

/*
 * For tests only: the internals, writable, so that a test can break an invariant and see runmap_check
 * catch it. runmap_chunk returns chunk c's runs (NULL when c >= runmap_chunks) with their count in *n and
 * its entry of the chunk index in *first; runmap_counts the per-value counts (sorted by value). The
 * pointers are valid until the map next changes.
 */
uint64_t runmap_chunks(const struct runmap *map);
struct runmap_run *runmap_chunk(struct runmap *map, uint64_t c, uint32_t *n, uint64_t **first);
struct runmap_count *runmap_counts(struct runmap *map, uint32_t *n);

#endif
