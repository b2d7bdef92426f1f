/*
 * counter: bytes counted against an optional bound, lock free (counter.h says who shares them and why).
 * A take is a compare-and-swap loop, so concurrent takes never pass the bound together, as the Python
 * counters' lock guaranteed before.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "counter.h"

struct ufs_counter {
    atomic_int_fast64_t held;
    int64_t bound;
    atomic_long refs;
};

struct ufs_counter *ufs_counter_new(int64_t bound)
{
    struct ufs_counter *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    atomic_init(&c->held, 0);
    atomic_init(&c->refs, 1);
    c->bound = bound;
    return c;
}

void ufs_counter_get(struct ufs_counter *c) { atomic_fetch_add(&c->refs, 1); }

void ufs_counter_put(struct ufs_counter *c)
{
    if (c != NULL && atomic_fetch_sub(&c->refs, 1) == 1)
        free(c);
}

int ufs_counter_take(struct ufs_counter *c, int64_t n, int force)
{
    int_fast64_t held = atomic_load(&c->held);
    do {
        if (!force && c->bound >= 0 && held + n > c->bound)
            return -ENOMEM;
    } while (!atomic_compare_exchange_weak(&c->held, &held, held + n));
    return 0;
}

int ufs_counter_give(struct ufs_counter *c, int64_t n)
{
    int_fast64_t held = atomic_load(&c->held);
    do {
        if (n < 0 || n > held)
            return -ERANGE;
    } while (!atomic_compare_exchange_weak(&c->held, &held, held - n));
    return 0;
}

int64_t ufs_counter_held(struct ufs_counter *c) { return atomic_load(&c->held); }
int64_t ufs_counter_bound(struct ufs_counter *c) { return c->bound; }
