/* Wiping the zygote's freed memory before later children inherit it (scrub.c). */
#ifndef FASTAZR_SCRUB_H
#define FASTAZR_SCRUB_H

/* Hook every allocator domain so freed blocks are wiped; once per process. -1: no secret to
 * be had (errno set). */
int fz_scrub_install(void);
/* In a freshly forked child: stop wiping (its garbage dies with it). */
void fz_scrub_child(void);

#endif
