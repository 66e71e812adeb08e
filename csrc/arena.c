/* arena.c - lifetime placement of tensors in one arena (see arena.h). */
#include "arena.h"

#define ARENA_ALIGN_FLOATS 16 /* 64 bytes: any backend's vector loads */

static size_t aligned_size(size_t floats) { return (floats + ARENA_ALIGN_FLOATS - 1) & ~(size_t)(ARENA_ALIGN_FLOATS - 1); }

size_t ds_arena_place(arena_slot *slots, int count)
{
    size_t top = 0;
    for (int i = 0; i < count; i++) {
        arena_slot *t = &slots[i];
        size_t size = aligned_size(t->floats), offset = 0;
        for (int moved = 1; moved;) {
            moved = 0;
            for (int j = 0; j < i; j++) {
                const arena_slot *o = &slots[j];
                int live_together = o->first <= t->last && t->first <= o->last;
                if (live_together && offset < o->offset + aligned_size(o->floats) && o->offset < offset + size) {
                    offset = o->offset + aligned_size(o->floats);
                    moved = 1;
                }
            }
        }
        t->offset = offset;
        if (offset + size > top)
            top = offset + size;
    }
    return top;
}
