/*
 * runmap_fuzz.c: random set/add sequences against a one-value-per-page model, with allocation failures
 * injected, for tests/test_runmap_c.py to build with the sanitizers.
 *
 * Why in C: the promise that an update failing for want of memory (-ENOMEM) or by overflow (-EOVERFLOW)
 * leaves the map exactly as it was cannot be reached from Python, where malloc does not fail. runmap.c is
 * included with malloc/calloc/realloc redirected to wrappers that fail on the n-th call, so every
 * allocation an update makes gets its turn to fail. ASan/UBSan/LSan (the build flags) catch what a
 * comparison with the model would not: reads past a chunk, leaks on the failure paths.
 *
 * Usage: runmap_fuzz SEED ROUNDS. Prints "ok <ops> <enomem> <overflow>" and exits 0, or names the first
 * disagreement and exits 1.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static long fail_countdown;  /* the allocation that fails: 1 = the next one; 0 = none */
static long allocations;

static int should_fail(void)
{
    allocations++;
    return fail_countdown > 0 && --fail_countdown == 0;
}

static void *fuzz_malloc(size_t n) { return should_fail() ? NULL : malloc(n); }
static void *fuzz_calloc(size_t n, size_t m) { return should_fail() ? NULL : calloc(n, m); }
static void *fuzz_realloc(void *p, size_t n) { return should_fail() ? NULL : realloc(p, n); }

#define malloc fuzz_malloc
#define calloc fuzz_calloc
#define realloc fuzz_realloc
#include "../../ufsgmem/core/runmap.c"
#undef malloc
#undef calloc
#undef realloc

#define MAXPAGES 300

static uint64_t rng_state;

static uint64_t rnd(uint64_t n)  /* uniform-ish in [0, n) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state % n;
}

static int fail(const char *what, long op)
{
    printf("FAIL op %ld: %s\n", op, what);
    fflush(stdout);  /* LeakSanitizer ends the process without flushing */
    return 1;
}

/* the map describes exactly model[0, npages) */
static int same(struct runmap *m, const int64_t *model, uint64_t npages, long op)
{
    int code = runmap_check(m);
    if (code != 0) {
        printf("check %d: %s\n", code, runmap_check_message(code));
        fflush(stdout);
        return fail("runmap_check", op);
    }
    uint64_t starts[MAXPAGES], cursor = 0, runs = 0;
    int64_t values[MAXPAGES];
    uint64_t n = runmap_runs(m, &cursor, npages, starts, values, MAXPAGES);
    if (cursor != npages || n != runmap_len(m))
        return fail("runmap_runs does not cover the map", op);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t end = i + 1 < n ? starts[i + 1] : npages;
        for (uint64_t p = starts[i]; p < end; p++)
            if (model[p] != values[i])
                return fail("a run disagrees with the model", op);
        if (i > 0 && values[i] == values[i - 1])
            return fail("equal neighbours", op);
    }
    for (uint64_t p = 0; p < npages; p++) {
        if (runmap_value_at(m, p) != model[p])
            return fail("value_at", op);
        runs += p == 0 || model[p] != model[p - 1];
        uint64_t pages = 0;
        for (uint64_t q = 0; q < npages; q++)
            pages += model[q] == model[p];
        if (runmap_count(m, model[p], 0, npages) != pages)
            return fail("whole-map count", op);
    }
    if (runs != runmap_len(m) || runmap_metadata_bytes(m) != 16 * runs)
        return fail("run count", op);
    return 0;
}

