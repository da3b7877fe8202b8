/* BLAKE2b-256 (RFC 7693): hashlib.blake2b(data, digest_size=32).digest(), in C (blake2b.c). */

#ifndef STRATA_BLAKE2B_H
#define STRATA_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>

#define BLAKE2B_256_SIZE 32

/* Needs no GIL: it reads ``len`` bytes of ``data`` and writes 32 bytes to ``out``. */
void blake2b_256(const uint8_t *data, size_t len, uint8_t out[BLAKE2B_256_SIZE]);

#endif
