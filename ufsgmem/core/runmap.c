/*
 * runmap.c: the run-length map of runmap.h, the one implementation the Python binding (ufsgmem/runmap.py)
 * and the FUSE server's C hot path both call.
 *
 * Layout. The runs are kept in chunks of at most `most` runs (RUNMAP_CHUNK_RUNS unless a test asks for
 * fewer); each chunk is one array of struct runmap_run (start, value), so a lookup reads one cache line
 * for both and a run costs exactly 16 bytes of payload. `firsts[c]` is the start of chunk c's first run:
 * a page is found with a binary search over `firsts`, then one inside the chunk. Chunks hold between
 * most/4 and most runs (a map with one chunk may hold fewer), so the index is ~1/300 of the runs and an
 * update moves at most one chunk's runs, whatever the size of the map.
 *
 * Updates. The change a 4 KiB conversion, fill or write-back makes (a range inside one run) is done in
 * place: the run is split, shrunk, or merged into a neighbour, moving at most two runs of its chunk. Any
 * other change (several runs, a merge across a chunk edge, a chunk leaving its bounds) takes the general
 * path: the runs it overlaps, plus one neighbour on each side so that equal neighbours merge, are replaced
 * by their canonical replacement; if the chunk would leave its bounds, the chunks concerned are rebuilt
 * into new ones of most/2..3/4 most runs (or merged with a neighbour when too small).
 *
 * Failure. Every allocation an update needs (chunk capacity, new chunks, the chunk index, a new entry in
 * the counts) is made before the first run is changed, so -ENOMEM (and -EOVERFLOW from runmap_add) leave
 * the map exactly as it was: the callers' "fail closed" rule needs that.
 *
 * Page counts per value are a small array sorted by value (the maps hold a handful of distinct values:
 * two attributes, 0/1 allocation, small pin counts), kept up to date by every update, so counting a value
 * over the whole map is one binary search. Entries never hold zero pages between calls.
 */
#include "runmap.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct chunk {
    uint32_t n;                  /* runs in use */
    uint32_t cap;                /* runs allocated */
    struct runmap_run *runs;
};

struct runmap {
    uint64_t npages;
    uint64_t nruns;              /* runs in all chunks: len() without a walk */
    uint32_t most;               /* most runs in a chunk */
    uint32_t ncounts, counts_cap;
    size_t nchunks, chunks_cap;  /* chunks and firsts share the capacity */
    struct chunk *chunks;
    uint64_t *firsts;            /* firsts[c] == chunks[c].runs[0].start: what the first search reads */
    struct runmap_count *counts; /* sorted by value, no zero entries between calls */
};

/* a run's position: chunk c, index j in it */
struct pos {
    size_t c;
    uint32_t j;
};

/* ---- allocation ------------------------------------------------------------------------------------ */

/* Room for `need` runs in chunk k. Grows by an eighth (as Python's arrays do) so a chunk filled run by run
   reallocates O(log) times, but never past `most`: the in-place paths never hold more. Only capacity
   changes, so failing here leaves the map as it was. */
static int chunk_reserve(const struct runmap *m, struct chunk *k, uint32_t need)
{
    if (need <= k->cap)
        return 0;
    uint32_t cap = need + need / 8 + 2;
    if (cap > m->most)
        cap = m->most;
    if (cap < need)
        cap = need;
    struct runmap_run *runs = realloc(k->runs, (size_t)cap * sizeof *runs);
    if (runs == NULL)
        return -ENOMEM;
    k->runs = runs;
    k->cap = cap;
    return 0;
}

/* Give back the spare capacity of a chunk that shrank to under half of it, so that footprint stays near
   the payload. A failed shrink keeps the bigger block, which is still correct. */
static void chunk_trim(struct chunk *k)
{
    if (k->cap <= 2 * k->n + 8)
        return;
    uint32_t cap = k->n + k->n / 8 + 2;
    struct runmap_run *runs = realloc(k->runs, (size_t)cap * sizeof *runs);
    if (runs != NULL) {
        k->runs = runs;
        k->cap = cap;
    }
}

/* Room for `need` chunks in both the chunk array and the index. Each realloc that succeeds is kept even if
   the other fails: the old contents are intact and chunks_cap only grows once both did. */
