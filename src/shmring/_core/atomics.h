/*
 * atomics.h: the only file that spells __atomic_*.
 *
 * Every access to a word that another process may read or write at the same
 * time goes through one of these helpers; the ordering is in the name, as in
 * Agrona (getLongVolatile, putLongRelease) and the kernel (smp_load_acquire).
 * Each call site cites the rule of docs/design.md ("The protocol as rules")
 * that it implements and the access it pairs with:
 *
 *     store_release64(p, v);   // R3, pairs with the acquire in spsc_claim
 *
 * tests/test_core_rules.py fails the build of the test suite when a call of
 * a helper below (or a raw builtin outside this file) has no citation, or
 * cites a rule that design.md does not define.
 *
 * Plain accesses are left only for bytes that no other process can see yet
 * (a record before its publication) or will not touch again.
 */
#ifndef SHMRING_ATOMICS_H
#define SHMRING_ATOMICS_H

#include <stdint.h>

/* A lock-based fallback (libatomic) would be process-local: a "CAS" two
 * processes make on the same shared word would not exclude each other.  Only
 * a lock-free instruction is an atomic across address spaces. */
_Static_assert(__atomic_always_lock_free(2, 0), "16-bit atomics must be lock-free");
_Static_assert(__atomic_always_lock_free(4, 0), "32-bit atomics must be lock-free");
_Static_assert(__atomic_always_lock_free(8, 0), "64-bit atomics must be lock-free");

#define SHMR_ATOMIC_LOAD(bits, name, order) \
    static inline uint##bits##_t name(const void *p) { return __atomic_load_n((const uint##bits##_t *)p, order); }
#define SHMR_ATOMIC_STORE(bits, name, order) \
    static inline void name(void *p, uint##bits##_t v) { __atomic_store_n((uint##bits##_t *)p, v, order); }

/* loads */
SHMR_ATOMIC_LOAD(16, load_relaxed16, __ATOMIC_RELAXED)
SHMR_ATOMIC_LOAD(32, load_relaxed32, __ATOMIC_RELAXED)
SHMR_ATOMIC_LOAD(64, load_relaxed64, __ATOMIC_RELAXED)
SHMR_ATOMIC_LOAD(16, load_acquire16, __ATOMIC_ACQUIRE)
SHMR_ATOMIC_LOAD(32, load_acquire32, __ATOMIC_ACQUIRE)
SHMR_ATOMIC_LOAD(64, load_acquire64, __ATOMIC_ACQUIRE)
SHMR_ATOMIC_LOAD(32, load_seq_cst32, __ATOMIC_SEQ_CST)
SHMR_ATOMIC_LOAD(64, load_seq_cst64, __ATOMIC_SEQ_CST)

/* stores */
SHMR_ATOMIC_STORE(16, store_relaxed16, __ATOMIC_RELAXED)
SHMR_ATOMIC_STORE(32, store_relaxed32, __ATOMIC_RELAXED)
SHMR_ATOMIC_STORE(64, store_relaxed64, __ATOMIC_RELAXED)
SHMR_ATOMIC_STORE(32, store_release32, __ATOMIC_RELEASE)
SHMR_ATOMIC_STORE(64, store_release64, __ATOMIC_RELEASE)
SHMR_ATOMIC_STORE(64, store_seq_cst64, __ATOMIC_SEQ_CST)

#undef SHMR_ATOMIC_LOAD
#undef SHMR_ATOMIC_STORE

/* A seq_cst exchange is a store and a full barrier in one instruction (xchg
 * on x86, cheaper than a store followed by mfence): the store half of every
 * store-buffering pair (R4, R11, R14, R17). */
static inline uint64_t xchg_seq_cst64(void *p, uint64_t v) {
    return __atomic_exchange_n((uint64_t *)p, v, __ATOMIC_SEQ_CST);
}

/* Compare-and-swap, strong, seq_cst on success and failure: recovery steps
 * are decided from the value they swap, and several take part in
 * store-buffering pairs, so none is weakened to acq_rel.  1 if swapped. */
static inline int cas_seq_cst16(void *p, uint16_t expect, uint16_t desired) {
    return __atomic_compare_exchange_n((uint16_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cas_seq_cst32(void *p, uint32_t expect, uint32_t desired) {
    return __atomic_compare_exchange_n((uint32_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cas_seq_cst64(void *p, uint64_t expect, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline uint32_t fetch_add_seq_cst32(void *p, uint32_t v) {
    return __atomic_fetch_add((uint32_t *)p, v, __ATOMIC_SEQ_CST);
}
static inline uint64_t fetch_add_seq_cst64(void *p, uint64_t v) {
    return __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_SEQ_CST);
}
/* process-local statistics: atomic only because threads may share a handle */
static inline void count_relaxed(uint64_t *p) { (void)__atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }

static inline void fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* A full fence: the store-load order of a store-buffering pair whose store
 * was not itself seq_cst (an unconditional wake after a release store, R53). */
static inline void fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