/* ranged queries against the model */
static int queries(struct runmap *m, const int64_t *model, uint64_t npages, long op)
{
    uint64_t a = rnd(npages + 1), b = a + rnd(npages + 1 - a);
    int64_t v = (int64_t)rnd(5) - 1;
    int64_t eq = -1, ne = -1, gt = -1;
    uint64_t pages = 0, runs = 0;
    int uniform = 1;
    for (uint64_t p = a; p < b; p++) {
        if (eq < 0 && model[p] == v) eq = (int64_t)p;
        if (ne < 0 && model[p] != v) ne = (int64_t)p;
        if (gt < 0 && model[p] > v) gt = (int64_t)p;
        pages += model[p] == v;
        runs += p == a || model[p] != model[p - 1];
        uniform &= model[p] == v;
    }
    if (runmap_first(m, a, b, RUNMAP_EQ, v) != eq || runmap_first(m, a, b, RUNMAP_NE, v) != ne
            || runmap_first(m, a, b, RUNMAP_GT, v) != gt)
        return fail("runmap_first", op);
    if (runmap_count(m, v, a, b) != pages)
        return fail("ranged count", op);
    if (runmap_count_runs(m, a, b) != runs)
        return fail("count_runs", op);
    if (runmap_is_uniform(m, a, b, v) != uniform)
        return fail("is_uniform", op);
    /* read the range two runs at a time: the cursor must carry on where the last piece stopped */
    uint64_t cursor = a, got = 0, starts[2];
    int64_t values[2];
    while (cursor < b) {
        uint64_t n = runmap_runs(m, &cursor, b, starts, values, 2);
        for (uint64_t i = 0; i < n; i++)
            if (model[starts[i]] != values[i] || (got + i == 0 && starts[i] != a))
                return fail("runmap_runs in pieces", op);
        got += n;
        if (n == 0)
            return fail("runmap_runs made no progress", op);
    }
    if (got != runs)
        return fail("runmap_runs in pieces: run count", op);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SEED ROUNDS\n", argv[0]);
        return 2;
    }
    rng_state = strtoull(argv[1], NULL, 0) * 2654435761u + 1;
    long rounds = strtol(argv[2], NULL, 0), op = 0, enomem = 0, overflow = 0;
    int64_t model[MAXPAGES], before[MAXPAGES];
    for (long round = 0; round < rounds; round++) {
        uint64_t npages = 1 + rnd(rnd(4) == 0 ? MAXPAGES : 40);
        uint32_t most = 4 + (uint32_t)rnd(3) * 4;  /* 4, 8, 12: many chunk edges in a few pages */
        int64_t initial = (int64_t)rnd(3);
        struct runmap *m = runmap_new_chunked(npages, initial, most);
        if (m == NULL)
            return fail("runmap_new_chunked", op);
        for (uint64_t p = 0; p < npages; p++)
            model[p] = initial;
        for (int step = 0; step < 60; step++, op++) {
            uint64_t a = rnd(npages), b = a + 1 + rnd(rnd(3) == 0 ? npages - a : (npages - a < 3 ? npages - a : 3));
            int adding = rnd(3) == 0;
            int64_t operand = adding ? (int64_t)rnd(5) - 2 : (int64_t)rnd(3);
            if (adding && rnd(50) == 0)
                operand = INT64_MAX;  /* overflows wherever a value is > 0 */
            for (uint64_t p = 0; p < npages; p++)
                before[p] = model[p];
            /* one failure somewhere in the update's allocations, half of the time */
            fail_countdown = rnd(2) ? 1 + (long)rnd(4) : 0;
            int err = adding ? runmap_add(m, a, b, operand) : runmap_set(m, a, b, operand);
            fail_countdown = 0;
            if (err == -ENOMEM) {
                enomem++;
                if (same(m, before, npages, op))
                    return fail("an update that ran out of memory changed the map", op);
                /* again, with memory this time (an overflow may come out now: it was not reached) */
                err = adding ? runmap_add(m, a, b, operand) : runmap_set(m, a, b, operand);
            }
            if (err == -EOVERFLOW) {
                overflow++;
                if (same(m, before, npages, op))
                    return fail("an update that overflowed changed the map", op);
                continue;
            }
            if (err != 0) {
                printf("error %d\n", err);
                return fail("unexpected error", op);
            }
            for (uint64_t p = a; p < b; p++)
                model[p] = adding ? model[p] + operand : operand;
            if (same(m, model, npages, op) || queries(m, model, npages, op))
                return 1;
        }
        if (runmap_set(m, 0, npages + 1, 0) != -EINVAL || runmap_add(m, 2, 1, 1) != -EINVAL)
            return fail("a range outside the map must be -EINVAL", op);
        runmap_free(m);
    }
    printf("ok %ld %ld %ld\n", op, enomem, overflow);
    return 0;
}