static int chunks_reserve(struct runmap *m, size_t need)
{
    if (need <= m->chunks_cap)
        return 0;
    size_t cap = m->chunks_cap * 2 > need ? m->chunks_cap * 2 : need;
    struct chunk *chunks = realloc(m->chunks, cap * sizeof *chunks);
    if (chunks == NULL)
        return -ENOMEM;
    m->chunks = chunks;
    uint64_t *firsts = realloc(m->firsts, cap * sizeof *firsts);
    if (firsts == NULL)
        return -ENOMEM;
    m->firsts = firsts;
    m->chunks_cap = cap;
    return 0;
}

/* ---- per-value page counts ------------------------------------------------------------------------- */

/* index of the first entry with a value >= v */
static uint32_t count_lower(const struct runmap *m, int64_t v)
{
    uint32_t lo = 0, hi = m->ncounts;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->counts[mid].value < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static struct runmap_count *count_find(const struct runmap *m, int64_t v)
{
    uint32_t i = count_lower(m, v);
    return i < m->ncounts && m->counts[i].value == v ? &m->counts[i] : NULL;
}

/* Make sure v has an entry (with 0 pages if new), so that moving pages to it later cannot fail. This is
   the one allocation of the counts; count_purge undoes it on the way out of a failed update. */
static int count_ensure(struct runmap *m, int64_t v)
{
    uint32_t i = count_lower(m, v);
    if (i < m->ncounts && m->counts[i].value == v)
        return 0;
    if (m->ncounts == m->counts_cap) {
        uint32_t cap = m->counts_cap ? m->counts_cap * 2 : 4;
        struct runmap_count *counts = realloc(m->counts, cap * sizeof *counts);
        if (counts == NULL)
            return -ENOMEM;
        m->counts = counts;
        m->counts_cap = cap;
    }
    memmove(&m->counts[i + 1], &m->counts[i], (m->ncounts - i) * sizeof *m->counts);
    m->counts[i] = (struct runmap_count){ v, 0 };
    m->ncounts++;
    return 0;
}

/* Move pages from one value to another; both have entries (count_ensure). Entries that reach zero stay
   until count_purge: a later move of the same update may need them again. */
static void count_move(struct runmap *m, int64_t from, int64_t to, uint64_t pages)
{
    count_find(m, from)->pages -= pages;
    count_find(m, to)->pages += pages;
}

/* drop the entries holding no pages */
static void count_purge(struct runmap *m)
{
    uint32_t kept = 0;
    for (uint32_t i = 0; i < m->ncounts; i++)
        if (m->counts[i].pages != 0)
            m->counts[kept++] = m->counts[i];
    m->ncounts = kept;
}

/* ---- lookups --------------------------------------------------------------------------------------- */

/* The chunk holding page: the last whose first run starts at or before it (chunk 0 starts at 0). */
static size_t chunk_of(const struct runmap *m, uint64_t page)
{
    size_t lo = 1, hi = m->nchunks;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (m->firsts[mid] <= page)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

/* the run of chunk c holding page (its first run starts at or before it) */
static uint32_t run_of(const struct chunk *k, uint64_t page)
{
    uint32_t lo = 1, hi = k->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (k->runs[mid].start <= page)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

static struct pos locate(const struct runmap *m, uint64_t page)
{
    size_t c = chunk_of(m, page);
    return (struct pos){ c, run_of(&m->chunks[c], page) };
}

/* The next position. Past the last run of a chunk is the next chunk's first run, except past the last
   run of the map, which is (last chunk, n): pos_start gives npages there. */
static inline void pos_next(const struct runmap *m, struct pos *p)
{
    if (++p->j == m->chunks[p->c].n && p->c + 1 < m->nchunks) {
        p->c++;
        p->j = 0;
    }
}

static inline uint64_t pos_start(const struct runmap *m, struct pos p)
{
    const struct chunk *k = &m->chunks[p.c];
    return p.j < k->n ? k->runs[p.j].start : m->npages;
}

static inline int64_t pos_value(const struct runmap *m, struct pos p)
{
    return m->chunks[p.c].runs[p.j].value;
}

/* where run j of chunk c ends: the next run's start, the next chunk's, or npages */
static inline uint64_t run_end(const struct runmap *m, size_t c, uint32_t j)
{
    const struct chunk *k = &m->chunks[c];
    if (j + 1 < k->n)
        return k->runs[j + 1].start;
    return c + 1 < m->nchunks ? m->chunks[c + 1].runs[0].start : m->npages;
}

static inline int range_ok(const struct runmap *m, uint64_t start, uint64_t end)
{
    return start <= end && end <= m->npages;
}

/* ---- creation ------------------------------------------------------------------------------------- */

struct runmap *runmap_new_chunked(uint64_t npages, int64_t value, uint32_t chunk_runs)
{
    /* below 4 a chunk's lower bound (most/4) is 0 and a split (pieces of most/2) would not shrink it */
    if (npages == 0 || chunk_runs < 4)
        return NULL;
    struct runmap *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    m->npages = npages;
    m->nruns = 1;
    m->most = chunk_runs;
    m->chunks = malloc(sizeof *m->chunks);
    m->firsts = malloc(sizeof *m->firsts);
    m->counts = malloc(sizeof *m->counts);
    /* a small first chunk: most maps (the per-file cached marks, pins) never hold more than a few runs */
    struct runmap_run *runs = malloc(4 * sizeof *runs);
    if (m->chunks == NULL || m->firsts == NULL || m->counts == NULL || runs == NULL) {
        free(runs);
        free(m->chunks);
        free(m->firsts);
        free(m->counts);
        free(m);
        return NULL;
    }
    runs[0] = (struct runmap_run){ 0, value };
    m->chunks[0] = (struct chunk){ 1, 4, runs };
    m->firsts[0] = 0;
    m->nchunks = m->chunks_cap = 1;
    m->counts[0] = (struct runmap_count){ value, npages };
    m->ncounts = m->counts_cap = 1;
    return m;
}

struct runmap *runmap_new(uint64_t npages, int64_t value)
{
    return runmap_new_chunked(npages, value, RUNMAP_CHUNK_RUNS);
}

void runmap_free(struct runmap *m)
{
    if (m == NULL)
        return;
    for (size_t c = 0; c < m->nchunks; c++)
        free(m->chunks[c].runs);
    free(m->chunks);
    free(m->firsts);
    free(m->counts);
    free(m);
}

/* ---- queries --------------------------------------------------------------------------------------- */

uint64_t runmap_npages(const struct runmap *m) { return m->npages; }
uint64_t runmap_len(const struct runmap *m) { return m->nruns; }

int64_t runmap_value_at(const struct runmap *m, uint64_t page)
{
    /* page < npages is the caller's to ensure; past it this answers the last run, never reads outside */
    struct pos p = locate(m, page);
    return pos_value(m, p);
}

int runmap_is_uniform(const struct runmap *m, uint64_t start, uint64_t end, int64_t value)
{
    if (!range_ok(m, start, end))
        return 0;
    if (start == end)
        return 1;
    struct pos p = locate(m, start);
    return pos_value(m, p) == value && run_end(m, p.c, p.j) >= end;
}

static inline int op_holds(enum runmap_op op, int64_t v, int64_t value)
{
    switch (op) {
    case RUNMAP_EQ:
        return v == value;
    case RUNMAP_NE:
        return v != value;
    case RUNMAP_GT:
        return v > value;
    }
    return 0;
}

int64_t runmap_first(const struct runmap *m, uint64_t start, uint64_t end, enum runmap_op op, int64_t value)
{
    if (!range_ok(m, start, end) || start == end)
        return -1;
    struct pos p = locate(m, start);
    uint64_t s = start;
    for (;;) {
        if (op_holds(op, pos_value(m, p), value))
            return (int64_t)s;
        pos_next(m, &p);
        s = pos_start(m, p);
        if (s >= end)
            return -1;
    }
}

uint64_t runmap_count(const struct runmap *m, int64_t value, uint64_t start, uint64_t end)
{
    if (!range_ok(m, start, end) || start == end)
        return 0;
    if (start == 0 && end == m->npages) {
        const struct runmap_count *e = count_find(m, value);
        return e ? e->pages : 0;
    }
    struct pos p = locate(m, start);
    uint64_t s = start, pages = 0;
    for (;;) {
        int64_t v = pos_value(m, p);
        pos_next(m, &p);
        uint64_t e = pos_start(m, p);
        if (v == value)
            pages += (e < end ? e : end) - s;
        if (e >= end)
            return pages;
        s = e;
    }
}

uint64_t runmap_count_runs(const struct runmap *m, uint64_t start, uint64_t end)
{
    if (!range_ok(m, start, end) || start == end)
        return 0;
    struct pos a = locate(m, start), b = locate(m, end - 1);
    if (a.c == b.c)
        return b.j - a.j + 1;
    uint64_t runs = m->chunks[a.c].n - a.j + b.j + 1;
    for (size_t c = a.c + 1; c < b.c; c++)
        runs += m->chunks[c].n;
    return runs;
}

uint64_t runmap_runs(const struct runmap *m, uint64_t *cursor, uint64_t end, uint64_t *starts,
                     int64_t *values, uint64_t max)
{
    uint64_t at = *cursor, copied = 0;
    if (end > m->npages)
        end = m->npages;
    if (at >= end || max == 0)
        return 0;
    struct pos p = locate(m, at);
    for (;;) {
        starts[copied] = at;  /* the first run clipped to the cursor, the others start where they start */
        values[copied] = pos_value(m, p);
        copied++;
        pos_next(m, &p);
        at = pos_start(m, p);
        if (at >= end) {
            *cursor = end;
            return copied;
        }
        if (copied == max) {
            *cursor = at;
            return copied;
        }
    }
}

uint64_t runmap_metadata_bytes(const struct runmap *m) { return m->nruns * sizeof(struct runmap_run); }

uint64_t runmap_footprint_bytes(const struct runmap *m)
{
    uint64_t bytes = sizeof *m + m->chunks_cap * (sizeof *m->chunks + sizeof *m->firsts)
                     + (uint64_t)m->counts_cap * sizeof *m->counts;
    for (size_t c = 0; c < m->nchunks; c++)
        bytes += (uint64_t)m->chunks[c].cap * sizeof(struct runmap_run);
    return bytes;
}

/* ---- updates --------------------------------------------------------------------------------------- */

/* make room for q runs at index j of chunk k (capacity reserved) */
static inline void runs_open(struct chunk *k, uint32_t j, uint32_t q)
{
    memmove(&k->runs[j + q], &k->runs[j], (k->n - j) * sizeof *k->runs);
    k->n += q;
}

/* remove q runs at index j of chunk k */
static inline void runs_close(struct chunk *k, uint32_t j, uint32_t q)
{
    memmove(&k->runs[j], &k->runs[j + q], (k->n - j - q) * sizeof *k->runs);
    k->n -= q;
}

/* the edits change_in_run can make in place, decided before anything changes */
enum edit {
    SPLIT3,       /* [start, end) inside the run: (run head, v) (start, w) (end, v) */
    TAIL_JOINS,   /* the run's tail [start, e) joins the next run */
    TAIL_NEW,     /* the run's tail becomes a run of its own */
    HEAD_JOINS,   /* the run's head [s, end) joins the previous run */
    HEAD_NEW,     /* the run's head becomes a run of its own */
    JOIN_BOTH,    /* the whole run joins both neighbours */
    JOIN_LEFT,    /* the whole run joins the previous one */
    JOIN_RIGHT,   /* the whole run joins the next one */
    RELABEL,      /* the whole run just changes value */
    GENERAL,      /* a merge reaches into another chunk: the general path */
};

/*
 * [start, end) lies inside run j of chunk c (value v, ending at e) and becomes w != v. Returns 0 when done
 * in place, 1 when the general path must do it (a merge with a run of another chunk, or a chunk that
 * would leave its bounds), -ENOMEM with nothing changed.
 */
static int change_in_run(struct runmap *m, size_t c, uint32_t j, uint64_t start, uint64_t end, uint64_t e,
                         int64_t v, int64_t w)
{
    struct chunk *k = &m->chunks[c];
    struct runmap_run *r = k->runs;
    uint32_t n = k->n;
    int has_left = j > 0 || c > 0, has_right = j + 1 < n || c + 1 < m->nchunks;
    int64_t left = j > 0 ? r[j - 1].value : c > 0 ? m->chunks[c - 1].runs[m->chunks[c - 1].n - 1].value : 0;
    int64_t right = j + 1 < n ? r[j + 1].value : c + 1 < m->nchunks ? m->chunks[c + 1].runs[0].value : 0;
    int grown;
    enum edit edit;

    if (r[j].start < start) {                   /* the run keeps its head */
        if (end < e)
            edit = SPLIT3, grown = 2;
        else if (has_right && right == w)
            edit = j + 1 < n ? TAIL_JOINS : GENERAL, grown = 0;
        else
            edit = TAIL_NEW, grown = 1;
    } else if (end < e) {                       /* the run keeps its tail */
        if (has_left && left == w)
            edit = j > 0 ? HEAD_JOINS : GENERAL, grown = 0;
        else
            edit = HEAD_NEW, grown = 1;
    } else {                                    /* the whole run changes */
        int l = has_left && left == w, rt = has_right && right == w;
        if (l && rt)
            edit = j > 0 && j + 1 < n ? JOIN_BOTH : GENERAL, grown = -2;
        else if (l)
            edit = j > 0 ? JOIN_LEFT : GENERAL, grown = -1;
        else if (rt)
            edit = j + 1 < n ? JOIN_RIGHT : GENERAL, grown = -1;
        else
            edit = RELABEL, grown = 0;
    }
    if (edit == GENERAL)
        return 1;
    int64_t after = (int64_t)n + grown;
    if (after > m->most || (after < m->most / 4 && m->nchunks > 1))
        return 1;  /* the chunk is split or merged: the general path rebuilds it */

    /* every allocation first: capacity (harmless if the entry below then fails), then w's entry */
    if (grown > 0 && chunk_reserve(m, k, (uint32_t)after) < 0)
        return -ENOMEM;
    if (count_ensure(m, w) < 0)
        return -ENOMEM;
    r = k->runs;

    switch (edit) {
    case SPLIT3:
        runs_open(k, j + 1, 2);
        r[j + 1] = (struct runmap_run){ start, w };
        r[j + 2] = (struct runmap_run){ end, v };
        break;
    case TAIL_JOINS:
        r[j + 1].start = start;
        break;
    case TAIL_NEW:
        runs_open(k, j + 1, 1);
        r[j + 1] = (struct runmap_run){ start, w };
        break;
    case HEAD_JOINS:
        r[j].start = end;
        break;
    case HEAD_NEW:
        runs_open(k, j + 1, 1);
        r[j].value = w;
        r[j + 1] = (struct runmap_run){ end, v };
        break;
    case JOIN_BOTH:
        runs_close(k, j, 2);
        break;
    case JOIN_LEFT:
        runs_close(k, j, 1);
        break;
    case JOIN_RIGHT:
        runs_close(k, j, 1);
        r[j].start = start;
        break;
    case RELABEL:
        r[j].value = w;
        break;
    case GENERAL:
        break;
    }
    /* The first run of a chunk keeps its start in every edit above, so the index needs no update. */
    m->nruns += grown;
    count_move(m, v, w, end - start);
    if (count_find(m, v)->pages == 0)
        count_purge(m);
    if (grown < 0)
        chunk_trim(k);
    return 0;
}

/* the value [start, end) takes in place of v; -EOVERFLOW when an add overflows */
static inline int changed(int64_t v, int64_t operand, int adding, int64_t *w)
{
    if (!adding) {
        *w = operand;
        return 0;
    }
    return __builtin_add_overflow(v, operand, w) ? -EOVERFLOW : 0;
}

/* a piece of the runs a rebuild copies out of, in order */
struct segment {
    const struct runmap_run *runs;
    uint64_t n;
};

/*
 * The general rewrite of [start, end), whose first page is in run p of its chunk.
 *
 * The runs from the left neighbour of p up to the first run starting at or after end (or the last run)
 * are "the old runs": K of them, from position l to (not including) position r. They are replaced by their
 * canonical replacement (at most K + 2 runs), built into a buffer. If the chunk holding them all keeps
 * within its bounds, the replacement is spliced into it in place; otherwise the chunks from l's to r's
 * (plus a neighbour when they end up too small) are rebuilt into fresh chunks. Every allocation happens
 * before the map changes.
 */
static int rewrite_runs(struct runmap *m, struct pos p, uint64_t start, uint64_t end, int64_t operand,
                        int adding)
{
    struct pos l = p;
    if (l.j > 0)
        l.j--;
    else if (l.c > 0)
        l = (struct pos){ l.c - 1, m->chunks[l.c - 1].n - 1 };

    /* count the old runs: up to and including the first starting at or after end */
    struct pos r = l;
    uint64_t K = 0;
    for (;;) {
        uint64_t s = pos_start(m, r);
        pos_next(m, &r);
        K++;
        if (s >= end || r.j == m->chunks[r.c].n)
            break;
    }
    /* a position past a chunk's last run is (next chunk, 0): keep it in the chunk that ends there */
    if (r.j == 0 && r.c > l.c) {
        r.c--;
        r.j = m->chunks[r.c].n;
    }

    struct runmap_run *tmp = malloc((K + 2) * sizeof *tmp);
    if (tmp == NULL)
        return -ENOMEM;

    /* the replacement: each old run cut into the pieces before, inside and after [start, end), the inside
       one changed, appended merging equal neighbours; the new values get their count entries */
    int err = 0;
    uint64_t R = 0;
    struct pos q = l;
    uint64_t s = pos_start(m, q);
    for (uint64_t i = 0; i < K; i++) {
        int64_t v = pos_value(m, q);
        pos_next(m, &q);
        uint64_t e = pos_start(m, q);
        if (s < start && (R == 0 || tmp[R - 1].value != v))
            tmp[R++] = (struct runmap_run){ s, v };
        uint64_t a = s > start ? s : start, b = e < end ? e : end;
        if (a < b) {
            int64_t w;
            if ((err = changed(v, operand, adding, &w)) < 0)
                goto fail;
            if (R == 0 || tmp[R - 1].value != w)
                tmp[R++] = (struct runmap_run){ a, w };
            if (w != v && (err = count_ensure(m, w)) < 0)
                goto fail;
        }
        if (e > end && (R == 0 || tmp[R - 1].value != v))
            tmp[R++] = (struct runmap_run){ s > end ? s : end, v };
        s = e;
    }

    /* the layout: in place, or which chunks [a, b] to rebuild into how many */
    struct chunk *kl = &m->chunks[l.c], *kr = &m->chunks[r.c];
    uint64_t T = l.j + R + (kr->n - r.j);  /* runs from chunk l's first to chunk r's last, after */
    int in_place = l.c == r.c && T <= m->most && (T >= m->most / 4 || m->nchunks == 1);
    size_t a = l.c, b = r.c;
    uint64_t pieces = 1;
    struct runmap_run *stack_pieces[8], **piece = stack_pieces;
    if (in_place) {
        if ((err = chunk_reserve(m, kl, (uint32_t)T)) < 0)
            goto fail;
    } else {
        if (T < m->most / 4 && m->nchunks > b - a + 1) {
            /* too small: take in a neighbour (it holds at least most/4, so together they are enough) */
            if (b + 1 < m->nchunks)
                T += m->chunks[++b].n;
            else
                T += m->chunks[--a].n;
        }
        /* cut into pieces of most/2 .. 3/4 most runs (one chunk if it fits), as a split does */
        pieces = T <= m->most ? 1 : T / (m->most / 2);
        if (pieces > 8 && (piece = malloc(pieces * sizeof *piece)) == NULL) {
            err = -ENOMEM;
            goto fail;
        }
        uint64_t made = 0;
        for (; made < pieces; made++) {
            uint64_t size = T * (made + 1) / pieces - T * made / pieces;
            if ((piece[made] = malloc(size * sizeof **piece)) == NULL)
                break;
        }
        if (made < pieces || chunks_reserve(m, m->nchunks - (b - a + 1) + pieces) < 0) {
            while (made > 0)
                free(piece[--made]);
            if (piece != stack_pieces)
                free(piece);
            err = -ENOMEM;
            goto fail;
        }
    }

    /* nothing can fail from here on. chunks_reserve may have moved the chunk array: look again */
    kl = &m->chunks[l.c];
    kr = &m->chunks[r.c];

    /* move the page counts (the old runs are still there to read) */
    q = l;
    s = pos_start(m, q);
    for (uint64_t i = 0; i < K; i++) {
        int64_t v = pos_value(m, q), w;
        pos_next(m, &q);
        uint64_t e = pos_start(m, q);
        uint64_t lo = s > start ? s : start, hi = e < end ? e : end;
        changed(v, operand, adding, &w);
        if (lo < hi && w != v)
            count_move(m, v, w, hi - lo);
        s = e;
    }
    count_purge(m);
    m->nruns = m->nruns + R - K;

    if (in_place) {
        /* kl->runs may have moved in chunk_reserve; old runs [l.j, r.j) become the R new ones */
        memmove(&kl->runs[l.j + R], &kl->runs[r.j], (kl->n - r.j) * sizeof *kl->runs);
        memcpy(&kl->runs[l.j], tmp, R * sizeof *tmp);
        kl->n = (uint32_t)T;
        m->firsts[l.c] = kl->runs[0].start;
        if (R < K)
            chunk_trim(kl);
        free(tmp);
        return 0;
    }

    /* rebuild: copy the runs of chunks [a, b] with the replacement in the middle into the pieces */
    struct segment seg[5];
    int nseg = 0;
    if (a < l.c)
        seg[nseg++] = (struct segment){ m->chunks[a].runs, m->chunks[a].n };
    seg[nseg++] = (struct segment){ kl->runs, l.j };
    seg[nseg++] = (struct segment){ tmp, R };
    seg[nseg++] = (struct segment){ kr->runs + r.j, kr->n - r.j };
    if (b > r.c)
        seg[nseg++] = (struct segment){ m->chunks[b].runs, m->chunks[b].n };
    int si = 0;
    uint64_t so = 0;
    for (uint64_t i = 0; i < pieces; i++) {
        uint64_t size = T * (i + 1) / pieces - T * i / pieces, filled = 0;
        while (filled < size) {
            if (so == seg[si].n) {
                si++;
                so = 0;
                continue;
            }
            uint64_t take = seg[si].n - so < size - filled ? seg[si].n - so : size - filled;
            memcpy(&piece[i][filled], &seg[si].runs[so], take * sizeof **piece);
            filled += take;
            so += take;
        }
    }
    for (size_t c = a; c <= b; c++)
        free(m->chunks[c].runs);
    size_t removed = b - a + 1, tail = m->nchunks - (b + 1);
    memmove(&m->chunks[a + pieces], &m->chunks[b + 1], tail * sizeof *m->chunks);
    memmove(&m->firsts[a + pieces], &m->firsts[b + 1], tail * sizeof *m->firsts);
    for (uint64_t i = 0; i < pieces; i++) {
        uint32_t size = (uint32_t)(T * (i + 1) / pieces - T * i / pieces);
        m->chunks[a + i] = (struct chunk){ size, size, piece[i] };
        m->firsts[a + i] = piece[i][0].start;
    }
    m->nchunks = m->nchunks - removed + pieces;
    if (piece != stack_pieces)
        free(piece);
    free(tmp);
    return 0;

fail:
    count_purge(m);  /* drops the zero entries count_ensure added: the counts are as they were */
    free(tmp);
    return err;
}

/* set [start, end) to operand, or add operand to it */
static int rewrite(struct runmap *m, uint64_t start, uint64_t end, int64_t operand, int adding)
{
    struct pos p = locate(m, start);
    uint64_t e = run_end(m, p.c, p.j);
    if (end <= e) {
        int64_t v = m->chunks[p.c].runs[p.j].value, w;
        int err = changed(v, operand, adding, &w);
        if (err < 0)
            return err;
        if (w == v)
            return 0;
        err = change_in_run(m, p.c, p.j, start, end, e, v, w);
        if (err <= 0)
            return err;
    }
    return rewrite_runs(m, p, start, end, operand, adding);
}

int runmap_set(struct runmap *m, uint64_t start, uint64_t end, int64_t value)
{
    if (!range_ok(m, start, end))
        return -EINVAL;
    return start == end ? 0 : rewrite(m, start, end, value, 0);
}

int runmap_add(struct runmap *m, uint64_t start, uint64_t end, int64_t delta)
{
    if (!range_ok(m, start, end))
        return -EINVAL;
    return start == end || delta == 0 ? 0 : rewrite(m, start, end, delta, 1);
}

/* ---- invariants ------------------------------------------------------------------------------------ */

enum check_code {
    CHECK_OK,
    CHECK_CHUNK_LISTS,   /* no chunk, or more chunks than room for them */
    CHECK_CHUNK_SIZE,    /* a chunk empty, above most runs, or above its capacity */
    CHECK_CHUNK_SMALL,   /* a chunk under most/4 runs in a map of several */
    CHECK_INDEX,         /* the chunk index does not hold a chunk's first start */
    CHECK_FIRST,         /* the first run does not start at page 0 */
    CHECK_ORDER,         /* starts not strictly increasing, or one at or past npages */
    CHECK_NEIGHBOURS,    /* two adjacent runs hold the same value: not canonical */
    CHECK_RUN_COUNT,     /* the run count differs from the runs */
    CHECK_COUNTS_ORDER,  /* the counts are not sorted by value, or hold a zero entry */
    CHECK_COUNTS,        /* a value's page count differs from its runs' pages */
    CHECK_CODES,
};

static const char *const check_messages[CHECK_CODES] = {
    [CHECK_OK] = "every invariant holds",
    [CHECK_CHUNK_LISTS] = "no chunk, or more chunks than room for them",
    [CHECK_CHUNK_SIZE] = "a chunk is empty or holds more runs than allowed or allocated",
    [CHECK_CHUNK_SMALL] = "a chunk holds fewer than a quarter of the most runs in a map of several",
    [CHECK_INDEX] = "the chunk index is out of date",
    [CHECK_FIRST] = "the first run must start at page 0",
    [CHECK_ORDER] = "run starts must strictly increase and stay below npages",
    [CHECK_NEIGHBOURS] = "two adjacent runs hold the same value",
    [CHECK_RUN_COUNT] = "the run count differs from the runs",
    [CHECK_COUNTS_ORDER] = "the page counts are not sorted by value or hold a zero entry",
    [CHECK_COUNTS] = "a page count differs from the runs",
};

const char *runmap_check_message(int code)
{
    return code >= 0 && code < CHECK_CODES ? check_messages[code] : "unknown runmap_check code";
}

int runmap_check(const struct runmap *m)
{
    if (m->nchunks == 0 || m->nchunks > m->chunks_cap)
        return CHECK_CHUNK_LISTS;
    uint64_t runs = 0, prev_start = 0;
    int64_t prev_value = 0;
    for (size_t c = 0; c < m->nchunks; c++) {
        const struct chunk *k = &m->chunks[c];
        if (k->n == 0 || k->n > m->most || k->n > k->cap)
            return CHECK_CHUNK_SIZE;
        if (m->nchunks > 1 && k->n < m->most / 4)
            return CHECK_CHUNK_SMALL;
        if (m->firsts[c] != k->runs[0].start)
            return CHECK_INDEX;
        for (uint32_t j = 0; j < k->n; j++, runs++) {
            const struct runmap_run *run = &k->runs[j];
            if (runs == 0) {
                if (run->start != 0)
                    return CHECK_FIRST;
            } else {
                if (run->start <= prev_start || run->start >= m->npages)
                    return CHECK_ORDER;
                if (run->value == prev_value)
                    return CHECK_NEIGHBOURS;
            }
            prev_start = run->start;
            prev_value = run->value;
        }
    }
    if (runs != m->nruns)
        return CHECK_RUN_COUNT;
    for (uint32_t i = 0; i < m->ncounts; i++)
        if (m->counts[i].pages == 0 || (i > 0 && m->counts[i].value <= m->counts[i - 1].value))
            return CHECK_COUNTS_ORDER;
    /* Every run's value has an entry, and each entry's pages add up. O(values x runs) without allocating:
       a check must not fail for want of memory, and the maps hold few values. */
    uint64_t total = 0;
    for (uint32_t i = 0; i < m->ncounts; i++) {
        uint64_t pages = 0;
        struct pos p = { 0, 0 };
        for (uint64_t n = 0; n < runs; n++) {
            int64_t v = pos_value(m, p);
            uint64_t s = pos_start(m, p);
            pos_next(m, &p);
            if (v == m->counts[i].value)
                pages += pos_start(m, p) - s;
        }
        if (pages != m->counts[i].pages)
            return CHECK_COUNTS;
        total += pages;
    }
    if (total != m->npages)
        return CHECK_COUNTS;  /* some run's value has no entry */
    return CHECK_OK;
}

/* ---- test access ----------------------------------------------------------------------------------- */

uint64_t runmap_chunks(const struct runmap *m) { return m->nchunks; }

struct runmap_run *runmap_chunk(struct runmap *m, uint64_t c, uint32_t *n, uint64_t **first)
{
    if (c >= m->nchunks)
        return NULL;
    *n = m->chunks[c].n;
    *first = &m->firsts[c];
    return m->chunks[c].runs;
}

struct runmap_count *runmap_counts(struct runmap *m, uint32_t *n)
{
    *n = m->ncounts;
    return m->counts;
}
