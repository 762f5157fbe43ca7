#ifndef FASTAZR_BUMP_H
#define FASTAZR_BUMP_H

/* In a job's child, before it returns to Python: its new objects come from a fresh region of
 * its own (bump.c). Without memory for the region it changes nothing. */
void fz_bump_install(void);

#endif
