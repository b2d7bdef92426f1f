/*
 * counter: a count of bytes against an optional bound, shared by Python and the compiled hot path, lock
 * free. The mount's memory budget (budget.py's MemoryBudget, against --max-memory) and each user's
 * memory bound (users.py) are such counters, so a page fill served in C charges the same counts Python's
 * fills do, and a charge taken by either side is seen by both at once.
 *
 * Reference counted: the Python object that made it and every file charging it hold one.
 */
#ifndef UFSGMEM_COUNTER_H
#define UFSGMEM_COUNTER_H

#include <stdint.h>

struct ufs_counter;

struct ufs_counter *ufs_counter_new(int64_t bound);          /* bound < 0: none */
void ufs_counter_get(struct ufs_counter *c);
void ufs_counter_put(struct ufs_counter *c);
/* count n more: 0, or -ENOMEM (nothing counted) past the bound unless force */
int ufs_counter_take(struct ufs_counter *c, int64_t n, int force);
/* give n back: 0, or -ERANGE (nothing changed) if more than is held: a bug the caller reports */
int ufs_counter_give(struct ufs_counter *c, int64_t n);
int64_t ufs_counter_held(struct ufs_counter *c);
int64_t ufs_counter_bound(struct ufs_counter *c);

#endif
