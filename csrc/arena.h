/* arena.h - placing tensors in one arena by lifetime, shared by the inference plan (model.c) and the
 * training graph (train.c): each tensor gets the lowest offset where it overlaps no tensor placed before
 * it that is alive at the same time (greedy first fit), so memory is reused once a tensor is dead. */
#ifndef DS_ARENA_H
#define DS_ARENA_H

#include <stddef.h>

typedef struct {
    size_t floats;   /* size */
    int first, last; /* the schedule steps it is alive in, inclusive */
    size_t offset;   /* set by ds_arena_place, in floats; 64-byte aligned */
} arena_slot;

/* Places the slots in order; returns the arena's size in floats. */
size_t ds_arena_place(arena_slot *slots, int count);

#endif
